"""Fused, chunked LM head + distillation loss: never holds ``[N, V]`` logits.

Student logits ``h_s @ W_s`` and teacher logits ``h_t @ W_t`` are computed one
chunk of tokens at a time inside a ``lax.scan``; the per-token divergence (or ATKD's
TKD/DKD) is reduced on the fly. Under differentiation a ``jax.custom_vjp`` computes
the gradients w.r.t. the student hidden states and head *in the same pass* (no
recomputation): dh_s chunks ``[C, D]`` and dW_s are the residuals. dW_s accumulates over
the chunks, or, when N <= 2D (fewer bytes than an accumulator's copies), is one matmul
over the chunks' stacked logit cotangents; either way peak memory is O(C*V + D*V)
instead of O(N*V). A head is ``[D, V]`` or, as a tied embedding is stored, ``[V, D]``
(layout "vd": no transposed copy). The teacher side is stop-gradient (zero cotangents).

Public entry: ``fused_loss``, computing a ``gkd_jax.losses`` object from the same pieces
(``terms``, ``weights``, ``uncertainty``) as the unfused ``losses.loss_sum``; the pure
functions in ``gkd_jax.divergences`` and ``gkd_jax.atkd`` stay the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gkd_jax import divergences as dv
from gkd_jax import losses, sparse
from gkd_jax.models import numerics

LAYOUTS = ("dv", "vd")  # a head W is [D, V] or [V, D]


def _dot(dot_dtype, layout):
  """-> s_dot(h_CxD, w): raw float32 logits ``h @ W`` (``numerics.dot``; dot_dtype None: h's
  dtype); w is ``[D, V]`` ("dv") or ``[V, D]`` ("vd")."""

  def s_dot(h_CxD, w):
    return numerics.dot(f"cd,{layout}->cv", h_CxD, w, dot_dtype or h_CxD.dtype, jnp.float32)

  return s_dot


def _chunks(x, n_chunks):
  return x.reshape((n_chunks, -1) + x.shape[1:])


def _scan_terms(s_dot, terms_fn, xs, n_chunks, grads, ws, wt, stack):
  """Scan over token chunks -> (loss_sum, metric_sums_K[, dh_s, dW_s or g_s]).

  ``s_dot(h_CxD, ws)`` gives a chunk's raw student logits z ``[C, V]``, ``terms_fn(z, ht, wt,
  tgt)`` its loss terms ``[C, K]``. With grads, a chunk's logit cotangent g gives dh (the dot's
  input gradient) at once, and dW accumulates in the scan's carry, or (stack) the chunks' g
  come back stacked ``[N, V]`` for one dW matmul later (``_weight_grad``).
  """

  def chunk_loss(z, ht, tgt, w, m):
    comps_CxK = terms_fn(z, ht, wt, tgt)
    loss = jnp.sum(jnp.where(w > 0, w * comps_CxK, 0.0))
    msum = jnp.sum(jnp.where(m[:, None] > 0, comps_CxK, 0.0), axis=0)
    return loss, msum

  def body(carry, x):
    hs, ht, tgt, w, m = x
    if not grads:
      loss, msum = chunk_loss(s_dot(hs, ws), ht, tgt, w, m)
      return (carry[0] + loss, carry[1] + msum), None
    z, dot_vjp = jax.vjp(s_dot, hs, ws)
    (loss, msum), g = jax.value_and_grad(chunk_loss, has_aux=True)(z, ht, tgt, w, m)
    dhs, dws = dot_vjp(g)
    carry = (carry[0] + loss, carry[1] + msum) + (() if stack else (carry[2] + dws,))
    return carry, (dhs.astype(hs.dtype), g if stack else None)

  k = xs[3].shape[-1]
  init = (jnp.zeros((), jnp.float32), jnp.zeros((k,), jnp.float32))
  if grads and not stack:
    init += (jnp.zeros(ws.shape, jnp.float32),)
  carry, out = jax.lax.scan(body, init, tuple(_chunks(x, n_chunks) for x in xs))
  if not grads:
    return carry
  n = xs[0].shape[0]
  dws_or_g = out[1].reshape(n, -1) if stack else carry[2]
  return carry[0], carry[1], out[0].reshape(xs[0].shape), dws_or_g


def _weight_grad(s_dot, hs_NxD, ws, g_NxV):
  """dW of ``s_dot(hs, ws)`` for the logit cotangent g (the dot's own backward matmul)."""
  _, w_vjp = jax.vjp(lambda w_: s_dot(hs_NxD, w_), ws)
  return w_vjp(g_NxV)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(s_dot, terms_fn, n_chunks, stack, hs_NxD, ws, ht_NxDt, wt, tgt_N, w_NxK, m_N):
  xs = (hs_NxD, ht_NxDt, tgt_N, w_NxK, m_N)
  return _scan_terms(s_dot, terms_fn, xs, n_chunks, False, ws, wt, stack)


def _fused_fwd(s_dot, terms_fn, n_chunks, stack, hs_NxD, ws, ht_NxDt, wt, tgt_N, w_NxK, m_N):
  xs = (hs_NxD, ht_NxDt, tgt_N, w_NxK, m_N)
  loss, msum, dhs, dws_or_g = _scan_terms(s_dot, terms_fn, xs, n_chunks, True, ws, wt, stack)
  if stack:
    return (loss, msum), (dhs, dws_or_g, hs_NxD, ws)
  return (loss, msum), (dhs, dws_or_g.astype(ws.dtype))


def _fused_bwd(s_dot, terms_fn, n_chunks, stack, res, cot):
  g = cot[0]  # metric sums are reported, not differentiated
  dhs = res[0]
  if stack:  # the cotangent scales g before the dW matmul rounds it, as unfused autodiff does
    _, g_NxV, hs, ws = res
    dws = _weight_grad(s_dot, hs, ws, g * g_NxV).astype(ws.dtype)
  else:
    dws = (g * res[1]).astype(res[1].dtype)
  # None: a zero cotangent for the teacher side, targets, weights and mask (no zero arrays)
  return ((g * dhs).astype(dhs.dtype), dws) + (None,) * 5


_fused.defvjp(_fused_fwd, _fused_bwd)


def _head_vocab(w, layout, d, what):
  """V of a head ``w`` in ``layout`` for hidden size d, checked."""
  if layout not in LAYOUTS:
    raise ValueError(f"{what}_layout must be one of {LAYOUTS}, got {layout!r}")
  if w.ndim != 2 or w.shape[layout.index("d")] != d:
    raise ValueError(
      f"{what} must be [D={d}, V] (or [V, D] with {what}_layout='vd'), got {tuple(w.shape)} "
      f"({layout!r})"
    )
  return w.shape[layout.index("v")]


def _check(hs, ws, ht, wt, mask, targets, loss, chunk_size, s_layout, t_layout):
  if hs.ndim < 2 or ht.ndim < 2:
    raise ValueError("student_hidden and teacher_hidden must be [..., D]")
  if hs.shape[:-1] != ht.shape[:-1] or tuple(mask.shape) != tuple(hs.shape[:-1]):
    raise ValueError(
      f"student_hidden {tuple(hs.shape)}, teacher_hidden {tuple(ht.shape)} and "
      f"mask {tuple(mask.shape)} must share the token axes [...]"
    )
  vs = _head_vocab(ws, s_layout, hs.shape[-1], "student_head")
  vt = _head_vocab(wt, t_layout, ht.shape[-1], "teacher_head")
  if vs != vt:
    raise ValueError(f"student_head and teacher_head vocab sizes differ: {vs} vs {vt}")
  if not (isinstance(chunk_size, int) and chunk_size >= 1):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if loss.needs_uncertainty:
    if targets is None:
      raise ValueError(f"loss {loss.name!r} needs targets (the next token of each position)")
    if tuple(targets.shape) != tuple(mask.shape):
      raise ValueError(f"targets must have shape {tuple(mask.shape)}, got {tuple(targets.shape)}")


def fused_loss(
  student_hidden,
  student_head,
  teacher_hidden,
  teacher_head,
  mask,
  targets=None,
  *,
  loss="fkl",
  temperature=1.0,
  vocab_size=None,
  reduction="token",
  student_softcap=None,
  teacher_softcap=None,
  chunk_size=1024,
  student_dot_dtype=None,
  teacher_dot_dtype=None,
  student_head_layout="dv",
  teacher_head_layout="dv",
  **params,
):
  """Chunked head + loss. Returns ``(loss, aux)`` equal to the unfused path.

  Args:
    student_hidden: ``[..., D]`` final student hidden states (e.g. ``[B, T, D]``).
    student_head: ``[D, V]`` student unembedding. Gradients flow to these two only.
    teacher_hidden, teacher_head: ``[..., Dt]`` and ``[Dt, V]`` (stop-gradient).
    mask: ``[...]`` 1 for tokens that count.
    targets: ``[...]`` int next-token ids; needed for ``loss="atkd"``.
    loss: a ``gkd_jax.losses`` object, or its name with its parameters as **params.
    reduction: "token" or "sequence" (divergences; ATKD has its own weighting).
    student_softcap, teacher_softcap: optional logit soft-capping before temperature.
    chunk_size: tokens per chunk; peak memory ~ chunk_size * V floats per buffer.
    student_dot_dtype, teacher_dot_dtype: the heads' matmul input dtypes (``numerics.dot``;
      None: the hidden states' dtype), as the unfused ``steps.logits``.
    student_head_layout, teacher_head_layout: "dv" (the head is ``[D, V]``) or "vd" (``[V, D]``,
      a tied embedding as stored: no transposed copy, and its gradient in that layout).
    **params: with a loss name, its parameters (beta, alpha; ATKD's easy_weight,
      hard_fraction, split, base).

  Per-token losses (the divergences) return ``(mean, {"sum", "count"})`` as ``masked_mean``;
  the others (ATKD) ``(loss, metrics)``: the mean of each term over the valid tokens, the hard
  fraction and the mean uncertainty, as ``atkd.atkd_loss``.
  """
  if isinstance(loss, str):
    loss = losses.get(loss, **params)
  elif params:
    raise ValueError(f"parameters {sorted(params)} go into the loss object, not fused_loss")
  _check(
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    mask,
    targets,
    loss,
    chunk_size,
    student_head_layout,
    teacher_head_layout,
  )
  temperature = dv.check_temperature(temperature)
  dv.check_vocab_size(vocab_size, student_head.shape[student_head_layout.index("v")])
  at_t = {"temperature": temperature, "vocab_size": vocab_size}

  t_dot = _dot(teacher_dot_dtype, teacher_head_layout)

  def teacher_u(ht_c, wt, tgt_c):
    return loss.uncertainty(dv.softcap(t_dot(ht_c, wt), teacher_softcap), tgt_c, **at_t)

  def terms_fn(zs_c, ht_c, wt, tgt_c):
    s_logits = dv.softcap(zs_c, student_softcap)
    t_logits = dv.softcap(t_dot(ht_c, wt), teacher_softcap)
    return jnp.stack(loss.terms(s_logits, t_logits, tgt_c, **at_t), axis=-1)

  return _chunked(
    loss,
    student_dot_dtype,
    student_head_layout,
    terms_fn,
    teacher_u,
    student_hidden,
    student_head,
    teacher_hidden,
    teacher_head,
    mask,
    targets,
    reduction,
    chunk_size,
  )


def fused_cached_loss(
  student_hidden,
  student_head,
  teacher_ids,
  teacher_logp,
  teacher_tail,
  mask,
  targets=None,
  *,
  loss,
  temperature=1.0,
  vocab_size=None,
  reduction="token",
  student_softcap=None,
  chunk_size=1024,
  student_dot_dtype=None,
  student_head_layout="dv",
):
  """``fused_loss`` against a cached sparse teacher (``gkd_jax.sparse``): the teacher's top-k
  ids ``[..., k]``, log-probs ``[..., k]`` and log tail mass ``[...]`` instead of its hidden
  states and head. Equals ``sparse.loss_sum``; peak memory O(chunk_size * V) as fused_loss."""
  if tuple(teacher_ids.shape[:-1]) != tuple(mask.shape) or teacher_ids.shape != teacher_logp.shape:
    raise ValueError(
      f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logp {tuple(teacher_logp.shape)} "
      f"must be [..., k] over the mask's tokens {tuple(mask.shape)}"
    )
  k = teacher_ids.shape[-1]
  # the teacher's rows ride in the scan as one float array: ids (exact below 2**24), log-probs,
  # tail; the fused kernel's teacher head is a dummy
  packed = jnp.concatenate(
    [
      teacher_ids.astype(jnp.float32),
      teacher_logp.astype(jnp.float32),
      teacher_tail.astype(jnp.float32)[..., None],
    ],
    axis=-1,
  )
  temperature = dv.check_temperature(temperature)
  v = _head_vocab(student_head, student_head_layout, student_hidden.shape[-1], "student_head")
  dv.check_vocab_size(vocab_size, v)

  def unpack(t_c, tgt_c):
    ids = t_c[:, :k].astype(jnp.int32)
    lt = sparse.teacher_buckets(t_c[:, k : 2 * k], t_c[:, 2 * k])
    return ids, lt, sparse.target_buckets(ids, tgt_c)

  def teacher_u(t_c, wt, tgt_c):
    del wt
    _, lt, tb = unpack(t_c, tgt_c)
    return loss.uncertainty(lt, tb, temperature=1.0)

  def terms_fn(zs_c, t_c, wt, tgt_c):
    del wt
    ids, lt, tb = unpack(t_c, tgt_c)
    ls = sparse.student_buckets(
      dv.softcap(zs_c, student_softcap),
      ids,
      temperature=temperature,
      vocab_size=vocab_size,
    )
    return jnp.stack(loss.terms(ls, lt, tb, temperature=1.0), axis=-1)

  dummy = jnp.zeros((packed.shape[-1], 1), jnp.float32)
  return _chunked(
    loss,
    student_dot_dtype,
    student_head_layout,
    terms_fn,
    teacher_u,
    student_hidden,
    student_head,
    packed,
    dummy,
    mask,
    targets,
    reduction,
    chunk_size,
  )


def _chunked(
  loss,
  student_dot_dtype,
  student_head_layout,
  terms_fn,
  teacher_u,
  student_hidden,
  student_head,
  teacher_x,
  teacher_w,
  mask,
  targets,
  reduction,
  chunk_size,
):
  """The chunked loss: ``teacher_u(t_c, W_t, tgt_c)`` pre-pass (losses that need the teacher's
  uncertainty), the loss's weights, then ``terms_fn(z_c, t_c, W_t, tgt_c)`` per chunk under the
  fused custom VJP, z_c the chunk's raw student logits (``_dot``)."""
  teacher_x = jax.lax.stop_gradient(teacher_x)
  teacher_w = jax.lax.stop_gradient(teacher_w)
  tok_shape = mask.shape
  n = mask.size
  chunk = min(chunk_size, n)
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  flat = lambda x: jnp.pad(
    x.reshape((n,) + x.shape[len(tok_shape) :]), [(0, pad)] + [(0, 0)] * (x.ndim - len(tok_shape))
  )
  hs, ht = flat(student_hidden), flat(teacher_x)
  tgt = flat(jnp.zeros(tok_shape, jnp.int32) if targets is None else targets.astype(jnp.int32))

  u = None
  if loss.needs_uncertainty:  # pre-pass: the teacher's uncertainty decides the weights

    def pre(_, x):
      ht_c, tgt_c = x
      return None, teacher_u(ht_c, teacher_w, tgt_c)

    _, u = jax.lax.scan(pre, None, (_chunks(ht, n_chunks), _chunks(tgt, n_chunks)))
    u = jax.lax.stop_gradient(u.reshape(-1)[:n].reshape(tok_shape))
  ws, count, hard = loss.weights(mask, reduction, u)

  # dW from the chunks' logit cotangents, stacked [N, V] float32, when they take fewer bytes
  # than a dW accumulator's extra copies in the scan (about two [D, V] float32)
  stack = n_chunks > 1 and n + pad <= 2 * hs.shape[-1]
  m = mask.astype(jnp.float32)
  total, msum = _fused(
    _dot(student_dot_dtype, student_head_layout),
    terms_fn,
    n_chunks,
    stack,
    hs,
    student_head,
    ht,
    teacher_w,
    tgt,
    jnp.stack([flat(w) for w in ws], axis=-1),
    flat(m) if not loss.per_token else jnp.zeros((n + pad,), jnp.float32),
  )
  if loss.per_token:
    return total / jnp.maximum(count, 1.0), {"sum": total, "count": count}
  nv = jnp.maximum(jnp.sum(m), 1.0)
  aux = {name: msum[i] / nv for i, name in enumerate(loss.term_names)}
  if hard is not None:
    aux["hard_fraction"] = jnp.sum(hard) / nv
  if u is not None:
    aux["uncertainty"] = jnp.sum(jnp.where(m > 0, u * m, 0.0)) / nv
  return total, aux
