"""ATKD vs a brute-force float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_ref
from gkd_jax import atkd as at
from gkd_jax import divergences as dv


def _case(seed, b=3, t=9, v=21, scale=3.0):
  r = np.random.default_rng(seed)
  s = (scale * r.standard_normal((b, t, v))).astype(np.float32)
  te = (scale * r.standard_normal((b, t, v))).astype(np.float32)
  tgt = r.integers(0, v, (b, t)).astype(np.int32)
  return s, te, tgt


@pytest.mark.parametrize("scale", [0.5, 3.0, 30.0])
def test_kl_identity_tkd_plus_u_dkd(scale):
  s, t, g = _case(0, scale=scale)
  # Make some teacher targets near-certain (u ~ 0) and some very unlikely.
  t[0, :, :] = -5.0
  t[0, np.arange(9), g[0]] = 20.0
  p = at.decompose(s, t, g)
  kl = dv.forward_kl(s, t)
  np.testing.assert_allclose(p["tkd"] + p["uncertainty"] * p["dkd"], kl, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("base", ["fkl", "rkl"])
def test_decompose_matches_reference(base):
  s, t, g = _case(1)
  parts = at.decompose_log_probs(dv.log_probs(s, 2.0), dv.log_probs(t, 2.0), g, base)
  tkd, dkd, u = np_ref.tkd_dkd(s, t, g, temperature=2.0, base=base)
  np.testing.assert_allclose(parts["tkd"], tkd, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parts["dkd"], dkd, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parts["uncertainty"], u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", ["sequence", "batch"])
@pytest.mark.parametrize("n_valid", [0, 1, 2, 5, 6, 7, 8])
@pytest.mark.parametrize("hard_fraction", [0.5, 0.25, 0.3])
def test_hard_split_matches_brute_force_sort(split, n_valid, hard_fraction):
  r = np.random.default_rng(n_valid)
  u = r.choice([0.1, 0.5, 0.5, 0.9], size=(4, 8)).astype(np.float32)  # many ties
  mask = np.zeros((4, 8), bool)
  for row in range(4):
    mask[row, r.permutation(8)[: max(0, n_valid - row)]] = True
  got = at.hard_mask(u, mask, hard_fraction=hard_fraction, split=split)
  want = np_ref.hard_mask(u, mask, hard_fraction, split)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("split", ["sequence", "batch"])
@pytest.mark.parametrize("base", ["fkl", "rkl"])
def test_atkd_loss_matches_reference(split, base):
  s, t, g = _case(2, b=3, t=7)
  g = g % 18  # targets live in the real (unpadded) vocab
  mask = np.ones((3, 7), bool)
  mask[0, 4:] = False   # odd count (4 valid)... and rows with 7 and 1 valid
  mask[2, 1:] = False
  loss, m = at.atkd_loss(s, t, g, mask, split=split, base=base, temperature=1.5,
                         vocab_size=18)
  want = np_ref.atkd_loss(s, t, g, mask, split=split, base=base, temperature=1.5,
                          vocab_size=18)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  tkd, dkd, u = np_ref.tkd_dkd(s, t, g, 1.5, 18, base)
  np.testing.assert_allclose(m["tkd"], tkd[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["dkd"], dkd[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["hard_fraction"],
                             np_ref.hard_mask(u, mask, 0.5, split).sum() / mask.sum(), rtol=1e-6)


def test_masked_tokens_never_change_loss_or_grads():
  s, t, g = _case(3)
  mask = np.random.default_rng(4).random((3, 9)) < 0.6
  f = lambda s, t, g: at.atkd_loss(s, t, g, mask)[0]
  loss, grad = jax.value_and_grad(f)(s, t, g)
  s2, t2, g2 = s.copy(), t.copy(), g.copy()
  s2[~mask] = 1e3 * np.random.default_rng(5).standard_normal(s2[~mask].shape)
  t2[~mask], g2[~mask] = -7.0, -1  # even an out-of-range target id
  loss2, grad2 = jax.value_and_grad(f)(s2, t2, g2)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad2)[mask], np.asarray(grad)[mask], rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(grad2)[~mask] == 0)


def test_degenerate_counts_are_finite():
  s, t, g = _case(6, b=2, t=4)
  for mask in (np.zeros((2, 4), bool), np.eye(2, 4, dtype=bool)):
    loss, grad = jax.value_and_grad(lambda s: at.atkd_loss(s, t, g, mask)[0])(s)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, np_ref.atkd_loss(s, t, g, mask), rtol=1e-5, atol=1e-7)
  # Ties everywhere: identical teacher rows.
  t_same = np.broadcast_to(t[:, :1], t.shape).copy()
  g_same = np.broadcast_to(g[:, :1], g.shape).copy()
  mask = np.ones((2, 4), bool)
  np.testing.assert_allclose(at.atkd_loss(s, t_same, g_same, mask)[0],
                             np_ref.atkd_loss(s, t_same, g_same, mask), rtol=1e-5)


def test_gradient_reaches_student_only_and_is_finite():
  s, t, g = _case(7)
  mask = np.ones((3, 9), bool)
  gs, gt = jax.grad(lambda s, t: at.atkd_loss(s, t, g, mask)[0], argnums=(0, 1))(s, t)
  assert np.all(np.isfinite(gs)) and np.abs(gs).sum() > 0
  assert np.all(np.isfinite(gt))


@pytest.mark.parametrize("kwargs,match", [
    ({"easy_weight": 1.2}, "easy_weight"),
    ({"hard_fraction": -0.1}, "hard_fraction"),
    ({"split": "token"}, "unknown split 'token'.*sequence, batch"),
    ({"base": "jsd"}, "unknown base 'jsd'.*fkl, rkl"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_params(kwargs, match):
  s, t, g = _case(8)
  with pytest.raises(ValueError, match=match):
    at.atkd_loss(s, t, g, np.ones((3, 9), bool), **kwargs)


def test_bad_shapes():
  s, t, g = _case(9)
  with pytest.raises(ValueError, match="targets must have shape"):
    at.atkd_loss(s, t, g[:, :-1], np.ones((3, 9), bool))
  with pytest.raises(ValueError, match="targets must be integer"):
    at.decompose(s, t, g.astype(np.float32))
  with pytest.raises(ValueError, match="mask must have shape"):
    at.atkd_loss(s, t, g, np.ones((3, 8), bool))
  with pytest.raises(ValueError, match="same shape"):
    at.decompose(s, t[..., :-1], g)
