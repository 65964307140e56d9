"""Divergences vs float64 NumPy references written from the formulas."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_ref
from gkd_jax import divergences as dv
from gkd_jax import losses

CASES = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}),
         ("jsd", {"beta": 0.9}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
         ("skl", {"alpha": 0.1}), ("skl", {"alpha": 0.0}), ("skl", {"alpha": 1.0}),
         ("srkl", {"alpha": 0.3}), ("srkl", {"alpha": 0.0})]
IDS = [f"{n}-{p}" for n, p in CASES]


def _logits(seed, shape, scale=3.0):
  r = np.random.default_rng(seed)
  return (scale * r.standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_random_logits_match_reference(name, params, temperature):
  s, t = _logits(0, (3, 5, 37)), _logits(1, (3, 5, 37))
  got = losses.get_divergence(name, temperature=temperature, **params)(s, t)
  want = np_ref.divergence(name, s, t, temperature, **params)
  assert got.shape == (3, 5) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_extreme_logits_match_reference(name, params):
  r = np.random.default_rng(2)
  s = np.where(r.random((4, 16)) < 0.5, 1e4, -1e4).astype(np.float32)
  t = np.where(r.random((4, 16)) < 0.5, 1e4, -1e4).astype(np.float32)
  onehot_t = np.where(np.arange(16) == r.integers(0, 16, (4, 1)), 1e4, 0.0).astype(np.float32)
  for tt in (t, onehot_t):
    got = np.asarray(losses.get_divergence(name, **params)(s, tt))
    want = np_ref.divergence(name, s, tt, **params)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_identical_inputs_give_zero(name, params):
  s = _logits(3, (6, 50), scale=10.0)
  np.testing.assert_allclose(losses.get_divergence(name, **params)(s, s), 0.0, atol=1e-6)


@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd", "skl"])
def test_minus_inf_teacher_logits_are_zero_probability(name):
  """A teacher that rules tokens out with -inf (a hard one-hot) stays finite and exact."""
  s = _logits(4, (2, 9))
  t = np.full((2, 9), -np.inf, np.float32)
  t[0, 3], t[1, 0] = 0.0, 0.0
  got = losses.get_divergence(name)(s, t)
  want = np_ref.divergence(name, s, t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_padded_vocab_is_excluded(name, params):
  """Padded entries (>= vocab_size) hold junk; the result equals the cut-off vocab."""
  s, t = _logits(5, (4, 40)), _logits(6, (4, 40))
  s[:, 30:], t[:, 30:] = 50.0, -3.0
  got = losses.get_divergence(name, vocab_size=30, **params)(s, t)
  want = np_ref.divergence(name, s, t, vocab_size=30, **params)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_gradients_match_finite_differences(name, params):
  """d/d(student and teacher logits) of sum(w * D) vs central differences of the f64 reference."""
  s, t = _logits(7, (3, 6), 2.0), _logits(8, (3, 6), 2.0)
  w = np.random.default_rng(9).random(3)
  fn = losses.get_divergence(name, temperature=1.5, **params)
  gs, gt = jax.grad(lambda a, b: jnp.sum(w * fn(a, b)), argnums=(0, 1))(s, t)
  ref = lambda a, b: np.sum(w * np_ref.divergence(name, a, b, 1.5, **params))
  eps = 1e-6
  for x, g, which in ((s, gs, 0), (t, gt, 1)):
    fd = np.zeros(x.shape)
    for idx in np.ndindex(x.shape):
      hi, lo = x.astype(np.float64), x.astype(np.float64)
      hi[idx] += eps
      lo[idx] -= eps
      args_hi = (hi, t) if which == 0 else (s, hi)
      args_lo = (lo, t) if which == 0 else (s, lo)
      fd[idx] = (ref(*args_hi) - ref(*args_lo)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=2e-5)


def test_jsd_endpoints_and_symmetry():
  s, t = _logits(10, (4, 23)), _logits(11, (4, 23))
  jsd = lambda a, b, beta: dv.generalized_jsd(a, b, beta=beta)
  np.testing.assert_array_equal(jsd(s, t, 0.0), dv.forward_kl(s, t))
  np.testing.assert_array_equal(jsd(s, t, 1.0), dv.reverse_kl(s, t))
  np.testing.assert_allclose(jsd(s, t, 0.5), jsd(t, s, 0.5), rtol=1e-6)
  # The mixed formula itself vanishes at the ends (why they are special-cased).
  assert np.all(np.asarray(jsd(s, t, 1e-6)) < 1e-4)
  assert np.all(np.asarray(jsd(s, t, 1 - 1e-6)) < 1e-4)
  # Bounded by log 2 at beta = 0.5 (natural log), and tvd by 1.
  assert np.all(np.asarray(jsd(s, t, 0.5)) <= np.log(2) + 1e-6)
  assert np.all(np.asarray(dv.total_variation(s, t)) <= 1.0 + 1e-6)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_masked_mean_and_exact_accumulation(mode):
  r = np.random.default_rng(12)
  v = r.standard_normal((6, 7)).astype(np.float32)
  m = r.random((6, 7)) < 0.6
  m[2] = False  # an empty row
  mean, (total, count) = dv.masked_mean(v, m, mode)
  np.testing.assert_allclose(mean, np_ref.masked_mean(v, m, mode), rtol=1e-6)
  # Two micro-batches' (sum, count) add up to the exact full-batch mean.
  _, (s1, c1) = dv.masked_mean(v[:3], m[:3], mode)
  _, (s2, c2) = dv.masked_mean(v[3:], m[3:], mode)
  np.testing.assert_allclose((s1 + s2) / (c1 + c2), mean, rtol=1e-6)
  assert float(count) == (m.sum() if mode == "token" else m.any(1).sum())
  # Masked entries never matter, even NaN.
  v2 = np.where(m, v, np.nan)
  np.testing.assert_allclose(dv.masked_mean(v2, m, mode)[0], mean, rtol=1e-6)
  assert float(dv.masked_mean(v, np.zeros_like(m), mode)[0]) == 0.0


def test_jit_and_vmap():
  s, t = _logits(13, (2, 3, 11)), _logits(14, (2, 3, 11))
  fn = jax.jit(losses.get_divergence("jsd", beta=0.3))
  np.testing.assert_allclose(fn(s, t), jax.vmap(fn)(s, t), rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda s, t: dv.forward_kl(s, t[:, :-1]), "same shape"),
    (lambda s, t: dv.generalized_jsd(s, t, beta=1.5), "beta"),
    (lambda s, t: dv.generalized_jsd(s, t, beta=-0.1), "beta"),
    (lambda s, t: dv.skew_kl(s, t, alpha=2.0), "alpha"),
    (lambda s, t: dv.skew_reverse_kl(s, t, alpha=-1), "alpha"),
    (lambda s, t: dv.reverse_kl(s, t, temperature=0.0), "temperature"),
    (lambda s, t: dv.total_variation(s, t, temperature=-1.0), "temperature"),
    (lambda s, t: losses.get_divergence("kl"), "unknown divergence 'kl'.*fkl, rkl, jsd"),
    (lambda s, t: losses.get_divergence("jsd", alpha=0.1), "unknown parameter.*alpha"),
    (lambda s, t: losses.get_divergence("skl", alpha=7), "alpha"),
    (lambda s, t: losses.get_divergence("fkl", temperature=0), "temperature"),
    (lambda s, t: dv.forward_kl(s, t, vocab_size=99), "vocab_size"),
    (lambda s, t: dv.masked_mean(s[..., 0], s[..., 0] > 0, "batch"), "reduction mode 'batch'"),
    (lambda s, t: dv.masked_mean(s[..., 0], s[:1, 0] > 0, "token"), "same shape"),
])
def test_bad_input_raises_naming_the_argument(call, match):
  s, t = _logits(15, (3, 8)), _logits(16, (3, 8))
  with pytest.raises(ValueError, match=match):
    call(s, t)


def test_traced_beta_is_rejected_clearly():
  s, t = _logits(17, (2, 5)), _logits(18, (2, 5))
  with pytest.raises(ValueError, match="beta must be a concrete number"):
    jax.jit(lambda b: dv.generalized_jsd(s, t, beta=b))(0.5)
  jax.jit(functools.partial(dv.generalized_jsd, beta=0.5))(s, t)  # the supported way
