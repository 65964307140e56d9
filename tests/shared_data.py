"""Where the tests find ../shared/data (or $GKD_SHARED_DATA)."""

import os

import pytest

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def need(path):
  """Return `path`; a missing file fails under CI=true and skips elsewhere."""
  if not os.path.exists(path):
    message = f"data file missing: {path} (set $GKD_SHARED_DATA to the shared data folder)"
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)
  return path


def data_dir():
  return need(os.path.abspath(os.environ.get("GKD_SHARED_DATA", DEFAULT_DATA_DIR)))
