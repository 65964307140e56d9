"""ATKD for instruction following (the ATKD / MiniLLM setting), decoder-only, TPU.

Teacher and student: Hugging Face Llama/Qwen2/Mistral instruct checkpoints sharing a
tokenizer, e.g. --config.teacher.path=/ckpt/Qwen2-1.5B-Instruct
--config.student.path=/ckpt/Qwen2-0.5B-Instruct. Data: instruction jsonl files
(instruction [+ input] -> output) under data.data_dir/instruct/, e.g. ../shared/data.
"""

from gkd_jax.config import defaults


def get_config():
  c = defaults()
  c.teacher.path = "/path/to/teacher-instruct"
  c.student.init = "path"
  c.student.path = "/path/to/student-instruct"
  c.data.task = "instruct"
  c.data.source = "local"
  c.data.data_dir = "../shared/data"
  c.data.train_split = "dolly"
  c.data.eval_split = "self-inst"
  c.data.prompt_format = "chat"
  c.data.max_prompt_len = 256
  c.data.max_target_len = 256
  c.data.batch_size = 32
  c.gkd.lmbda = 0.0
  c.gkd.loss = "atkd"
  c.gkd.max_new_tokens = 256
  c.optim.lr = 1e-5
  c.train.steps = 5_000
  c.train.log_every = 50
  c.train.eval_every = 1_000
  c.train.ckpt_every = 500
  c.eval.num_examples = 242
  c.eval.max_new_tokens = 256
  c.mesh.fsdp = 4
  return c
