"""Evaluation: decode a task's eval prompts, score them, and teacher-student token KL."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax import divergences as dv
from gkd_jax import sampling, steps


def pad_prompts(prompt_lists, pad_id, length=None):
  """Right-pads lists of ids -> (tokens [B, P] int32, lengths [B] int32)."""
  length = length or max(len(p) for p in prompt_lists)
  out = np.full((len(prompt_lists), length), pad_id, np.int32)
  for i, p in enumerate(prompt_lists):
    out[i, : len(p)] = p
  return out, np.array([len(p) for p in prompt_lists], np.int32)


def decode(
  model,
  prompt_lists,
  *,
  batch_size,
  max_new_tokens,
  eos_ids,
  pad_id,
  temperature=0.0,
  beam_size=0,
  rng=None,
  place=None,
):
  """Generated id lists (EOS and padding removed) for every prompt, in order.

  All batches share one padded shape (one compile); a short last batch is filled
  with copies of its first prompt whose outputs are dropped. place: optional
  function that puts a batch dict on devices (e.g. sharding.shard_batch).
  """
  p = max(len(x) for x in prompt_lists)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out = []
  for start in range(0, len(prompt_lists), batch_size):
    chunk = list(prompt_lists[start : start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)
    tokens, lengths = pad_prompts(chunk, pad_id, p)
    if place is not None:
      b = place({"tokens": tokens, "lengths": lengths})
      tokens, lengths = b["tokens"], b["lengths"]
    if beam_size:
      res = sampling.beam_search(
        model,
        tokens,
        lengths,
        beam_size=beam_size,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
      )
      gen, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    else:
      res = sampling.sample(
        model,
        tokens,
        lengths,
        rng=jax.random.fold_in(rng, start),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_ids=eos_ids,
        pad_id=pad_id,
      )
      gen, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    eos = set(eos_ids or ())
    for row in range(n):
      ids = gen[row, : lens[row]].tolist()
      out.append(ids[:-1] if ids and ids[-1] in eos else ids)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden(graphdef, params, view):
  return steps.hidden_and_head(nnx.merge(graphdef, params), view)[0]


def teacher_hidden(teacher, views):
  """The teacher's final hidden states ``[B, K, D]`` at each view's trained positions: computed
  once per eval set, since the teacher is frozen (its logits are then one head matmul)."""
  tg, tp = nnx.split(teacher)
  return [_hidden(tg, tp, v) for v in views]


@functools.partial(jax.jit, static_argnames=("s_graphdef", "cap"))
def _kl_sums(s_graphdef, s_params, t_h, t_w, view, cap):
  s = steps.hidden_and_head(nnx.merge(s_graphdef, s_params), view)
  kl = dv.forward_kl(steps.logits(*s), steps.logits(t_h, t_w, cap))
  _, (total, count) = dv.masked_mean(kl, view["loss_mask"], "token")
  return total, count


def token_kl(student, teacher, views, hidden=None):
  """Mean per-token KL(teacher || student) at temperature 1 over the views' trained tokens.

  hidden: ``teacher_hidden(teacher, views)``, to reuse across evaluations.
  """
  hidden = teacher_hidden(teacher, views) if hidden is None else hidden
  sg, sp = nnx.split(student)
  w, cap = teacher.head(), getattr(teacher.cfg, "final_logit_softcap", None)
  total = count = 0.0
  for view, h in zip(views, hidden):
    t, c = _kl_sums(sg, sp, h, w, view, cap)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)
