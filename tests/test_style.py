"""The package has one code style: `ruff format gkd_jax` (config in pyproject.toml) changes nothing."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_is_formatted():
  ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
  p = subprocess.run([ruff, "format", "--check", "gkd_jax"], cwd=ROOT, capture_output=True,
                     text=True)
  assert p.returncode == 0, f"run `ruff format gkd_jax`:\n{p.stdout}{p.stderr}"
