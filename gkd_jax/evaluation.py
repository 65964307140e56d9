"""Evaluation: decode a task's eval prompts, score them, and teacher-student token KL.

Models are ``nnx.Module``s or ``(graphdef, params)`` pairs (``sampling.split``).
``Evaluator`` is a run's evaluation: its eval set (read and placed once), the teacher's
hidden states on it (computed once), and ``__call__(model, name)`` -> (metrics, samples).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from gkd_jax import divergences as dv
from gkd_jax import sampling, sharding, steps
from gkd_jax.data import batching


def pad_prompts(prompt_lists, pad_id, length=None):
  """Right-pads lists of ids -> (tokens [B, P] int32, lengths [B] int32)."""
  length = length or max(len(p) for p in prompt_lists)
  return batching.right_pad(prompt_lists, length, pad_id), batching.row_lengths(prompt_lists)


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
  tg, tp, _ = sampling.split(teacher)
  return [_hidden(tg, tp, v) for v in views]


@functools.partial(jax.jit, static_argnames=("s_graphdef", "cap", "t_dot_dtype", "t_layout"))
def _kl_sums(s_graphdef, s_params, t_h, t_w, view, cap, t_dot_dtype, t_layout):
  s = steps.hidden_and_head(nnx.merge(s_graphdef, s_params), view)
  kl = dv.forward_kl(steps.logits(*s), steps.logits(t_h, t_w, cap, t_dot_dtype, t_layout))
  _, (total, count) = dv.masked_mean(kl, view["loss_mask"], "token")
  return total, count


def token_kl(student, teacher, views, hidden=None):
  """Mean per-token KL(teacher || student) at temperature 1 over the views' trained tokens.

  hidden: ``teacher_hidden(teacher, views)``, to reuse across evaluations.
  """
  hidden = teacher_hidden(teacher, views) if hidden is None else hidden
  sg, sp, _ = sampling.split(student)
  teacher = sampling.split(teacher)[2]
  (w, layout), cap = steps.unembedding(teacher), teacher.logit_softcap()
  dd = steps.head_dot_dtype(teacher)
  total = count = 0.0
  for view, h in zip(views, hidden):
    t, c = _kl_sums(sg, sp, h, w, view, cap, dd, layout)
    total, count = total + float(t), count + float(c)
  return total / max(count, 1.0)


@dataclasses.dataclass
class Evaluator:
  """A run's evaluation (config sections ``eval`` and ``data``): decode the eval prompts,
  score them with the task's metrics, and (``eval.teacher_kl``) the token KL to the teacher."""

  config: Any
  mesh: Any
  rules: Any
  tokenizer: Any
  encoder_decoder: bool
  teacher: Any  # (graphdef, params)
  _data: tuple | None = None  # (examples, placed views), read once
  _teacher_hidden: list | None = None  # the teacher's hidden states on those views

  def place(self, batch):
    return sharding.shard_eval_batch(batch, self.mesh, self.rules)

  def data(self):
    """-> (examples, views): the eval examples and their teacher-forced views, read once."""
    from gkd_jax import data

    c = self.config
    if self._data is None:
      kw = data.config_kwargs(c.data, self.tokenizer, self.encoder_decoder)
      ex = data.get_eval_examples(
        c.data.task, c.data.eval_split, max_examples=c.eval.num_examples, **kw
      )
      batches = data.get_dataset(
        c.data.task,
        c.data.eval_split,
        batch_size=c.eval.batch_size,
        shuffle=False,
        num_epochs=1,
        shard_index=0,
        num_shards=1,
        num_buckets=c.data.num_buckets,
        bucket_ratio=c.data.bucket_ratio,
        max_examples=c.eval.num_examples,
        **kw,
      )
      pad = self.tokenizer.pad_id
      views = [
        steps.batch_view(
          sharding.shard_batch(b, self.mesh, self.rules, global_data=True),
          self.encoder_decoder,
          pad,
        )
        for b in batches
      ]
      self._data = (ex, views)
    return self._data

  def __call__(self, model, name, is_teacher=False):
    """-> (metrics, samples) of ``model`` (a (graphdef, params) pair) on the eval set; the
    student rows (not ``is_teacher``) also get ``teacher_kl``."""
    from gkd_jax import data

    c = self.config
    ex, views = self.data()
    t0 = time.time()
    preds_ids = decode(
      model,
      [e["prompt_tokens"] for e in ex],
      batch_size=c.eval.batch_size,
      max_new_tokens=c.eval.max_new_tokens,
      eos_ids=[self.tokenizer.eos_id],
      pad_id=self.tokenizer.pad_id,
      temperature=c.eval.temperature,
      beam_size=c.eval.beam_size,
      place=self.place,
    )
    preds = [self.tokenizer.decode(p) for p in preds_ids]
    refs = [e["references"] for e in ex]
    metrics = data.evaluate(c.data.task, refs, preds)
    if not is_teacher and c.eval.teacher_kl:
      if self._teacher_hidden is None:
        self._teacher_hidden = teacher_hidden(self.teacher, views)
      metrics["teacher_kl"] = token_kl(model, self.teacher, views, self._teacher_hidden)
    metrics["decode_s"] = time.time() - t0
    samples = [
      {"prompt": e["prompt_text"], "reference": e["reference"], name: p}
      for e, p in zip(ex[: c.eval.num_samples_logged], preds)
    ]
    return metrics, samples
