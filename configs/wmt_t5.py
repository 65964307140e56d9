"""GKD paper setup, WMT14 en->de translation with T5 (TPU). Eval: beam search, BLEU.

  --config.teacher.path=/ckpt/t5-xl-wmt --config.student.path=/ckpt/t5-small-wmt
Starting-point hyper-parameters (not a verified copy of the paper's appendix).
"""

from gkd_jax.config import defaults


def get_config():
  c = defaults()
  c.teacher.path = "/path/to/t5-xl-wmt-en-de"
  c.student.init = "path"
  c.student.path = "/path/to/t5-small-wmt-en-de"
  c.data.task = "translate_en_de"
  c.data.source = "tfds"  # wmt14_translate/de-en; local: Multi30k or the WMT22 files
  c.data.prompt_format = "t5"  # "translate English to German: ..."
  c.data.eval_split = "validation"
  c.data.max_prompt_len = 80
  c.data.max_target_len = 80
  c.data.batch_size = 32
  c.gkd.lmbda = 1.0
  c.gkd.loss = "jsd"
  c.gkd.beta = 0.1
  c.gkd.max_new_tokens = 80
  c.optim.name = "adafactor"
  c.optim.lr = 3e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.train.steps = 100_000
  c.train.log_every = 100
  c.train.eval_every = 5_000
  c.train.ckpt_every = 1_000
  c.eval.num_examples = 1_000
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 80
  c.eval.beam_size = 4
  return c
