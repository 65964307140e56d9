"""Token-level divergences D(teacher || student) between two LM distributions.

Conventions (shared by every function here):
  * Argument order is always ``fn(student_logits, teacher_logits, **params)``.
  * Logits are ``[..., V]``; the result is one float32 value per token, ``[...]``.
  * Work is in float32 from ``log_softmax(logits / temperature)``; the same
    ``temperature`` divides both logits.
  * ``vocab_size``: entries ``>= vocab_size`` of a padded vocabulary are excluded
    (probability exactly 0), not treated as zero logits.
  * P_T is the teacher distribution, P_S the student's. Generalized JSD follows
    the GKD paper and TRL: M = beta*P_T + (1-beta)*P_S and
    JSD(beta) = beta*KL(P_T||M) + (1-beta)*KL(P_S||M). That mixed formula tends to
    0 at beta -> 0 and beta -> 1, so the endpoints are special-cased:
    beta=0 is ``forward_kl`` (KL(P_T||P_S)), beta=1 is ``reverse_kl`` (KL(P_S||P_T)).

The losses built on these (their names, parameters and registry) live in ``gkd_jax.losses``.
``masked_mean`` reduces per-token values and also returns the exact (sum, count)
pair so gradient accumulation and multi-device averages stay exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Stand-in for -inf: exp() of it is exactly 0 in float32, yet differences of two
# such values stay finite, so excluded entries give 0 (not NaN) in KL terms.
_NEG = -1e30

REDUCTIONS = ("token", "sequence")


# ----------------------------------------------------------------- validation
def check_temperature(temperature) -> float:
  t = float(temperature)
  if not t > 0 or not math.isfinite(t):
    raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
  return t


def check_unit(name: str, value) -> float:
  try:
    v = float(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a concrete number in [0, 1], got {value!r}") from e
  if not 0.0 <= v <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  return v


def check_pair(student_logits, teacher_logits, vocab_size=None) -> None:
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      "student_logits and teacher_logits must have the same shape [..., V], got "
      f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
    )
  if student_logits.ndim < 1:
    raise ValueError("logits must have a vocabulary axis [..., V]")
  check_vocab_size(vocab_size, student_logits.shape[-1])


def check_vocab_size(vocab_size, v: int) -> None:
  if vocab_size is not None and not (isinstance(vocab_size, int) and 1 <= vocab_size <= v):
    raise ValueError(
      f"vocab_size must be an int in [1, {v}] (the logits' last axis), got {vocab_size!r}"
    )


# ---------------------------------------------------------------- primitives
def softcap(logits, cap):
  """Gemma-style soft-capping ``cap * tanh(logits / cap)``; ``cap=None`` is a no-op."""
  if cap is None:
    return logits
  return cap * jnp.tanh(logits / cap)


def log_probs(logits, temperature: float = 1.0, vocab_size: int | None = None):
  """float32 ``log_softmax(logits / temperature)`` over ``[..., V]``; padded entries -> ~-inf."""
  x = logits.astype(jnp.float32) / temperature
  x = jnp.maximum(x, _NEG)  # -inf inputs become a finite stand-in (probability still 0)
  if vocab_size is not None and vocab_size < x.shape[-1]:
    x = jnp.where(jnp.arange(x.shape[-1]) < vocab_size, x, _NEG)
  return jax.nn.log_softmax(x, axis=-1)


def kl(logp, logq):
  """KL(P||Q) over the last axis from log-probabilities ``[..., V]`` -> ``[...]``."""
  return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _log_mix(w: float, logp, logq):
  """log(w*P + (1-w)*Q) for 0 < w < 1, stably."""
  return jnp.logaddexp(math.log(w) + logp, math.log1p(-w) + logq)


# --------------------------------------------------------------- divergences
def pair_log_probs(student_logits, teacher_logits, temperature, vocab_size):
  """(student, teacher) log-probs [..., V] at `temperature`, after checking shapes (check_pair)."""
  temperature = check_temperature(temperature)
  check_pair(student_logits, teacher_logits, vocab_size)
  return (
    log_probs(student_logits, temperature, vocab_size),
    log_probs(teacher_logits, temperature, vocab_size),
  )


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, vocab_size=None):
  """KL(P_T || P_S) per token (mode-covering; supervised KD's divergence)."""
  ls, lt = pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  return kl(lt, ls)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, vocab_size=None):
  """KL(P_S || P_T) per token (mode-seeking)."""
  ls, lt = pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  return kl(ls, lt)


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, vocab_size=None):
  """beta*KL(P_T||M) + (1-beta)*KL(P_S||M), M = beta*P_T + (1-beta)*P_S.

  beta=0 returns ``forward_kl`` and beta=1 ``reverse_kl`` exactly (the mixed formula
  itself tends to 0 there). beta=0.5 is the symmetric Jensen-Shannon divergence.
  """
  beta = check_unit("beta", beta)
  if beta == 0.0:
    return forward_kl(
      student_logits, teacher_logits, temperature=temperature, vocab_size=vocab_size
    )
  if beta == 1.0:
    return reverse_kl(
      student_logits, teacher_logits, temperature=temperature, vocab_size=vocab_size
    )
  ls, lt = pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  lm = _log_mix(beta, lt, ls)
  return beta * kl(lt, lm) + (1.0 - beta) * kl(ls, lm)


