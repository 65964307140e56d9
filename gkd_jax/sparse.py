"""Losses on a sparse teacher: its top-k tokens plus one tail bucket (a teacher-logit cache).

A cached teacher keeps, per token, k token ids ``ids [..., K]``, their log-probabilities
``logp [..., K]`` (at the cache's temperature) and ``log_tail [...]``, the log of the mass of
all other tokens. That is a distribution over K + 1 buckets (the kept tokens and "the rest"),
exact for the information kept. The student's distribution is collapsed onto the same buckets
(its probabilities of the kept tokens, and the sum of the rest), and any ``gkd_jax.losses``
loss is computed between the two bucketed distributions: ``losses.loss_sum`` on bucket
log-probabilities (a normalised log-probability vector is its own log-softmax), with the
target (ATKD) re-indexed to its bucket.

What it equals: D(bucketed teacher || bucketed student). For the f-divergences here (KL both
ways, JSD, TVD, the skew KLs) that is a lower bound of D(teacher || student) (the
data-processing inequality: bucketing is a deterministic map of the vocabulary), and it is
the full divergence when K = V. ATKD needs the target among the kept ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gkd_jax import divergences as dv
from gkd_jax import losses

_NEG = -1e30


def student_buckets(s_logits, ids, *, temperature=1.0, vocab_size=None):
  """float32 log-probs ``[..., K + 1]`` of the student's kept tokens ``ids [..., K]`` (distinct
  per row) and of the rest (last), from logits ``[..., V]`` at ``temperature``."""
  ls = dv.log_probs(s_logits, temperature, vocab_size)
  kept = jnp.take_along_axis(ls, ids, axis=-1)
  is_kept = jnp.zeros(ls.shape, bool)
  is_kept = jnp.put_along_axis(is_kept, ids, True, axis=-1, inplace=False)
  rest = jax.nn.logsumexp(jnp.where(is_kept, _NEG, ls), axis=-1)
  return jnp.concatenate([kept, rest[..., None]], axis=-1)


def teacher_buckets(logp, log_tail):
  """float32 ``[..., K + 1]`` from the cache's kept log-probs and log tail mass."""
  tail = jnp.maximum(log_tail.astype(jnp.float32), _NEG)  # an empty tail: probability 0
  return jnp.concatenate([logp.astype(jnp.float32), tail[..., None]], axis=-1)


def target_buckets(ids, targets):
  """The bucket of each target ``[...]`` (its position among ``ids``; K = the tail)."""
  hit = ids == targets[..., None]
  return jnp.where(jnp.any(hit, -1), jnp.argmax(hit, -1), ids.shape[-1]).astype(jnp.int32)


def loss_sum(
  loss,
  s_logits,
  ids,
  logp,
  log_tail,
  targets,
  mask,
  *,
  temperature=1.0,
  vocab_size=None,
  reduction="token",
):
  """``losses.loss_sum`` between the bucketed student and the cached teacher -> (sum, count,
  metrics). temperature: the cache's (its log-probs were taken at it); the student's logits
  are divided by it too. ATKD's targets must be among the kept ids (checked by the caller
  on the host, or see ``target_buckets``: a target in the tail makes TKD compare tails)."""
  ls = student_buckets(s_logits, ids, temperature=temperature, vocab_size=vocab_size)
  lt = teacher_buckets(logp, log_tail)
  tgt = target_buckets(ids, targets)
  return losses.loss_sum(loss, ls, lt, tgt, mask, temperature=1.0, reduction=reduction)


def top_k(t_logits, k, *, temperature=1.0, vocab_size=None, always=None):
  """What a cache keeps of teacher logits ``[..., V]``: (ids [..., K], logp [..., K], log_tail
  [...]) of the k most likely tokens; with ``always [...]`` (the targets) that token replaces
  the k-th when it is not among the top k, so it is always kept."""
  lt = dv.log_probs(t_logits, temperature, vocab_size)
  logp, ids = jax.lax.top_k(lt, k)
  if always is not None:
    missing = ~jnp.any(ids == always[..., None], -1)
    ids = ids.at[..., -1].set(jnp.where(missing, always, ids[..., -1]))
    logp = jnp.take_along_axis(lt, ids, axis=-1)
  is_kept = jnp.put_along_axis(jnp.zeros(lt.shape, bool), ids, True, axis=-1, inplace=False)
  log_tail = jax.nn.logsumexp(jnp.where(is_kept, _NEG, lt), axis=-1)
  return ids.astype(jnp.int32), logp, log_tail
