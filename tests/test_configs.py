"""Every experiment file in configs/ builds and validates (a replication grid: its base)."""

import glob
import importlib.util
import os
import sys

import pytest

from gkd_jax import config as config_lib
from gkd_jax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
               if not f.endswith("__init__.py"))


@pytest.mark.parametrize("path", FILES, ids=[os.path.basename(f) for f in FILES])
def test_config_validates(path):
  sys.path.insert(0, ROOT)
  try:
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c = config_lib.validate(c.base if "cells" in c else c)  # a replication grid: its base run
  finally:
    sys.path.remove(ROOT)
  assert c.train.steps > 0 and c.gkd.loss in losses.names()


def test_every_required_setup_exists():
  names = {os.path.basename(f) for f in FILES}
  assert {"demo.py", "xsum_t5.py", "wmt_t5.py", "gsm8k_flant5.py", "rl_gkd_gsm8k.py",
          "atkd_xsum.py", "atkd_instruct.py"} <= names
