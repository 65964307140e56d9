"""ATKD on the demo's pair (fine-tuned SmolLM2-135M-Instruct -> 16-layer pruned copy), on CPU.

Supervised KD on dataset targets (lmbda=0) as in the ATKD paper; tokens whose teacher
uncertainty is at or above the batch median (the official rule) get TKD+DKD, the rest DKD
only (weights 0.8 / 0.2).
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.gkd.lmbda = 0.0
  c.gkd.loss = "atkd"
  c.gkd.loss_kw = {"easy_weight": 0.2, "hard_fraction": 0.5, "split": "batch", "base": "fkl"}
  return c
