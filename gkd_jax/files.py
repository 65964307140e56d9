"""Files: those shipped inside installed packages (data and model wheels), found without importing
them, and files read and written through `etils.epath`, so that a path may be local or a URL
(gs://bucket/dir), with errors that name the file.

An object store (gs://) has whole objects only: no appends, no renames, no directories. Writes here
replace a whole file, atomically (local: a temporary file renamed over it; an object store: one
object write, which is atomic already). etils.epath loads on first use.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil


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


def path(*parts):
  """``parts`` joined (a local path or a URL such as gs://bucket/dir) as an ``etils.epath.Path``."""
  from etils import epath

  return epath.Path(*parts)


def is_local(p) -> bool:
  """True for a local path, False for a URL (gs://...)."""
  return "://" not in os.fspath(p)


def absolute(p) -> str:
  """A local path made absolute; a URL as it is (``os.path.abspath`` would mangle gs://)."""
  return os.path.abspath(p) if is_local(p) else os.fspath(p)


def read_text(p) -> str:
  """The UTF-8 text of file ``p``."""
  return path(p).read_bytes().decode("utf-8")


def write_bytes(p, data: bytes) -> None:
  """Writes ``data`` to ``p`` atomically (locally a temporary file renamed over it)."""
  if not is_local(p):
    path(p).write_bytes(data)
    return
  tmp = path(f"{os.fspath(p)}.tmp")
  tmp.write_bytes(data)
  tmp.replace(p)


def write_text(p, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``p`` atomically."""
  write_bytes(p, text.encode("utf-8"))


def read_json(p) -> dict:
  """A JSON object from ``p``; ValueError naming the file (and line/column) when it is not one."""
  try:
    obj = json.loads(read_text(p))
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise ValueError(
      f"{p}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    ) from None
  if not isinstance(obj, dict):
    raise ValueError(f"{p}: expected a JSON object, got {type(obj).__name__}")
  return obj


def write_json(p, obj, default=None) -> None:
  """Writes ``obj`` as indented JSON to ``p`` atomically; ``default`` as in ``json.dumps``."""
  write_text(p, json.dumps(obj, indent=2, default=default))


def move(src, dst) -> None:
  """Moves file or directory ``src`` to ``dst``, making dst's parents. Across or within an object
  store (no renames) every file is copied, then ``src`` deleted."""
  if is_local(src) and is_local(dst):  # shutil.move also crosses filesystems
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    shutil.move(src, dst)
    return
  src, dst = path(src), path(dst)
  _copy_tree(src, dst)
  src.rmtree()


def _copy_tree(src, dst) -> None:
  if not src.is_dir():
    src.copy(dst)
    return
  dst.mkdir(parents=True, exist_ok=True)
  for child in src.iterdir():
    _copy_tree(child, dst / child.name)
