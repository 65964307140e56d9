"""Matmul numerics shared by the model families, the loss heads and the sampler.

``dot`` is every weight matmul: inputs rounded to a matmul dtype, float32 accumulation. With a
narrower matmul dtype than the operands (e.g. bfloat16 for float32 weights and activations,
a TPU's default precision for float32 matmuls) its gradient is that precision too: each
backward matmul takes the cotangent and the saved operand rounded to the matmul dtype,
accumulates in float32, and the cotangents keep the operands' own dtypes (no bfloat16 rounding
of a float32 weight's gradient). ``with_dot_dtype`` stores a model's matrices in its matmul
dtype, which changes no number the model computes (a frozen teacher, the sampler).

On CPU, a float32 or bfloat16 weight matmul over a few rows (a decode step's 2-64 tokens) runs
as ``W[out, in] @ x[in, rows]`` (``_einsum``): CPU XLA's dot is up to 1.5x faster in that layout
than in ``x @ W`` (see README, Sampling). Same products and float32 sums, another layout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _operands(eq: str):
  """'ab,bc->ac' -> ('ab', 'bc', 'ac'), checked: the backward einsums exist when every index of
  each operand appears in the other operand or in the output."""
  if "..." in eq or "->" not in eq or eq.count(",") != 1:
    raise ValueError(f"dot: {eq!r} must be an explicit two-operand einsum 'x,w->out'")
  ins, out = eq.replace(" ", "").split("->")
  a, b = ins.split(",")
  for x, other in ((a, b), (b, a)):
    if len(set(x)) != len(x) or not set(x) <= set(other) | set(out):
      raise ValueError(f"dot: {eq!r}: an index of {x!r} is summed within it or repeated")
  return a, b, out


# matmul dtype -> the rows of x (the product of its free dims) for which a CPU weight matmul
# runs weight-major; and the least weight size. Measured (README, Sampling): float32 on a 2-core
# AVX2 EPYC; bfloat16 on a 2-core AMX Xeon (a batch-8 decode 1.5x faster, batch 32 1.2x; on the
# AVX2 EPYC batch 32 1.3x faster, batch 8 1.2x slower). A dtype left out, or {}, keeps x @ W.
CPU_WEIGHT_MAJOR_ROWS = {"float32": (2, 64), "bfloat16": (2, 64)}
CPU_WEIGHT_MAJOR_MIN_SIZE = 1 << 16


def _einsum(eq: str, x, w):
  """``einsum(eq, x, w)`` with float32 accumulation. On CPU, for x and w of one dtype in
  ``CPU_WEIGHT_MAJOR_ROWS``, rows of x in its range and a weight of at least 2^16 entries: as
  ``W[w_free, summed] @ x[summed, x_free]``, the result transposed back, each operand and the
  product materialised in that layout (``optimization_barrier`` keeps XLA from folding the
  transposes back into the dot; the weight's transpose is loop-invariant, hoisted out of a
  decode loop by XLA). Same products and float32 sums as the plain einsum, in another layout;
  an index shared by x, w and the output (a batch index) takes the plain einsum. An x with one
  free axis (the fused head's ``[C, D]`` chunk) gets a unit axis before it: given
  ``W[V, D] @ x[D, C]`` in bfloat16, CPU XLA converted both to float32 (the whole weight, on
  every call: 10x slower at V = 49152, 64 rows), and ``x[D, 1, C]`` (a decode's shape) it
  runs in bfloat16."""
  a, b, out = _operands(eq)
  summed = [i for i in a if i in b]
  x_free = [i for i in a if i not in b]
  w_free = [i for i in b if i not in a]
  rows = int(np.prod([x.shape[a.index(i)] for i in x_free]))
  lo_hi = CPU_WEIGHT_MAJOR_ROWS.get(x.dtype.name) if x.dtype == w.dtype else None
  if (
    jax.default_backend() != "cpu"
    or not lo_hi
    or not lo_hi[0] <= rows <= lo_hi[1]
    or w.size < CPU_WEIGHT_MAJOR_MIN_SIZE
    or any(i in out for i in summed)
  ):
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32)
  keep = jax.lax.optimization_barrier
  perm = lambda src, dst: [src.index(i) for i in dst]
  w_T = keep(jnp.transpose(w, perm(b, w_free + summed)))
  x_T = jnp.transpose(x, perm(a, summed + x_free))
  unit = len(x_free) == 1  # one free axis of x: a unit axis before it (see the docstring)
  if unit:
    x_T = jnp.expand_dims(x_T, len(summed))
    x_free = [next(i for i in "abcdefghijklmnopqrstuvwxyz" if i not in a + b + out)] + x_free
  x_T = keep(x_T)
  ws, ss, xs = "".join(w_free), "".join(summed), "".join(x_free)
  y_T = keep(
    jnp.einsum(f"{ws}{ss},{ss}{xs}->{ws}{xs}", w_T, x_T, preferred_element_type=jnp.float32)
  )
  if unit:
    y_T = jnp.squeeze(y_T, len(w_free))
    xs = xs[1:]
  return jnp.transpose(y_T, perm(ws + xs, out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rounded_dot(eq, dtype, out_dtype, x, w):
  return _einsum(eq, x.astype(dtype), w.astype(dtype)).astype(out_dtype)


def _rounded_fwd(eq, dtype, out_dtype, x, w):
  xr, wr = x.astype(dtype), w.astype(dtype)  # saved rounded: half the residual bytes
  out = _einsum(eq, xr, wr).astype(out_dtype)
  return out, (xr, wr, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _rounded_bwd(eq, dtype, out_dtype, res, g_out):
  xr, wr, x0, w0 = res
  a, b, out = _operands(eq)
  g = g_out.astype(dtype)
  dx = jnp.einsum(f"{out},{b}->{a}", g, wr, preferred_element_type=jnp.float32)
  dw = jnp.einsum(f"{a},{out}->{b}", xr, g, preferred_element_type=jnp.float32)
  if jax.default_backend() == "cpu":
    # keeps XLA from folding a consumer's transpose (a tied head's embed.T) into this dot: CPU
    # XLA has no bf16 x bf16 -> f32 kernel for the dot layout that folding makes
    dw = jax.lax.optimization_barrier(dw)
  return dx.astype(x0.dtype), dw.astype(w0.dtype)


_rounded_dot.defvjp(_rounded_fwd, _rounded_bwd)


def dot(eq: str, x, w, dtype, out_dtype=None):
  """``einsum(eq, x, w)`` with both inputs rounded to ``dtype`` and float32 accumulation; the
  result in ``out_dtype`` (default x's dtype). When ``dtype`` is narrower than x or w, the
  backward matmuls round to ``dtype`` as well and the gradients keep x's and w's dtypes."""
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  if x.dtype == dtype and w.dtype == dtype:  # nothing to round: plain autodiff
    return _einsum(eq, x, w).astype(out_dtype)
  _operands(eq)
  return _rounded_dot(eq, dtype, out_dtype, x, w)


# CPU feature flags (/proc/cpuinfo) of native bfloat16 matrix arithmetic: Intel AMX-BF16 and
# AVX512-BF16 (AMD Zen 4 too). Without them (AVX2, e.g. a Zen 3 EPYC) CPU XLA widens bfloat16
# to float32: a 256x576 @ 576x1536 matmul there ran at 60-70 GFLOP/s against 162 in float32.
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def cpu_flags() -> frozenset:
  """The x86 feature flags of this machine's CPU (empty where /proc/cpuinfo has none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return frozenset(line.split(":", 1)[1].split())
  except OSError:
    pass
  return frozenset()


def native_bf16_dots(platform: str | None = None) -> bool:
  """Whether ``platform`` (default: JAX's default backend) multiplies bfloat16 matrices faster
  than float32 ones: TPUs and GPUs do; a CPU does with ``NATIVE_BF16_CPU_FLAGS``."""
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return True
  return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


def resolve_dot_dtype(value: str, platform: str | None = None) -> str:
  """A config's dot_dtype with "auto" resolved: "bfloat16" where ``native_bf16_dots``, else ""
  (the model's own numerics). Any other value is returned as it is."""
  if value != "auto":
    return value
  return "bfloat16" if native_bf16_dots(platform) else ""


def with_dot_dtype(graphdef, state, dot_dtype):
  """Merges the model with ``cfg.dot_dtype = dot_dtype`` and its matrices (>= 2-D float params)
  stored in dot_dtype. The cast changes no number: the model rounds every matrix to dot_dtype
  where it uses it (``dot``); storing them rounded halves their bytes (bfloat16). None: the
  model as it is."""
  if dot_dtype is None:
    return nnx.merge(graphdef, state)
  dt = jnp.dtype(dot_dtype)
  cast = lambda a: a.astype(dt) if a.ndim >= 2 and jnp.issubdtype(a.dtype, jnp.floating) else a
  model = nnx.merge(graphdef, jax.tree.map(cast, state))
  for _, m in nnx.iter_modules(model):
    if dataclasses.is_dataclass(getattr(m, "cfg", None)):
      m.cfg = dataclasses.replace(m.cfg, dot_dtype=dt.name)
  return model
