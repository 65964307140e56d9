"""GKD paper setup, GSM8K chain-of-thought with Flan-T5 (TPU). Eval: answer accuracy.

Teacher and student: Flan-T5 (e.g. XL -> base) fine-tuned on GSM8K rationales.
  --config.teacher.path=/ckpt/flan-t5-xl-gsm8k --config.student.path=/ckpt/flan-t5-base-gsm8k
Starting-point hyper-parameters (not a verified copy of the paper's appendix).
"""

from gkd_jax.config import defaults


def get_config():
  c = defaults()
  c.teacher.path = "/path/to/flan-t5-xl-gsm8k"
  c.student.init = "path"
  c.student.path = "/path/to/flan-t5-base-gsm8k"
  c.data.task = "gsm8k"
  c.data.source = "tfds"  # or "local" with data.data_dir pointing at gsm8k/{train,test}.jsonl
  c.data.prompt_format = "t5"  # "Q: ... A:"
  c.data.eval_split = "test"
  c.data.max_prompt_len = 256
  c.data.max_target_len = 320
  c.data.batch_size = 32
  c.gkd.lmbda = 1.0
  c.gkd.loss = "rkl"
  c.gkd.max_new_tokens = 320
  c.optim.name = "adafactor"
  c.optim.lr = 3e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.train.steps = 20_000
  c.train.log_every = 100
  c.train.eval_every = 2_000
  c.train.ckpt_every = 1_000
  c.eval.num_examples = 1_319
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 320
  return c
