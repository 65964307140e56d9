"""The rollout: what one training step trains on, from a dataset batch.

Each step's data source is drawn from (seed, step), so every host agrees: "on_policy" (the
student samples continuations of the batch's prompts, with probability ``gkd.lmbda``), else
"teacher" (SeqKD: the teacher samples) or "dataset" (the batch's own targets); "sft" in mode
sft and during the SFT warm-up. No gradient flows through sampling. With a sequence reward
(RL + GKD), the samples are decoded and scored and the advantages computed here.

Data flow: dataset batch -> ``Rollout.__call__`` -> ``Rolled`` (the trained view, the dataset
view for the cross-entropy term, advantages) -> ``steps.train_step``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gkd_jax import sampling, sharding, steps


def step_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
  """ "on_policy" with probability lmbda, else "teacher" (SeqKD) or "dataset"; same on every host."""
  if np.random.default_rng([seed, step, 0x6B64]).random() < lmbda:
    return "on_policy"
  return "teacher" if seq_kd else "dataset"


class Rolled(NamedTuple):
  """view: the trained sequences; ce_view: the dataset sequences of the cross-entropy term,
  None when they are the view's own; advantages ``[B]`` (zeros without a sequence reward);
  source; reward: the batch's mean sequence reward (nan without one)."""

  view: dict
  ce_view: dict | None
  advantages: jax.Array
  source: str
  reward: float = float("nan")


@dataclasses.dataclass
class Rollout:
  """Turns dataset batches into ``Rolled`` for a run's config; models are passed as
  ``(graphdef, params)`` pairs, so the caller's parameters are the only copy."""

  config: Any
  mesh: Any
  rules: Any
  tokenizer: Any
  encoder_decoder: bool
  reward_fn: Any = None  # rewards.RewardFn, or None (no sequence reward)

  def source(self, step, sft=False) -> str:
    """The data source of step ``step``: "sft", "dataset", "teacher" or "on_policy"."""
    c, g = self.config, self.config.gkd
    if c.mode == "sft" or sft:
      return "sft"
    return step_source(c.seed, step, g.lmbda, g.seq_kd)

  def __call__(self, batch, step, student, teacher, rng, sft=False) -> Rolled:
    """batch: a placed dataset batch (with a teacher cache's ``teacher_*`` rows on dataset
    steps); student, teacher: (graphdef, params); rng: the run's key (step ``step`` samples
    with ``fold_in(rng, step)``)."""
    c, g = self.config, self.config.gkd
    pad = self.tokenizer.pad_id
    data_view = steps.batch_view(batch, self.encoder_decoder, pad)
    source = self.source(step, sft)
    if source == "sft":
      return Rolled(data_view, None, jnp.zeros(c.data.batch_size), "sft")
    if source == "dataset":  # ce_view None: the CE term reuses the view's forward
      cached = {k: batch[k] for k in steps.CACHED_TEACHER if k in batch}
      return Rolled({**data_view, **cached}, None, jnp.zeros(c.data.batch_size), source)
    prompts, lengths = batch["prompt_tokens"], batch["prompt_lengths"]
    spp = c.rl.samples_per_prompt
    if spp > 1:
      n = prompts.shape[0] // spp
      prompts = self.place({"p": jnp.repeat(prompts[:n], spp, axis=0)})["p"]
      lengths = self.place({"l": jnp.repeat(lengths[:n], spp, axis=0)})["l"]
    if jax.process_count() > 1:  # sampling.sample checks the lengths on the host
      lengths = sharding.replicate(lengths, self.mesh)
    out = sampling.sample(
      student if source == "on_policy" else teacher,
      prompts,
      lengths,
      rng=jax.random.fold_in(rng, step),
      max_new_tokens=g.max_new_tokens,
      temperature=g.sample_temperature,
      top_k=g.top_k,
      top_p=g.top_p,
      eos_ids=[self.tokenizer.eos_id] if g.sample_stop_at_eos else None,
      pad_id=pad,
      # the student's own dot_dtype, cast once up front (its decode reads half the bytes)
      dot_dtype=g.sample_dot_dtype or (source == "on_policy" and c.student.dot_dtype) or None,
    )
    view = steps.samples_view(prompts, lengths, out.tokens, out.mask, self.encoder_decoder, pad)
    if self.reward_fn is None:
      return Rolled(view, data_view, jnp.zeros(prompts.shape[0]), source)
    adv, reward = self.advantages(out, batch, spp)
    return Rolled(view, data_view, adv, source, reward)

  def place(self, batch, global_data=False):
    return sharding.shard_batch(batch, self.mesh, self.rules, global_data)

  def advantages(self, out, batch, spp):
    """-> (advantages [B] on the mesh, the mean reward): the decoded samples scored against
    the decoded references, minus the baseline (``rl.baseline``, per prompt group)."""
    from gkd_jax import rewards

    to_host, decode = sharding.to_host, self.tokenizer.decode
    toks, lens = to_host(out.tokens), to_host(out.lengths)
    preds = [decode(t[:n].tolist()) for t, n in zip(toks, lens)]
    ref_t = to_host(batch["decoder_targets"] if self.encoder_decoder else batch["target_tokens"])
    ref_n = to_host(batch["target_lengths"])
    refs = [decode(t[:n].tolist()) for t, n in zip(ref_t, ref_n)]
    if spp > 1:
      refs = [r for r in refs[: len(refs) // spp] for _ in range(spp)]
    r = self.reward_fn(preds, refs)
    adv = rewards.baseline_advantages(r, group_size=spp, baseline=self.config.rl.baseline)
    return self.place({"a": np.asarray(adv, np.float32)}, global_data=True)["a"], float(np.mean(r))
