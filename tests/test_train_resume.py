"""Resume after SIGKILL and SIGTERM through the CLI, bit for bit (its own file, so that this
slow test runs beside test_train.py's under pytest-xdist)."""

import os
import signal
import time

import numpy as np
import pytest

from gkd_jax import train
from test_train import ROOT, _cli, _params, tiny_config


def _wait_for(path, proc, timeout=300):
  t0 = time.time()
  while not os.path.isdir(path):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() - t0 < timeout, f"{path} never appeared"
    time.sleep(0.2)


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_is_bitwise_identical(tiny_dirs, tmp_path):
  """One workdir: SIGKILL after the step-2 checkpoint, resume, SIGTERM after step 4 (a clean
  preemption), resume again: the final parameters equal an uninterrupted run's, bit for bit."""
  overrides = {"train.steps": 8, "train.ckpt_every": 2, "gkd.lmbda": 0.5}
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "import sys; sys.path.insert(0, %r)\n" % os.path.join(ROOT, "tests") +
      "from test_train import tiny_config\n"
      "def get_config():\n"
      f"  return tiny_config({str(tiny_dirs / 'teacher')!r}, **{overrides!r})\n")
  train.run(tiny_config(tiny_dirs / "teacher", **overrides), str(tmp_path / "ref"))
  want = _params(tmp_path / "ref", 8)

  work = tmp_path / "run"
  killed = _cli(cfg, work)
  _wait_for(work / "ckpt" / "2", killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  term = _cli(cfg, work)  # resumes, then is preempted
  _wait_for(work / "ckpt" / "4", term)
  term.send_signal(signal.SIGTERM)
  out = term.communicate()[0]
  assert term.returncode == 0 and '"status": "preempted"' in out, out
  assert '"start_step": 0' not in out  # it did resume
  again = _cli(cfg, work, "--gin_bindings=train.log_every = 2")
  out = again.communicate()[0]
  assert again.returncode == 0, out
  assert '"start_step": 0' not in out

  got = _params(work, 8)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


