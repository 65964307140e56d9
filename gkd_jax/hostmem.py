"""Host memory (the machine's RAM): hand freed heap back, and compile a jitted step apart
from its first run.

glibc keeps freed memory in its heap arenas. After XLA compiles a large program (hundreds
of MB of short-lived objects) or a model is built from host arrays, a process keeps that
garbage, and a step's own buffers come on top of it. ``release()`` returns it to the
system (``malloc_trim``). ``Precompiled`` compiles each new signature of a jitted function
ahead of its run (``lower(...).compile()``), releases, then runs the executable: a first
call then peaks at the step's own memory, not at compilation's garbage plus the step's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import jax


@functools.cache
def _malloc_trim():
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  return getattr(libc, "malloc_trim", None)  # glibc only


def release() -> bool:
  """Returns the heap's free pages to the system (glibc ``malloc_trim(0)``). False where the
  C library has no such call (nothing is done)."""
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True


def _signature(leaves, treedef):
  """What an executable is compiled for: the tree, and each leaf's aval and sharding."""
  return treedef, tuple(
    (jax.typeof(x), x.sharding if isinstance(x, jax.Array) else None) for x in leaves
  )


class Precompiled:
  """Calls ``jitted`` through executables compiled ahead, one per signature (the values of the
  static arguments; the tree, avals and shardings of the others), with ``release()`` after
  each compilation. Keyword arguments only; ``static`` names jitted's static arguments;
  ``compile`` compiles a signature ahead without running it. Called inside another trace (a
  tracer among the arguments), it calls ``jitted`` itself: the outer program compiles it."""

  def __init__(self, jitted, static):
    self.jitted = jitted
    self.static = frozenset(static)
    self._executables = {}

  def _executable(self, kwargs, leaves=None, treedef=None):
    """-> (the executable for kwargs' signature, whether it was compiled by this call);
    leaves, treedef: the non-static arguments' flattening, when the caller has it."""
    if leaves is None:
      leaves, treedef = jax.tree.flatten({k: v for k, v in kwargs.items() if k not in self.static})
    key = (
      tuple(sorted((k, v) for k, v in kwargs.items() if k in self.static)),
      _signature(leaves, treedef),
    )
    run = self._executables.get(key)
    if run is not None:
      return run, False
    run = self._executables[key] = self.jitted.lower(**kwargs).compile()
    release()
    return run, True

  def compile(self, **kwargs) -> bool:
    """Compiles for kwargs' signature without running (nothing is donated) -> whether it had
    to (False: compiled before)."""
    return self._executable(kwargs)[1]

  def __call__(self, **kwargs):
    dynamic = {k: v for k, v in kwargs.items() if k not in self.static}
    leaves, treedef = jax.tree.flatten(dynamic)  # once: the tracer check and the signature
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
      return self.jitted(**kwargs)
    run, _ = self._executable(kwargs, leaves, treedef)
    return run(**dynamic)

  def cache_size(self) -> int:
    """How many executables are held (one per signature met)."""
    return len(self._executables)

  def clear_cache(self):
    """Drops every executable (and jitted's own cache): the next call traces anew."""
    self._executables.clear()
    self.jitted.clear_cache()
