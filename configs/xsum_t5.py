"""GKD paper setup, XSum summarization with T5 (meant for a TPU pod slice).

Teacher: a T5 v1.1 XL fine-tuned on XSum; student: a T5 small/base/large fine-tuned on
XSum (the paper starts every method from the SFT'd student: make both with mode=sft).
Point the paths at your Hugging Face checkpoints (local or copied to each worker):
  --config.teacher.path=/ckpt/t5-xl-xsum --config.student.path=/ckpt/t5-small-xsum
Hyper-parameters are starting points in the spirit of the paper (Adafactor, on-policy
data, JSD), not a verified copy of its appendix; sweep beta and lmbda.
"""

from gkd_jax.config import defaults


def get_config():
  c = defaults()
  c.teacher.path = "/path/to/t5-xl-xsum"
  c.student.init = "path"
  c.student.path = "/path/to/t5-small-xsum"
  c.data.task = "xsum"
  c.data.source = "tfds"
  c.data.prompt_format = "t5"  # "summarize: ..."
  c.data.max_prompt_len = 1024
  c.data.max_target_len = 64
  c.data.batch_size = 32
  c.gkd.lmbda = 1.0
  c.gkd.loss = "jsd"
  c.gkd.beta = 0.1
  c.gkd.max_new_tokens = 64
  c.gkd.fused = True
  c.optim.name = "adafactor"
  c.optim.lr = 3e-4
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.train.steps = 40_000
  c.train.log_every = 100
  c.train.eval_every = 2_000
  c.train.ckpt_every = 1_000
  c.eval.num_examples = 1_000
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 64
  c.mesh.fsdp = 4
  return c
