"""ATKD vs a brute-force float64 NumPy reference."""

import functools
import inspect
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_ref
from gkd_jax import atkd as at
from gkd_jax import config, losses, steps
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


SPLITS = ["sequence", "batch"]
FRACTIONS = [0.25, 0.5, 0.75, 1.0]


def _row(u, n=None):
  """mask [1, T] with the first n of len(u) tokens valid, u as float32 [1, T]."""
  u = np.asarray(u, np.float32)[None]
  m = np.zeros(u.shape, bool)
  m[0, : u.shape[1] if n is None else n] = True
  return u, m


@pytest.mark.parametrize("u,want", [
    ([0.4, 0.1, 0.3, 0.2], [1, 0, 1, 1]),            # even: lower middle 0.2, 3 of 4 hard
    ([0.5, 0.1, 0.4, 0.2, 0.3], [1, 0, 1, 0, 1]),    # odd: the middle 0.3
    ([0.2, 0.9, 0.2, 0.2], [1, 1, 1, 1]),            # ties at the threshold are hard
    ([0.9, 0.1, 0.9, 0.1], [1, 1, 1, 1]),            # two pairs: lower middle 0.1
    ([0.7], [1]),                                    # one token
])
def test_median_rule_by_hand(u, want):
  for split in SPLITS:
    got = at.hard_mask(*_row(u), split=split)
    np.testing.assert_array_equal(np.asarray(got)[0], np.array(want, bool))


