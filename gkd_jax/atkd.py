"""ATKD (Zhong et al., ACL 2024): adaptive teaching by token difficulty.

With g the target token (the next token of the trained sequence), p_g its
probability and u = 1 - p_T(g) the teacher's uncertainty, KL splits exactly as

    KL(P_T || P_S) = TKD + u * DKD
    TKD = KL([p_T(g), 1-p_T(g)] || [p_S(g), 1-p_S(g)])       (binary, target-oriented)
    DKD = KL(P_T(.|not g) || P_S(.|not g))                   (renormalised non-target)

Hard tokens are the valid tokens with u >= threshold, the threshold being the lower
median of u over the valid tokens (torch.median: the lower of the two middle values
for an even count), so ties are hard; this is the official rule (WHU-ZQH/ATKD,
``DistillTrainer.atkd``), which takes one threshold per batch (split "batch", the
default; "sequence" applies it within each row). ``hard_fraction`` generalises the
median to a lower quantile (see ``hard_mask``); 0.5 is the official rule.
Easy tokens learn DKD only, hard ones TKD + DKD, and
loss = easy_weight * mean_easy(DKD) + (1 - easy_weight) * mean_hard(TKD + DKD),
each mean over its own tokens (an empty group contributes 0).
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp

from gkd_jax import divergences as dv

SPLITS = ("sequence", "batch")
BASES = ("fkl", "rkl")


def check_targets(logits, targets) -> None:
  if tuple(targets.shape) != tuple(logits.shape[:-1]):
    raise ValueError(
      f"targets must have shape {tuple(logits.shape[:-1])} (logits without "
      f"the vocab axis), got {tuple(targets.shape)}"
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")


def check_params(easy_weight, hard_fraction, split, base) -> None:
  dv.check_unit("easy_weight", easy_weight)
  dv.check_unit("hard_fraction", hard_fraction)
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
  if base not in BASES:
    raise ValueError(f"unknown base {base!r}; allowed: {', '.join(BASES)}")


def _target_parts(logp_xV, targets_x):
  """-> (log p(g) [x], log(1-p(g)) [x], renormalised non-target log-probs [x, V], is_g [x, V])."""
  v = logp_xV.shape[-1]
  tgt = jnp.clip(targets_x, 0, v - 1)
  is_g = jnp.arange(v) == tgt[..., None]
  lp_g = jnp.take_along_axis(logp_xV, tgt[..., None], axis=-1)[..., 0]
  # log(1 - p_g) as a logsumexp over the other tokens: exact even when p_g ~ 1.
  l1m = jax.nn.logsumexp(logp_xV, axis=-1, where=~is_g)
  return lp_g, l1m, logp_xV - l1m[..., None], is_g


def _tkd_dkd(parts_p, parts_q):
  """Binary KL on [p_g, 1-p_g] and non-target KL, both KL(P||Q), per token."""
  lp_g, l1m_p, lq_p, is_g = parts_p
  lq_g, l1m_q, lq_q, _ = parts_q
  tkd = jnp.exp(lp_g) * (lp_g - lq_g) + jnp.exp(l1m_p) * (l1m_p - l1m_q)
  dkd = jnp.sum(jnp.where(is_g, 0.0, jnp.exp(lq_p) * (lq_p - lq_q)), axis=-1)
  return tkd, dkd


def decompose_log_probs(logp_s, logp_t, targets, base: str = "fkl"):
  """From float32 log-probs ``[..., V]`` -> dict of per-token ``tkd``, ``dkd``, ``uncertainty``.

  base "fkl": KL(teacher||student) pieces; "rkl": KL(student||teacher) pieces. The
  uncertainty is always the teacher's, 1 - p_T(g).
  """
  parts_s, parts_t = _target_parts(logp_s, targets), _target_parts(logp_t, targets)
  if base == "fkl":
    tkd, dkd = _tkd_dkd(parts_t, parts_s)
  else:
    tkd, dkd = _tkd_dkd(parts_s, parts_t)
  return {"tkd": tkd, "dkd": dkd, "uncertainty": -jnp.expm1(parts_t[0])}


def decompose(student_logits, teacher_logits, targets, *, temperature=1.0, vocab_size=None):
  """Split KL(P_T||P_S) per token: returns dict ``tkd``, ``dkd``, ``uncertainty`` ``[...]``.

  Shapes: logits ``[..., V]``, targets ``[...]`` int. KL == tkd + uncertainty * dkd.
  """
  ls, lt = dv.pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  check_targets(student_logits, targets)
  return decompose_log_probs(ls, lt, targets)


def _quantile_index(n, hard_fraction):
  """j = floor((1 - hard_fraction) * (n - 1)) for int counts ``n``, in exact int32 arithmetic.

  hard_fraction is read as the nearest fraction with denominator <= 10^4 (exact for
  up to 4 decimals, e.g. 0.3 -> 3/10), so float rounding never moves j.
  """
  f = Fraction(float(hard_fraction)).limit_denominator(10_000)
  num, den = f.denominator - f.numerator, f.denominator  # 1 - hard_fraction = num / den
  k = jnp.maximum(n - 1, 0)
  return (k // den) * num + ((k % den) * num) // den  # no overflow for any int32 n


def hard_mask(uncertainty, mask, *, hard_fraction=0.5, split="batch"):
  """bool ``[B, T]``: valid tokens with u >= threshold (ties are hard).

  With the n valid u values (per row for split "sequence", over the whole batch for
  "batch") sorted ascending s_0..s_{n-1}, threshold = s_j, j = floor((1 -
  hard_fraction) * (n - 1)). hard_fraction 0.5 is exactly the official rule, the lower
  median (torch.median): n=4 -> s_1, n=5 -> s_2. The hard share is >= hard_fraction:
  1 + ceil(hard_fraction * (n - 1)) tokens without ties, more with ties at s_j (ties
  are hard). hard_fraction 1: all valid tokens are hard; 0: the tokens with the
  maximal u (at least one; the official code always uses 0.5).
  One valid token: it is hard; no valid tokens: none. Static shapes (a sort with
  masked entries pushed to +inf), no gradient through u.
  """
  shape = uncertainty.shape
  u, m = jax.lax.stop_gradient(uncertainty).astype(jnp.float32), mask.astype(bool)
  if split == "batch":
    u, m = u.reshape(1, -1), m.reshape(1, -1)
  srt = jnp.sort(jnp.where(m, u, jnp.inf), axis=-1)
  j = _quantile_index(jnp.sum(m, axis=-1, keepdims=True, dtype=jnp.int32), hard_fraction)
  threshold = jnp.take_along_axis(srt, j, axis=-1)  # +inf for a row without valid tokens
  return (m & (u >= threshold)).reshape(shape)


def atkd_weights(uncertainty, mask, *, easy_weight=0.2, hard_fraction=0.5, split="batch"):
  """Per-token weights so that loss = sum(w_tkd * TKD + w_dkd * DKD).

  Depends on the teacher only (no gradient). Returns (w_tkd, w_dkd, hard), ``[B, T]``.
  """
  hard = hard_mask(uncertainty, mask, hard_fraction=hard_fraction, split=split)
  easy = mask.astype(bool) & ~hard
  w_hard = (1.0 - easy_weight) * hard / jnp.maximum(jnp.sum(hard), 1)
  w_easy = easy_weight * easy / jnp.maximum(jnp.sum(easy), 1)
  return w_hard, w_hard + w_easy, hard


def weighted_loss(tkd, dkd, w_tkd, w_dkd):
  return jnp.sum(jnp.where(w_tkd > 0, w_tkd * tkd, 0.0) + jnp.where(w_dkd > 0, w_dkd * dkd, 0.0))


def metrics(parts, mask, hard):
  """Means over valid tokens of TKD, DKD, uncertainty, and the hard fraction."""
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = lambda x: jnp.sum(jnp.where(m > 0, x * m, 0.0)) / n
  return {
    "hard_fraction": jnp.sum(hard) / n,
    "tkd": mean(parts["tkd"]),
    "dkd": mean(parts["dkd"]),
    "uncertainty": mean(parts["uncertainty"]),
  }


def atkd_loss(
  student_logits,
  teacher_logits,
  targets,
  mask,
  *,
  easy_weight=0.2,
  hard_fraction=0.5,
  split="batch",
  base="fkl",
  temperature=1.0,
  vocab_size=None,
):
  """ATKD loss on logits ``[B, T, V]``, targets ``[B, T]`` int, mask ``[B, T]`` -> (loss, metrics).

  base "rkl" swaps student and teacher inside TKD and DKD; the hard/easy split still
  uses the teacher's uncertainty (as the official code). split "batch" (default): one
  threshold over all valid tokens; "sequence": one per row. Masked tokens never change the loss.
  """
  check_params(easy_weight, hard_fraction, split, base)
  ls, lt = dv.pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  check_targets(student_logits, targets)
  if tuple(mask.shape) != tuple(targets.shape):
    raise ValueError(f"mask must have shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
  if split == "sequence" and mask.ndim != 2:
    raise ValueError(f"split 'sequence' needs [B, T] inputs, got mask shape {tuple(mask.shape)}")
  parts = decompose_log_probs(ls, lt, targets, base)
  w_tkd, w_dkd, hard = atkd_weights(
    parts["uncertainty"], mask, easy_weight=easy_weight, hard_fraction=hard_fraction, split=split
  )
  loss = weighted_loss(parts["tkd"], parts["dkd"], w_tkd, w_dkd)
  return loss, metrics(parts, mask, hard)
