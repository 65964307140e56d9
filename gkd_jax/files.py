"""Files shipped inside installed packages (data and model wheels), found without importing them."""

from __future__ import annotations

import importlib.util
import os


def package_file(package: str, relpath: str) -> str | None:
  """Path of ``relpath`` inside ``package``; None when the package or the file is missing.

  Uses ``find_spec`` only: such packages' ``__init__`` often pulls heavy dependencies.
  """
  spec = importlib.util.find_spec(package)
  for location in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(location, relpath)
    if os.path.isfile(path):
      return path
  return None
