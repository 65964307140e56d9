"""Fused, chunked LM head + distillation loss: never holds ``[N, V]`` logits.

Student logits ``h_s @ W_s`` and teacher logits ``h_t @ W_t`` are computed one
chunk of tokens at a time inside a ``lax.scan``; the per-token divergence (or ATKD's
TKD/DKD) is reduced on the fly. Under differentiation a ``jax.custom_vjp`` computes
the gradients w.r.t. the student hidden states and head *in the same pass* (no
recomputation): dh_s chunks ``[C, D]`` and an accumulated dW_s ``[D, V]`` are the
residuals, so peak memory is O(C*V + D*V) instead of O(N*V). The teacher side is
stop-gradient (its cotangents are zero).

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


def _logits(h_CxD, w_DxV, cap, dot_dtype=None):
  z = numerics.dot("cd,dv->cv", h_CxD, w_DxV, dot_dtype or h_CxD.dtype, jnp.float32)
  return dv.softcap(z, cap)


def _chunks(x, n_chunks):
  return x.reshape((n_chunks, -1) + x.shape[1:])


def _scan_terms(terms_fn, xs, n_chunks, grads, ws_DxV, wt_DtxV):
  """Scan ``terms_fn`` over chunks; returns (loss_sum, metric_sums_K[, dh_s, dW_s])."""

  def chunk_loss(hs, ws, ht, tgt, w, m):
    comps_CxK = terms_fn(hs, ws, ht, wt_DtxV, tgt)
    loss = jnp.sum(jnp.where(w > 0, w * comps_CxK, 0.0))
    msum = jnp.sum(jnp.where(m[:, None] > 0, comps_CxK, 0.0), axis=0)
    return loss, msum

  def body(carry, x):
    hs, ht, tgt, w, m = x
    if grads:
      loss_acc, msum_acc, dws_acc = carry
      (loss, msum), (dhs, dws) = jax.value_and_grad(chunk_loss, argnums=(0, 1), has_aux=True)(
        hs, ws_DxV, ht, tgt, w, m
      )
      return (loss_acc + loss, msum_acc + msum, dws_acc + dws), dhs.astype(hs.dtype)
    loss_acc, msum_acc = carry
    loss, msum = chunk_loss(hs, ws_DxV, ht, tgt, w, m)
    return (loss_acc + loss, msum_acc + msum), None

  k = xs[3].shape[-1]
  init = (jnp.zeros((), jnp.float32), jnp.zeros((k,), jnp.float32))
  if grads:
    init += (jnp.zeros(ws_DxV.shape, jnp.float32),)
  carry, dhs = jax.lax.scan(body, init, tuple(_chunks(x, n_chunks) for x in xs))
  if grads:
    return carry[0], carry[1], dhs.reshape(xs[0].shape), carry[2]
  return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(terms_fn, n_chunks, hs_NxD, ws_DxV, ht_NxDt, wt_DtxV, tgt_N, w_NxK, m_N):
  xs = (hs_NxD, ht_NxDt, tgt_N, w_NxK, m_N)
  return _scan_terms(terms_fn, xs, n_chunks, False, ws_DxV, wt_DtxV)


def _fused_fwd(terms_fn, n_chunks, hs_NxD, ws_DxV, ht_NxDt, wt_DtxV, tgt_N, w_NxK, m_N):
  xs = (hs_NxD, ht_NxDt, tgt_N, w_NxK, m_N)
  loss, msum, dhs, dws = _scan_terms(terms_fn, xs, n_chunks, True, ws_DxV, wt_DtxV)
  zeros = (
    jnp.zeros_like(ht_NxDt),
    jnp.zeros_like(wt_DtxV),
    None,
    jnp.zeros_like(w_NxK),
    jnp.zeros_like(m_N),
  )
  return (loss, msum), (dhs, dws.astype(ws_DxV.dtype), zeros)


def _fused_bwd(terms_fn, n_chunks, res, cot):
  dhs, dws, zeros = res
  g = cot[0]  # metric sums are reported, not differentiated
  return ((g * dhs).astype(dhs.dtype), (g * dws).astype(dws.dtype)) + zeros


_fused.defvjp(_fused_fwd, _fused_bwd)


def _check(hs, ws, ht, wt, mask, targets, loss, chunk_size):
  if hs.ndim < 2 or ht.ndim < 2:
    raise ValueError("student_hidden and teacher_hidden must be [..., D]")
  if hs.shape[:-1] != ht.shape[:-1] or tuple(mask.shape) != tuple(hs.shape[:-1]):
    raise ValueError(
      f"student_hidden {tuple(hs.shape)}, teacher_hidden {tuple(ht.shape)} and "
      f"mask {tuple(mask.shape)} must share the token axes [...]"
    )
  if ws.ndim != 2 or wt.ndim != 2 or ws.shape[0] != hs.shape[-1] or wt.shape[0] != ht.shape[-1]:
    raise ValueError(
      f"student_head must be [D={hs.shape[-1]}, V] and teacher_head "
      f"[Dt={ht.shape[-1]}, V], got {tuple(ws.shape)} and {tuple(wt.shape)}"
    )
  if ws.shape[1] != wt.shape[1]:
    raise ValueError(
      f"student_head and teacher_head vocab sizes differ: {ws.shape[1]} vs {wt.shape[1]}"
    )
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
    student_hidden, student_head, teacher_hidden, teacher_head, mask, targets, loss, chunk_size
  )
  temperature = dv.check_temperature(temperature)
  dv.check_vocab_size(vocab_size, student_head.shape[1])
  at_t = {"temperature": temperature, "vocab_size": vocab_size}

  def teacher_u(ht_c, wt, tgt_c):
    return loss.uncertainty(_logits(ht_c, wt, teacher_softcap, teacher_dot_dtype), tgt_c, **at_t)

  def terms_fn(hs_c, ws_, ht_c, wt, tgt_c):
    s_logits = _logits(hs_c, ws_, student_softcap, student_dot_dtype)
    t_logits = _logits(ht_c, wt, teacher_softcap, teacher_dot_dtype)
    return jnp.stack(loss.terms(s_logits, t_logits, tgt_c, **at_t), axis=-1)

  return _chunked(
    loss,
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
  dv.check_vocab_size(vocab_size, student_head.shape[1])

  def unpack(t_c, tgt_c):
    ids = t_c[:, :k].astype(jnp.int32)
    lt = sparse.teacher_buckets(t_c[:, k : 2 * k], t_c[:, 2 * k])
    return ids, lt, sparse.target_buckets(ids, tgt_c)

  def teacher_u(t_c, wt, tgt_c):
    del wt
    _, lt, tb = unpack(t_c, tgt_c)
    return loss.uncertainty(lt, tb, temperature=1.0)

  def terms_fn(hs_c, ws_, t_c, wt, tgt_c):
    del wt
    ids, lt, tb = unpack(t_c, tgt_c)
    ls = sparse.student_buckets(
      _logits(hs_c, ws_, student_softcap, student_dot_dtype),
      ids,
      temperature=temperature,
      vocab_size=vocab_size,
    )
    return jnp.stack(loss.terms(ls, lt, tb, temperature=1.0), axis=-1)

  dummy = jnp.zeros((packed.shape[-1], 1), jnp.float32)
  return _chunked(
    loss,
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
  uncertainty), the loss's weights, then ``terms_fn`` per chunk under the fused custom VJP."""
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

  m = mask.astype(jnp.float32)
  total, msum = _fused(
    terms_fn,
    n_chunks,
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
