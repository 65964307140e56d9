"""Losses on a sparse (top-k + tail bucket) teacher vs float64 NumPy references: k = V gives
the full losses, the bucketed f-divergences never exceed the full ones, the target is kept."""

import jax.numpy as jnp
import numpy as np
import pytest

import np_ref
from gkd_jax import losses, sparse

V = 37
CASES = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}),
         ("jsd", {"beta": 0.9}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.3})]
IDS = [f"{n}-{p}" for n, p in CASES]


def _logits(seed, shape=(3, 5, V), scale=3.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _np_buckets(logits, ids, temperature=1.0):
  """float64 bucket log-probs [..., K+1] from logits, written directly from the definition."""
  lp = np_ref.log_softmax(logits, temperature)
  p = np.exp(lp)
  kept = np.take_along_axis(p, ids, -1)
  rest = 1.0 - kept.sum(-1, keepdims=True)
  with np.errstate(divide="ignore"):
    return np.log(np.concatenate([kept, np.maximum(rest, 0.0)], -1))


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucketed_divergences_match_numpy(name, params, temperature):
  s, t = _logits(0), _logits(1)
  mask = np.ones((3, 5), np.float32)
  ids, logp, tail = sparse.top_k(t, 8, temperature=temperature)
  total, count, _ = sparse.loss_sum(losses.get(name, **params), s, ids, logp, tail,
                                    jnp.zeros((3, 5), jnp.int32), mask, temperature=temperature)
  ids = np.asarray(ids)
  want = np_ref.divergence(name, _np_buckets(s, ids, temperature), _np_buckets(t, ids, temperature),
                           **params)
  np.testing.assert_allclose(total / count, want.mean(), rtol=1e-4, atol=1e-6)
  full = np_ref.divergence(name, s, t, temperature, **params)
  assert np.all(want <= full + 1e-9)  # data processing: bucketing never adds divergence


@pytest.mark.parametrize("name,params", CASES + [("atkd", {}), ("atkd", {"base": "rkl"})],
                         ids=IDS + ["atkd", "atkd-rkl"])
def test_k_equal_to_vocab_is_the_full_loss(name, params):
  s, t = _logits(2), _logits(3)
  r = np.random.default_rng(4)
  tgt = jnp.asarray(r.integers(0, V, (3, 5)), jnp.int32)
  mask = (r.random((3, 5)) < 0.8).astype(np.float32)
  loss = losses.get(name, **params)
  want = losses.loss_sum(loss, s, t, tgt, mask, temperature=1.5)
  ids, logp, tail = sparse.top_k(t, V, temperature=1.5)
  got = sparse.loss_sum(loss, s, ids, logp, tail, tgt, mask, temperature=1.5)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], want[1])
  for k in want[2]:
    np.testing.assert_allclose(got[2][k], want[2][k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_the_target_is_always_kept_and_atkd_uses_its_bucket():
  s, t = _logits(5), _logits(6)
  tgt = jnp.asarray(np.argsort(t, -1)[..., 0], jnp.int32)  # the teacher's least likely token
  ids, logp, tail = sparse.top_k(t, 4, always=tgt)
  assert np.all(np.any(np.asarray(ids) == np.asarray(tgt)[..., None], -1))
  lp = np_ref.log_softmax(t)
  np.testing.assert_allclose(logp, np.take_along_axis(lp, np.asarray(ids), -1), rtol=1e-5)
  np.testing.assert_allclose(np.exp(logp).sum(-1) + np.exp(tail), 1.0, rtol=1e-5)
  b = sparse.target_buckets(ids, tgt)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), np.asarray(b)[..., None], -1)[..., 0],
                                tgt)
  # ATKD on buckets: its uncertainty is the teacher's 1 - p(target), exactly as on the full logits
  mask = np.ones((3, 5), np.float32)
  _, _, aux = sparse.loss_sum(losses.ATKD(), s, ids, logp, tail, tgt, mask)
  _, _, full = losses.loss_sum(losses.ATKD(), s, t, tgt, mask)
  np.testing.assert_allclose(aux["uncertainty"], full["uncertainty"], rtol=1e-5)
  # a target outside the kept ids falls in the tail bucket (K)
  assert int(sparse.target_buckets(ids[:1, :1], jnp.asarray([[V]]))[0, 0]) == 4


@pytest.mark.parametrize("name,params", [("fkl", {}), ("jsd", {"beta": 0.1}), ("tvd", {}),
                                         ("atkd", {}), ("atkd", {"base": "rkl"})])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_fused_cached_equals_unfused_with_gradients(name, params, reduction):
  import jax
  from gkd_jax.fused import fused_cached_loss
  r = np.random.default_rng(7)
  hs = jnp.asarray(r.standard_normal((2, 7, 16)), jnp.float32)
  ws = jnp.asarray(r.standard_normal((16, V)) * 0.5, jnp.float32)
  t = _logits(8, (2, 7, V))
  tgt = jnp.asarray(r.integers(0, V, (2, 7)), jnp.int32)
  mask = jnp.asarray(r.random((2, 7)) < 0.8, jnp.float32)
  ids, logp, tail = sparse.top_k(t, 6, temperature=1.3, always=tgt)
  loss = losses.get(name, **params)

  def unfused(hs, ws):
    total, count, _ = sparse.loss_sum(loss, hs @ ws, ids, logp, tail, tgt, mask, temperature=1.3,
                                      reduction=reduction)
    return total / jnp.maximum(count, 1.0) if loss.per_token else total

  def fused(hs, ws):
    return fused_cached_loss(hs, ws, ids, logp, tail, mask, tgt, loss=loss, temperature=1.3,
                             reduction=reduction, chunk_size=4)[0]

  (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(hs, ws) for f in (unfused, fused))
  np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6)
  for x, y in zip(ga, gb):
    np.testing.assert_allclose(y, x, rtol=2e-4, atol=1e-6)
