"""The replication grid (experiments/replicate.py): GKD's lambda x divergence table and ATKD vs
its base KD, from one fine-tuned teacher and one SFT'd student, 3 seeds per cell.

  --grid=configs/replication.py          CPU scale (about 3 hours on 2 cores)
  --grid=configs/replication.py:accelerator   a larger scale for one GPU/TPU host

CPU scale, chosen to fit ~3 hours (about 4 minutes a run): the demo's XSum setup (teacher
SmolLM2-135M-Instruct fine-tuned 30 steps on its top 10 layers; the 16-layer pruned student,
SFT'd 15 steps), then every cell trains 16 steps of batch 8 (chat prompts <= 128 tokens,
summaries <= 32, on-policy samples of 32 tokens at temperature 1) with the demo's lr 2e-4
(checked on the validation split), and is scored once on the 100 test documents: ROUGE-2 of
greedy decodes and the teacher-student token KL on the reference summaries.

The accelerator scale needs the data pipeline (seqio/TensorFlow) on that host.
"""

import ml_collections

from configs import demo

DIVERGENCES = {"fkl": {"gkd.loss": "fkl"}, "rkl": {"gkd.loss": "rkl"},
               "jsd0.1": {"gkd.loss": "jsd", "gkd.beta": 0.1},
               "jsd0.9": {"gkd.loss": "jsd", "gkd.beta": 0.9}}
LAMBDAS = (0.0, 0.5, 1.0)


def cells():
  """name -> trainer overrides, in run order."""
  out = {"sft": {"mode": "sft"}}
  for lmbda in LAMBDAS:
    for name, kw in DIVERGENCES.items():
      out[f"{name}-l{lmbda:g}"] = {**kw, "gkd.lmbda": lmbda}
  for lmbda in (0.0, 1.0):
    out[f"atkd-l{lmbda:g}"] = {"gkd.loss": "atkd", "gkd.atkd_base": "fkl", "gkd.lmbda": lmbda}
  return out


def get_config(scale="cpu"):
  g = ml_collections.ConfigDict()
  base = demo.get_config()
  base.train.sft_warmup_steps = 0
  base.train.steps = 16
  base.train.ckpt_every = 8
  base.train.log_every = 4
  base.train.export_hf = False
  base.eval.at_start = False
  base.eval.teacher = False
  base.eval.num_samples_logged = 3
  base.teacher.sft.zero_shot_eval = True
  g.student_sft_steps = 15
  g.seeds = (0, 1, 2)
  if scale == "accelerator":
    base.data.max_prompt_len, base.data.max_target_len = 512, 64
    base.data.batch_size = 32
    base.gkd.max_new_tokens = 64
    base.eval.max_new_tokens = 64
    base.teacher.sft.steps, base.teacher.sft.top_layers = 300, 0
    base.student.keep_layers = tuple(range(0, 6)) + tuple(range(20, 30))
    base.train.steps, base.train.ckpt_every = 300, 100
    base.eval.num_examples = 100
    g.student_sft_steps = 200
  elif scale != "cpu":
    raise ValueError(f"unknown scale {scale!r}: cpu or accelerator")
  g.scale = scale
  g.base = base
  g.cells = tuple((name, tuple(kw.items())) for name, kw in cells().items())
  return g
