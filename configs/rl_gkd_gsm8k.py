"""RL + GKD on GSM8K: loss = (1-alpha)*REINFORCE(answer correctness) + alpha*RKL (TPU).

4 samples per prompt with a per-prompt mean baseline. Decoder-only instruct models
work the same way (set prompt_format="chat" and HF Llama/Qwen2 paths).
"""

from configs import gsm8k_flant5


def get_config():
  c = gsm8k_flant5.get_config()
  c.rl.alpha = 0.5
  c.rl.reward = "gsm8k_correct"
  c.rl.samples_per_prompt = 4
  c.rl.baseline = "mean"
  c.gkd.lmbda = 1.0
  c.gkd.sample_temperature = 1.0
  return c
