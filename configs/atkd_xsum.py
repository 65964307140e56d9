"""ATKD on the demo's pair (SmolLM2-135M-Instruct -> 16-layer pruned copy), runnable on CPU.

Supervised KD on dataset targets (lmbda=0) as in the ATKD paper; the hardest 50% of
target tokens by teacher uncertainty get TKD+DKD, the rest DKD only (0.2 / 0.8).
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.gkd.lmbda = 0.0
  c.gkd.loss = "atkd"
  c.gkd.easy_weight = 0.2
  c.gkd.hard_fraction = 0.5
  c.gkd.atkd_split = "batch"
  c.gkd.atkd_base = "fkl"
  return c
