"""hostmem: heap pages handed back to the system; the ahead-of-time compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd_jax import hostmem


def _rss_mb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  pytest.skip("no /proc/self/status")


def test_release_returns_freed_heap_pages():
  if not hostmem.release():
    pytest.skip("no glibc malloc_trim here")
  # 300 MB of 100 kB blocks (below glibc's mmap threshold: on the heap), written to
  blocks = [bytearray(b"x" * 100_000) for _ in range(3000)]
  top = blocks[-1]  # the last block stays: the heap cannot shrink from its top by itself
  del blocks
  before = _rss_mb()
  assert hostmem.release()
  after = _rss_mb()
  assert before - after > 200, (before, after)
  del top


def test_precompiled_compiles_once_per_signature_and_donates():
  traces = []

  def f(x, y, *, scale):
    traces.append(x.shape)
    return x * scale + y

  jitted = jax.jit(f, static_argnames=("scale",), donate_argnames=("x",))
  run = hostmem.Precompiled(jitted, ("scale",))
  x = jnp.arange(3.0)
  out = run(x=x, y=jnp.ones(3), scale=2.0)
  np.testing.assert_array_equal(out, [1.0, 3.0, 5.0])
  assert x.is_deleted()  # the executable keeps jit's donation
  run(x=jnp.zeros(3), y=jnp.ones(3), scale=2.0)
  assert len(traces) == 1  # the same signature: one trace, one executable, no jit retrace
  run(x=jnp.zeros(4), y=jnp.ones(4), scale=2.0)  # a new shape
  np.testing.assert_array_equal(run(x=jnp.ones(3), y=jnp.ones(3), scale=3.0), [4.0] * 3)
  run(x=jnp.ones(3, jnp.int32), y=jnp.ones(3, jnp.int32), scale=3.0)  # a new dtype
  assert len(traces) == 4 and len(run._executables) == 4


def test_precompiled_compile_ahead_runs_nothing_and_is_reused():
  traces = []

  def f(x, *, scale):
    traces.append(x.shape)
    return x * scale

  run = hostmem.Precompiled(
    jax.jit(f, static_argnames=("scale",), donate_argnames=("x",)), ("scale",)
  )
  x = jnp.arange(3.0)
  assert run.compile(x=x, scale=2.0) is True
  assert not x.is_deleted()  # compiling donates nothing
  assert run.compile(x=jnp.zeros(3), scale=2.0) is False  # the same signature: compiled before
  assert run.compile(x=jnp.zeros(5), scale=2.0) is True  # a new shape compiles
  np.testing.assert_array_equal(run(x=x, scale=2.0), [0.0, 2.0, 4.0])
  run(x=jnp.ones(5), scale=2.0)
  assert len(traces) == 2 and len(run._executables) == 2  # the calls reused both executables


def test_precompiled_inside_another_trace_defers_to_the_outer_program():
  traces = []

  def f(x, *, scale):
    traces.append(x.shape)
    return x * scale

  run = hostmem.Precompiled(jax.jit(f, static_argnames=("scale",)), ("scale",))
  outer = jax.jit(lambda x: run(x=x, scale=3.0) + 1.0)
  np.testing.assert_array_equal(outer(jnp.arange(3.0)), [1.0, 4.0, 7.0])
  assert run.cache_size() == 0  # no executable of its own: the outer one holds f
  run(x=jnp.arange(3.0), scale=3.0)
  assert run.cache_size() == 1
  before = len(traces)
  run.clear_cache()
  assert run.cache_size() == 0
  run(x=jnp.arange(3.0), scale=3.0)
  assert run.cache_size() == 1 and len(traces) == before + 1  # cleared: traced anew
