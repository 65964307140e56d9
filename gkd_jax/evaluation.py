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
    out[i, :len(p)] = p
  return out, np.array([len(p) for p in prompt_lists], np.int32)


def decode(model, prompt_lists, *, batch_size, max_new_tokens, eos_ids, pad_id, temperature=0.0,
           beam_size=0, rng=None, place=None):
  """Generated id lists (EOS and padding removed) for every prompt, in order.

  All batches share one padded shape (one compile); a short last batch is filled
  with copies of its first prompt whose outputs are dropped. place: optional
  function that puts a batch dict on devices (e.g. sharding.shard_batch).
  """
  p = max(len(x) for x in prompt_lists)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  out = []
  for start in range(0, len(prompt_lists), batch_size):
    chunk = list(prompt_lists[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)
    tokens, lengths = pad_prompts(chunk, pad_id, p)
    if place is not None:
      b = place({"tokens": tokens, "lengths": lengths})
      tokens, lengths = b["tokens"], b["lengths"]
    if beam_size:
      res = sampling.beam_search(model, tokens, lengths, beam_size=beam_size,
                                 max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id)
      gen, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    else:
      res = sampling.sample(model, tokens, lengths, rng=jax.random.fold_in(rng, start),
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            eos_ids=eos_ids, pad_id=pad_id)
      gen, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    eos = set(eos_ids or ())
    for row in range(n):
      ids = gen[row, :lens[row]].tolist()
      out.append(ids[:-1] if ids and ids[-1] in eos else ids)
  return out


@functools.partial(jax.jit, static_argnames=("s_graphdef", "t_graphdef"))
def _kl_sums(s_graphdef, s_params, t_graphdef, t_params, view):
  s = steps.hidden_and_head(nnx.merge(s_graphdef, s_params), view)
  t = steps.hidden_and_head(nnx.merge(t_graphdef, t_params), view)
  kl = dv.forward_kl(steps.logits(*s), steps.logits(*t))
  _, (total, count) = dv.masked_mean(kl, view["loss_mask"], "token")
  return total, count


def token_kl(student, teacher, views):
  """Mean per-token KL(teacher || student) at temperature 1 over the views' trained tokens."""
  sg, sp = nnx.split(student)
  tg, tp = nnx.split(teacher)
  total = count = 0.0
  for view in views:
    t, c = _kl_sums(sg, sp, tg, tp, view)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)
