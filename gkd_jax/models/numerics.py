"""Matmul numerics shared by the model families, the loss heads and the sampler.

``dot`` is every weight matmul: inputs rounded to a matmul dtype, float32 accumulation. With a
narrower matmul dtype than the operands (e.g. bfloat16 for float32 weights and activations,
a TPU's default precision for float32 matmuls) its gradient is that precision too: each
backward matmul takes the cotangent and the saved operand rounded to the matmul dtype,
accumulates in float32, and the cotangents keep the operands' own dtypes (no bfloat16 rounding
of a float32 weight's gradient). ``with_dot_dtype`` stores a model's matrices in its matmul
dtype, which changes no number the model computes (a frozen teacher, the sampler).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _rounded_dot(eq, dtype, out_dtype, x, w):
  return jnp.einsum(
    eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
  ).astype(out_dtype)


def _rounded_fwd(eq, dtype, out_dtype, x, w):
  xr, wr = x.astype(dtype), w.astype(dtype)  # saved rounded: half the residual bytes
  out = jnp.einsum(eq, xr, wr, preferred_element_type=jnp.float32).astype(out_dtype)
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
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(out_dtype)
  _operands(eq)
  return _rounded_dot(eq, dtype, out_dtype, x, w)


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
