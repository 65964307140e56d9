"""Fused chunked head + loss vs the unfused path (full logits)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from gkd_jax import atkd as at
from gkd_jax import divergences as dv
from gkd_jax import losses
from gkd_jax.fused import fused_loss

B, T, D, DT, V, VREAL = 3, 7, 16, 24, 50, 45
LOSSES = [("fkl", {}), ("rkl", {}), ("tvd", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}),
          ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skl", {"alpha": 0.1}),
          ("srkl", {"alpha": 0.1}),
          ("atkd", {}), ("atkd", {"split": "sequence"}),
          ("atkd", {"base": "rkl", "split": "batch", "hard_fraction": 0.3}),
          ("atkd", {"base": "rkl", "split": "sequence", "hard_fraction": 0.75})]
IDS = [f"{n}-{p}" for n, p in LOSSES]


def _inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 5)
  hs = jax.random.normal(k[0], (B, T, D))
  ws = jax.random.normal(k[1], (D, V)) * 0.5
  ht = jax.random.normal(k[2], (B, T, DT))
  wt = jax.random.normal(k[3], (DT, V)) * 0.5
  tgt = jax.random.randint(k[4], (B, T), 0, VREAL)
  mask = jnp.array(np.random.default_rng(seed).random((B, T)) < 0.7).at[1, 0].set(True)
  return hs, ws, ht, wt, tgt, mask


def _unfused(hs, ws, ht, wt, tgt, mask, *, loss, reduction, temperature, caps, **params):
  s = dv.softcap(hs @ ws, caps[0])
  t = dv.softcap(ht @ wt, caps[1])
  if loss == "atkd":
    return at.atkd_loss(s, t, tgt, mask, temperature=temperature, vocab_size=VREAL, **params)[0]
  fn = losses.get_divergence(loss, temperature=temperature, vocab_size=VREAL, **params)
  return dv.masked_mean(fn(s, t), mask, reduction)[0]


def _fused(hs, ws, ht, wt, tgt, mask, *, loss, reduction, temperature, caps, **params):
  return fused_loss(hs, ws, ht, wt, mask, tgt, loss=loss, reduction=reduction,
                    temperature=temperature, vocab_size=VREAL, student_softcap=caps[0],
                    teacher_softcap=caps[1], chunk_size=4, **params)[0]


@pytest.mark.parametrize("loss,params", LOSSES, ids=IDS)
@pytest.mark.parametrize("reduction,temperature,caps", [
    ("token", 1.0, (None, None)), ("sequence", 2.0, (5.0, 8.0))])
def test_value_and_grads_equal_unfused(loss, params, reduction, temperature, caps):
  args = _inputs()
  kw = dict(loss=loss, reduction=reduction, temperature=temperature, caps=caps, **params)
  vg = lambda f: jax.jit(jax.value_and_grad(functools.partial(f, **kw), argnums=(0, 1, 2, 3)))
  (a, ga), (b, gb) = vg(_unfused)(*args), vg(_fused)(*args)
  np.testing.assert_allclose(b, a, rtol=1e-5)
  for x, y in zip(gb[:2], ga[:2]):  # student hidden and head
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y))))
  assert float(jnp.max(jnp.abs(ga[0]))) > 0
  for x in gb[2:]:  # the teacher is stop-gradient
    assert float(jnp.max(jnp.abs(x))) == 0.0


@pytest.mark.parametrize("loss,params", [("fkl", {}), ("jsd", {"beta": 0.5}), ("atkd", {})])
@pytest.mark.parametrize("b,t,d", [(3, 7, 16), (5, 9, 8)], ids=["dW-stacked", "dW-accumulated"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_dw_paths_and_head_layouts_equal_unfused(loss, params, b, t, d, layout):
  """dW from stacked logit cotangents (N <= 2D) or a scan accumulator (N > 2D), and a head
  given as [V, D] (a tied embedding as stored): the unfused value and gradients."""
  k = jax.random.split(jax.random.PRNGKey(7), 5)
  hs, ws = jax.random.normal(k[0], (b, t, d)), jax.random.normal(k[1], (d, V)) * 0.5
  ht, wt = jax.random.normal(k[2], (b, t, DT)), jax.random.normal(k[3], (DT, V)) * 0.5
  tgt = jax.random.randint(k[4], (b, t), 0, VREAL)
  mask = jnp.array(np.random.default_rng(1).random((b, t)) < 0.7).at[0, 0].set(True)
  kw = dict(loss=loss, reduction="token", temperature=1.0, caps=(None, None), **params)
  ref = jax.value_and_grad(functools.partial(_unfused, **kw), argnums=(0, 1))
  lay = (lambda w: w.T) if layout == "vd" else (lambda w: w)

  def f(hs, w):
    return fused_loss(hs, w, ht, lay(wt), mask, tgt, loss=loss, vocab_size=VREAL, chunk_size=4,
                      student_head_layout=layout, teacher_head_layout=layout, **params)[0]

  (a, (ga_h, ga_w)) = ref(hs, ws, ht, wt, tgt, mask)
  (got, (g_h, g_w)) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, lay(ws))
  np.testing.assert_allclose(got, a, rtol=1e-5)
  np.testing.assert_allclose(g_h, ga_h, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ga_h))))
  np.testing.assert_allclose(lay(g_w), ga_w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ga_w))))


def test_aux_matches_unfused():
  hs, ws, ht, wt, tgt, mask = _inputs(1)
  _, aux = fused_loss(hs, ws, ht, wt, mask, loss="rkl", reduction="sequence", chunk_size=5)
  _, (total, count) = dv.masked_mean(dv.reverse_kl(hs @ ws, ht @ wt), mask, "sequence")
  np.testing.assert_allclose(aux["sum"], total, rtol=1e-5)
  assert float(aux["count"]) == float(count)
  _, aux = fused_loss(hs, ws, ht, wt, mask, tgt, loss="atkd", chunk_size=6)
  _, want = at.atkd_loss(hs @ ws, ht @ wt, tgt, mask)
  for k in want:
    np.testing.assert_allclose(aux[k], want[k], rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("split", [None, "batch", "sequence"])
def test_atkd_hard_split_equals_unfused(split):
  """Same hard tokens and metrics as atkd_loss; the default split is "batch"."""
  hs, ws, ht, wt, tgt, mask = _inputs(5)
  kw = {} if split is None else {"split": split}
  loss, aux = fused_loss(hs, ws, ht, wt, mask, tgt, loss="atkd", chunk_size=4, **kw)
  want, m = at.atkd_loss(hs @ ws, ht @ wt, tgt, mask, **kw)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for k in m:
    np.testing.assert_allclose(aux[k], m[k], rtol=1e-5, err_msg=k)
  other = "sequence" if split in (None, "batch") else "batch"
  got_batch = fused_loss(hs, ws, ht, wt, mask, tgt, loss="atkd", chunk_size=4, split="batch")[0]
  if split is None:
    np.testing.assert_array_equal(loss, got_batch)
  alt = fused_loss(hs, ws, ht, wt, mask, tgt, loss="atkd", chunk_size=4, split=other)[0]
  assert float(alt) != float(loss)  # the two splits differ on this batch


def test_bf16_inputs_keep_dtypes():
  hs, ws, ht, wt, tgt, mask = _inputs(2)
  bf = lambda x: x.astype(jnp.bfloat16)
  f = lambda hs, ws: fused_loss(hs, ws, bf(ht), bf(wt), mask, chunk_size=8)[0]
  loss, (g_h, g_w) = jax.value_and_grad(f, argnums=(0, 1))(bf(hs), bf(ws))
  assert loss.dtype == jnp.float32 and g_h.dtype == jnp.bfloat16 and g_w.dtype == jnp.bfloat16
  ref = dv.masked_mean(dv.forward_kl(bf(hs) @ bf(ws), bf(ht) @ bf(wt)), mask)[0]
  np.testing.assert_allclose(loss, ref, rtol=1e-2)


def _all_avals(jaxpr):
  for eqn in jaxpr.eqns:
    for v in list(eqn.invars) + list(eqn.outvars):
      if hasattr(v, "aval") and hasattr(v.aval, "shape"):
        yield v.aval
    for sub in jaxprs_in_params(eqn.params):
      yield from _all_avals(sub)


@pytest.mark.parametrize("loss", ["fkl", "atkd"])
def test_never_materialises_full_logits(loss):
  """No array in the forward+backward program is as large as [N, V]."""
  n, d, v = 64, 8, 512
  hs, ws = jnp.ones((n, d)), jnp.ones((d, v))
  mask, tgt = jnp.ones((n,)), jnp.zeros((n,), jnp.int32)
  f = lambda hs, ws: fused_loss(hs, ws, hs, ws, mask, tgt, loss=loss, chunk_size=16,
                                split="batch") [0] if loss == "atkd" else \
      fused_loss(hs, ws, hs, ws, mask, loss=loss, chunk_size=16)[0]
  jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(hs, ws).jaxpr
  biggest = max(int(np.prod(a.shape)) for a in _all_avals(jaxpr))
  assert biggest <= 16 * v * 1, biggest  # one chunk of logits at most (N > 2D: dW accumulated)
  hw, ww = jnp.ones((n, 32)), jnp.ones((32, v))  # N <= 2D: the stacked [N, V] cotangents
  jaxpr = jax.make_jaxpr(jax.value_and_grad(
      lambda h, w: fused_loss(h, w, h, w, mask, loss="fkl", chunk_size=16)[0], argnums=(0, 1)
  ))(hw, ww).jaxpr
  assert max(int(np.prod(a.shape)) for a in _all_avals(jaxpr)) <= 2 * 32 * v  # <= 2 [D, V]
  unfused = jax.make_jaxpr(jax.value_and_grad(
      lambda hs, ws: dv.forward_kl(hs @ ws, hs @ ws).mean(), argnums=(0, 1)))(hs, ws).jaxpr
  assert max(int(np.prod(a.shape)) for a in _all_avals(unfused)) >= n * v  # the check can fail


@pytest.mark.parametrize("kwargs,match", [
    ({"loss": "ce"}, "unknown loss 'ce'"),
    ({"loss": "atkd", "targets": None}, "needs targets"),
    ({"loss": "jsd", "beta": 3.0}, "beta"),
    ({"loss": "fkl", "temperature": -1.0}, "temperature"),
    ({"loss": "fkl", "chunk_size": 0}, "chunk_size"),
    ({"loss": "fkl", "reduction": "batch"}, "reduction mode"),
    ({"loss": "atkd", "easy_weight": 2.0}, "easy_weight"),
    ({"loss": "atkd", "beta": 0.5}, "unknown parameter.*beta"),
    ({"loss": "fkl", "vocab_size": 51}, "vocab_size"),
])
def test_bad_input(kwargs, match):
  hs, ws, ht, wt, tgt, mask = _inputs(3)
  kwargs = {"targets": tgt, **kwargs}
  with pytest.raises(ValueError, match=match):
    fused_loss(hs, ws, ht, wt, mask, **kwargs)


def test_bad_shapes():
  hs, ws, ht, wt, tgt, mask = _inputs(4)
  with pytest.raises(ValueError, match="share the token axes"):
    fused_loss(hs, ws, ht[:, :-1], wt, mask)
  with pytest.raises(ValueError, match="student_head must be"):
    fused_loss(hs, ws.T, ht, wt, mask)
  with pytest.raises(ValueError, match="vocab sizes differ"):
    fused_loss(hs, ws, ht, wt[:, :-1], mask)
  with pytest.raises(ValueError, match="student_head must be"):  # [D, V] said to be [V, D]
    fused_loss(hs, ws, ht, wt, mask, student_head_layout="vd")
  with pytest.raises(ValueError, match="teacher_head_layout must be one of"):
    fused_loss(hs, ws, ht, wt, mask, teacher_head_layout="dd")
