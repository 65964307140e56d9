"""gkd_jax: on-policy (GKD) and adaptive-teacher (ATKD) distillation in JAX/Flax.

Importing the package is light: no TensorFlow/seqio (those live in gkd_jax.data).
"""

__version__ = "0.1.0"
