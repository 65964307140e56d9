"""Files: those shipped inside installed packages (data and model wheels), found without importing
them, and JSON files read with errors that name the file."""

from __future__ import annotations

import importlib.util
import json
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


def read_json(path: str) -> dict:
  """A JSON object from `path`; ValueError naming the file (and line/column) when it is not one."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(
      f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})"
    ) from None
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    ) from None
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
  return obj


def write_json(path: str, obj) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (a temporary file renamed over it)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
