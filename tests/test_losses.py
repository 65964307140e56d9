"""gkd_jax.losses: the registry, configs that name a loss and its parameters, and a new
divergence added by one registration (it then works unfused, fused and from a config)."""

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest

import np_ref
from gkd_jax import config as config_lib
from gkd_jax import divergences as dv
from gkd_jax import losses, steps
from gkd_jax.fused import fused_loss


def test_registry_names_and_parameters():
  assert losses.names() == ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "atkd")
  assert losses.DIVERGENCES == losses.names()[:-1]
  assert losses.params(losses.get("jsd", beta=0.3)) == {"beta": 0.3}
  assert losses.params(losses.get("atkd")) == {"easy_weight": 0.2, "hard_fraction": 0.5,
                                               "split": "batch", "base": "fkl"}
  assert losses.get("jsd", beta=0.3) == losses.JSD(beta=0.3)  # hashable values: jit-static
  assert hash(losses.get("atkd", split="sequence")) == hash(losses.ATKD(split="sequence"))
  with pytest.raises(ValueError, match=r"unknown loss 'kl'.*fkl, rkl"):
    losses.get("kl")
  with pytest.raises(ValueError, match=r"'jsd' got unknown parameter.*'alpha'.*allowed: \['beta'\]"):
    losses.get("jsd", alpha=0.1)
  with pytest.raises(ValueError, match="beta must be in"):
    losses.JSD(beta=1.5)
  with pytest.raises(ValueError, match="unknown split 'row'"):
    losses.ATKD(split="row")
  with pytest.raises(ValueError, match="registered twice"):
    losses.register(losses.FKL)


def test_config_loss_kw_wins_over_the_flat_aliases_and_is_checked():
  c = config_lib.defaults()
  assert steps.LossSpec.from_config(c).loss == losses.JSD(beta=0.5)
  c.gkd.beta = 0.2
  assert losses.from_config(c.gkd) == losses.JSD(beta=0.2)  # the alias
  c.gkd.loss_kw = {"beta": 0.9}
  assert losses.from_config(c.gkd) == losses.JSD(beta=0.9)
  c.gkd.loss, c.gkd.atkd_split, c.gkd.loss_kw = "atkd", "sequence", {"base": "rkl"}
  assert losses.from_config(c.gkd) == losses.ATKD(split="sequence", base="rkl")
  config_lib.validate(c)
  c.gkd.loss_kw = {"beta": 0.9}
  with pytest.raises(ValueError, match=r"config.gkd.loss_kw \(loss 'atkd'\).*unknown.*'beta'"):
    config_lib.validate(c)
  c.gkd.loss, c.gkd.loss_kw = "jsd", {"beta": 2.0}
  with pytest.raises(ValueError, match=r"config.gkd.loss_kw \(loss 'jsd'\): beta must be in"):
    config_lib.validate(c)
  # the CLI's dotted overrides reach the free dict
  c = config_lib.set_keys(config_lib.defaults(), [("gkd.loss_kw.beta", 0.7)])
  assert losses.from_config(c.gkd) == losses.JSD(beta=0.7)


def half_skew(student_logits, teacher_logits, *, gamma=0.5, temperature=1.0, vocab_size=None):
  """A new divergence for the test: gamma * FKL + (1 - gamma) * RKL."""
  ls, lt = dv.pair_log_probs(student_logits, teacher_logits, temperature, vocab_size)
  return gamma * dv.kl(lt, ls) + (1.0 - gamma) * dv.kl(ls, lt)


@pytest.fixture
def registered():
  @losses.register
  @dataclasses.dataclass(frozen=True)
  class HalfSkew(losses.Divergence):
    gamma: float = 0.5
    name: ClassVar[str] = "half_skew"
    fn: ClassVar[Callable] = half_skew

  yield HalfSkew
  del losses.REGISTRY["half_skew"]


def test_a_divergence_added_by_one_registration_works_everywhere(registered):
  r = np.random.default_rng(0)
  s, t = (r.standard_normal((2, 5, 40)) * 3).astype(np.float32), (r.standard_normal((2, 5, 40)) * 3)
  t = t.astype(np.float32)
  mask = (r.random((2, 5)) < 0.7).astype(np.float32)
  want_tok = 0.3 * np_ref.divergence("fkl", s, t, 2.0) + 0.7 * np_ref.divergence("rkl", s, t, 2.0)
  want = np.sum(want_tok * mask) / mask.sum()

  c = config_lib.defaults()
  c.gkd.loss, c.gkd.loss_kw, c.gkd.loss_temperature = "half_skew", {"gamma": 0.3}, 2.0
  spec = steps.LossSpec.from_config(config_lib.validate(c))
  assert spec.loss == registered(gamma=0.3) and spec.loss.per_token
  total, count, aux = losses.loss_sum(spec.loss, s, t, jnp.zeros((2, 5), jnp.int32), mask,
                                      temperature=2.0)
  np.testing.assert_allclose(total / count, want, rtol=1e-5)
  assert aux == {}
  # the fused path: logits = h @ W with W = identity rows, so h is the logits themselves
  eye = jnp.eye(40, dtype=jnp.float32)
  got, _ = fused_loss(s, eye, t, eye, mask, loss=spec.loss, temperature=2.0, chunk_size=3)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="gamma must be in"):
    losses.get("half_skew", gamma=-1)