def test_one_valid_token_is_hard_and_empty_rows_have_none():
  u = np.array([[0.3, 0.9, 0.1], [0.5, 0.2, 0.7], [0.8, 0.8, 0.8]], np.float32)
  mask = np.array([[0, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
  for hf in FRACTIONS + [0.0]:
    got = np.asarray(at.hard_mask(u, mask, hard_fraction=hf, split="sequence"))
    np.testing.assert_array_equal(got, [[0, 1, 0], [0, 0, 0], [1, 1, 1]])
  none = at.hard_mask(u, np.zeros_like(mask), split="batch")
  assert not np.asarray(none).any()
  single = np.zeros_like(mask)
  single[1, 2] = True
  np.testing.assert_array_equal(at.hard_mask(u, single, split="batch"), single)


def test_batch_and_sequence_thresholds_differ():
  u = np.array([[0.1, 0.2, 0.3], [0.7, 0.8, 0.9]], np.float32)
  mask = np.ones((2, 3), bool)
  np.testing.assert_array_equal(at.hard_mask(u, mask, split="sequence"),
                                [[0, 1, 1], [0, 1, 1]])
  # one batch median over 6 values: lower middle = 0.3
  np.testing.assert_array_equal(at.hard_mask(u, mask, split="batch"), [[0, 0, 1], [1, 1, 1]])
  np.testing.assert_array_equal(at.hard_mask(u, mask), at.hard_mask(u, mask, split="batch"))


def test_reference_is_torch_median_and_numpy_lower_quantile():
  """The reference's threshold is torch.median's lower middle and np.quantile 'lower'."""
  r = np.random.default_rng(0)
  for n in range(1, 12):
    v = r.choice([0.1, 0.3, 0.3, 0.6, 0.8], size=n) + r.integers(0, 2, n) * r.random(n)
    for hf in FRACTIONS + [0.0, 0.3, 0.1]:
      got = np_ref.atkd_hard_mask(v[None], np.ones((1, n), bool), hf)[0]
      thr = np.quantile(v, 1 - hf, method="lower")
      if hf == 0.5:
        assert thr == np.sort(v)[(n - 1) // 2]
      np.testing.assert_array_equal(got, v >= thr)
      assert got.sum() >= hf * n


@pytest.mark.parametrize("hard_fraction,exact", [
    (0.0, 0), (0.1, Fraction(1, 10)), (0.3, Fraction(3, 10)), (0.5, Fraction(1, 2)),
    (0.71, Fraction(71, 100)), (1 / 3, Fraction(1, 3)), (0.9999, Fraction(9999, 10_000)),
    (1.0, 1)])
def test_quantile_index_is_exact(hard_fraction, exact):
  """j = floor((1 - hf) * (n - 1)) with no float rounding (0.7 * 10 is 7, not 6)."""
  n = np.array([0, 1, 2, 3, 4, 5, 10, 11, 21, 101, 1001, 10_001, 123_457, 2**31 - 1], np.int64)
  got = np.asarray(at._quantile_index(jnp.asarray(n, jnp.int32), hard_fraction))
  q = 1 - Fraction(exact)
  want = [math.floor(q * max(int(k) - 1, 0)) for k in n]
  np.testing.assert_array_equal(got, want)
  assert np.all(got <= np.maximum(n - 1, 0))


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("n_valid", [0, 1, 2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("hard_fraction", FRACTIONS + [0.0, 0.3])
def test_hard_mask_matches_brute_force(split, n_valid, hard_fraction):
  r = np.random.default_rng(n_valid)
  u = r.choice([0.1, 0.5, 0.5, 0.9], size=(4, 8)).astype(np.float32)  # many ties
  u[3] = r.random(8)  # and a row without ties
  mask = np.zeros((4, 8), bool)
  for row in range(4):
    mask[row, r.permutation(8)[: max(0, n_valid - row)]] = True
  got = at.hard_mask(u, mask, hard_fraction=hard_fraction, split=split)
  want = np_ref.atkd_hard_mask(u, mask, hard_fraction, split)
  np.testing.assert_array_equal(got, want)
  jitted = jax.jit(functools.partial(at.hard_mask, hard_fraction=hard_fraction, split=split))
  np.testing.assert_array_equal(jitted(u, mask), want)


def _loss_case(seed=2):
  """4 rows with 4 (even), 7 (odd), 1 and 0 valid tokens; exact ties in u: positions
  0-2 of row 1 and position 0 of row 0 share one teacher distribution and target."""
  s, t, g = _case(seed, b=4, t=7)
  g = g % 18  # targets live in the real (unpadded) vocab
  t[1, 1], t[1, 2], t[0, 0] = t[1, 0], t[1, 0], t[1, 0]
  g[1, 1], g[1, 2], g[0, 0] = g[1, 0], g[1, 0], g[1, 0]
  mask = np.zeros((4, 7), bool)
  mask[0, :4] = mask[1, :] = mask[2, 3] = True
  return s, t, g, mask


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("base", ["fkl", "rkl"])
@pytest.mark.parametrize("hard_fraction", FRACTIONS)
def test_atkd_loss_matches_reference(split, base, hard_fraction):
  s, t, g, mask = _loss_case()
  kw = dict(split=split, base=base, temperature=1.5, vocab_size=18, hard_fraction=hard_fraction)
  loss, m = at.atkd_loss(s, t, g, mask, **kw)
  want = np_ref.atkd_loss(s, t, g, mask, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  tkd, dkd, u = np_ref.tkd_dkd(s, t, g, 1.5, 18, base)
  assert u[1, 0] == u[1, 1] == u[1, 2] == u[0, 0]  # the ties are exact
  np.testing.assert_allclose(m["tkd"], tkd[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["dkd"], dkd[mask].mean(), rtol=1e-5)
  hard = np_ref.atkd_hard_mask(u, mask, hard_fraction, split)
  np.testing.assert_allclose(m["hard_fraction"], hard.sum() / mask.sum(), rtol=1e-6)
  parts = at.decompose_log_probs(dv.log_probs(s, 1.5, 18), dv.log_probs(t, 1.5, 18), g, base)
  np.testing.assert_array_equal(
      at.hard_mask(parts["uncertainty"], mask, hard_fraction=hard_fraction, split=split), hard)
  assert not hard[3].any()  # the row without valid tokens
  if split == "sequence":
    assert hard[2, 3] and hard[2].sum() == 1  # the one-token row: that token is hard


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("base", ["fkl", "rkl"])
def test_ties_at_the_threshold_are_hard(split, base):
  """One row, u pattern a < b = b = b < c = c: the lower median of 6 is s_2 = b."""
  s, t, g = _case(10, b=1, t=6)
  order = [0, 1, 1, 1, 2, 2]
  tmpl = np.stack([np.full(21, -2.0), np.zeros(21), np.zeros(21)]).astype(np.float32)
  tmpl[0, 5], tmpl[1, 5], tmpl[2, 5] = 6.0, 2.0, 0.5  # p_T(5): high, mid, low
  t[0], g[0] = tmpl[order], 5
  mask = np.ones((1, 6), bool)
  parts = at.decompose_log_probs(dv.log_probs(s), dv.log_probs(t), g, base)
  u = np.asarray(parts["uncertainty"])[0]
  assert u[0] < u[1] == u[2] == u[3] < u[4] == u[5]
  hard = at.hard_mask(parts["uncertainty"], mask, split=split)
  np.testing.assert_array_equal(hard, [[0, 1, 1, 1, 1, 1]])
  loss, m = at.atkd_loss(s, t, g, mask, split=split, base=base)
  np.testing.assert_allclose(loss, np_ref.atkd_loss(s, t, g, mask, split=split, base=base),
                             rtol=1e-5)
  np.testing.assert_allclose(m["hard_fraction"], 5 / 6, rtol=1e-6)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("base", ["fkl", "rkl"])
def test_single_valid_token_is_hard(split, base):
  s, t, g = _case(11, b=2, t=5)
  mask = np.zeros((2, 5), bool)
  mask[1, 3] = True
  loss, m = at.atkd_loss(s, t, g, mask, split=split, base=base)
  tkd, dkd, _ = np_ref.tkd_dkd(s, t, g, base=base)
  np.testing.assert_allclose(loss, 0.8 * (tkd[1, 3] + dkd[1, 3]), rtol=1e-5)
  assert float(m["hard_fraction"]) == 1.0


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("hard_fraction", [0.5, 0.25])
def test_masked_tokens_never_change_loss_or_grads(split, hard_fraction):
  s, t, g = _case(3)
  mask = np.random.default_rng(4).random((3, 9)) < 0.6
  f = lambda s, t, g: at.atkd_loss(s, t, g, mask, split=split, hard_fraction=hard_fraction)[0]
  loss, grad = jax.value_and_grad(f)(s, t, g)
  s2, t2, g2 = s.copy(), t.copy(), g.copy()
  s2[~mask] = 1e3 * np.random.default_rng(5).standard_normal(s2[~mask].shape)
  t2[~mask], g2[~mask] = -7.0, -1  # even an out-of-range target id
  loss2, grad2 = jax.value_and_grad(f)(s2, t2, g2)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad2)[mask], np.asarray(grad)[mask], rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(grad2)[~mask] == 0)
  np.testing.assert_allclose(loss, np_ref.atkd_loss(s, t, g, mask, hard_fraction=hard_fraction,
                                                    split=split), rtol=1e-5)


@pytest.mark.parametrize("split", SPLITS)
def test_degenerate_counts_are_finite(split):
  s, t, g = _case(6, b=2, t=4)
  for mask in (np.zeros((2, 4), bool), np.eye(2, 4, dtype=bool)):
    loss, grad = jax.value_and_grad(lambda s: at.atkd_loss(s, t, g, mask, split=split)[0])(s)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, np_ref.atkd_loss(s, t, g, mask, split=split),
                               rtol=1e-5, atol=1e-7)
  # Ties everywhere: identical teacher rows -> every valid token is hard.
  t_same = np.broadcast_to(t[:, :1], t.shape).copy()
  g_same = np.broadcast_to(g[:, :1], g.shape).copy()
  mask = np.ones((2, 4), bool)
  loss, m = at.atkd_loss(s, t_same, g_same, mask, split=split)
  np.testing.assert_allclose(loss, np_ref.atkd_loss(s, t_same, g_same, mask, split=split),
                             rtol=1e-5)
  if split == "sequence":
    assert float(m["hard_fraction"]) == 1.0


def test_default_split_is_batch():
  for fn in (at.hard_mask, at.atkd_weights, at.atkd_loss):
    assert inspect.signature(fn).parameters["split"].default == "batch", fn.__name__
  assert losses.ATKD().split == "batch" and steps.LossSpec.from_config(config.defaults()).loss == losses.JSD()
  assert config.defaults().gkd.atkd_split == "batch"
  s, t, g = _case(12)
  mask = np.ones((3, 9), bool)
  default = at.atkd_loss(s, t, g, mask)[0]
  np.testing.assert_array_equal(default, at.atkd_loss(s, t, g, mask, split="batch")[0])
  assert float(default) != float(at.atkd_loss(s, t, g, mask, split="sequence")[0])


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