def total_variation(student_logits, teacher_logits, *, temperature=1.0, vocab_size=None):
  """0.5 * sum_v |P_T(v) - P_S(v)| per token, in [0, 1]."""
  ls, lt = pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(lt) - jnp.exp(ls)), axis=-1)


def _skew(lp_a, lp_b, alpha: float):
  """KL(A || alpha*A + (1-alpha)*B) from log-probs; alpha=0 is KL(A||B), alpha=1 is 0."""
  if alpha == 1.0:
    return jnp.zeros(lp_a.shape[:-1], jnp.float32)
  return kl(lp_a, lp_b if alpha == 0.0 else _log_mix(alpha, lp_a, lp_b))


def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, vocab_size=None):
  """Skew KL (DistiLLM): KL(P_T || alpha*P_T + (1-alpha)*P_S). alpha=0 is forward KL."""
  alpha = check_unit("alpha", alpha)
  ls, lt = pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  return _skew(lt, ls, alpha)


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, vocab_size=None):
  """Skew reverse KL (DistiLLM): KL(P_S || alpha*P_S + (1-alpha)*P_T). alpha=0 is reverse KL."""
  alpha = check_unit("alpha", alpha)
  ls, lt = pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  return _skew(ls, lt, alpha)


# ----------------------------------------------------------------- reduction
def masked_mean(values, mask, mode: str = "token"):
  """Masked mean of per-token ``values [B, T]`` (or ``[..., T]``) -> ``(mean, (sum, count))``.

  mode "token": mean over all valid tokens; sum = sum of valid values, count =
  number of valid tokens. mode "sequence" (the GKD paper's): mean over each
  sequence's valid tokens, then over sequences that have any; sum = sum of
  per-sequence means, count = number of such sequences. ``mean = sum / count``
  (0 when count is 0), so sums and counts from several micro-batches or devices
  add up to the exact global mean.
  """
  if mode not in REDUCTIONS:
    raise ValueError(f"unknown reduction mode {mode!r}; allowed: {', '.join(REDUCTIONS)}")
  if values.shape != mask.shape:
    raise ValueError(
      f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}"
    )
  w, count = reduction_weights(mask, mode)
  total = jnp.sum(jnp.where(w > 0, w * values.astype(jnp.float32), 0.0))
  return total / jnp.maximum(count, 1.0), (total, count)


def reduction_weights(mask, mode: str = "token"):
  """Per-token weights w with ``sum(w * values) == masked sum`` for ``mode``, and the count.

  token: w = mask, count = #valid. sequence: w = mask / #valid-in-its-row,
  count = #rows with a valid token. Shapes: mask ``[..., T]`` -> (w ``[..., T]``, scalar).
  """
  if mode not in REDUCTIONS:
    raise ValueError(f"unknown reduction mode {mode!r}; allowed: {', '.join(REDUCTIONS)}")
  m = mask.astype(jnp.float32)
  if mode == "token":
    return m, jnp.sum(m)
  if m.ndim < 1:
    raise ValueError("mode 'sequence' needs a mask with a sequence axis [..., T]")
  n = jnp.sum(m, axis=-1, keepdims=True)
  return m / jnp.maximum(n, 1.0), jnp.sum(n > 0).astype(jnp.float32)
