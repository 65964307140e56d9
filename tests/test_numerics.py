"""gkd_jax.models.numerics: the rounded matmul (forward and gradients against NumPy float64
with the TPU-default rounding written out) and the pre-cast model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkd_jax.models import numerics
from gkd_jax.models.llama import Llama, LlamaConfig

EQS = {
  "btd,dhk->bthk": ((2, 3, 8), (8, 4, 5)),  # q/k/v projections
  "bthk,hkd->btd": ((2, 3, 4, 5), (4, 5, 8)),  # output projection
  "btd,dv->btv": ((2, 3, 8), (8, 11)),  # the LM head
  "cd,dv->cv": ((6, 8), (8, 11)),  # the fused head's chunk
}


def _bf16(a):
  """float64 copy of ``a`` rounded to bfloat16 (round to nearest even, as XLA's convert)."""
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("eq", list(EQS))
def test_rounded_dot_forward_and_gradients_match_float64_reference(eq):
  xs, ws = EQS[eq]
  r = np.random.default_rng(0)
  x, w = (jnp.asarray(r.normal(size=s), jnp.float32) for s in (xs, ws))
  c = jnp.asarray(r.normal(size=np.einsum(eq, np.zeros(xs), np.zeros(ws)).shape), jnp.float32)
  f = lambda x, w: jnp.sum(c * numerics.dot(eq, x, w, "bfloat16"))
  out = numerics.dot(eq, x, w, "bfloat16")
  gx, gw = jax.grad(f, (0, 1))(x, w)
  a, b, o = eq.replace("->", ",").split(",")
  xr, wr, cr = _bf16(x), _bf16(w), _bf16(c)  # the backward rounds the cotangent too
  assert out.dtype == gx.dtype == gw.dtype == jnp.float32  # no bfloat16 cotangents
  np.testing.assert_allclose(out, np.einsum(eq, xr, wr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, np.einsum(f"{o},{b}->{a}", cr, wr), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, np.einsum(f"{a},{o}->{b}", xr, cr), rtol=1e-5, atol=1e-5)
  # and it is not float32: the unrounded gradient is 1e-3 away
  assert np.abs(gw - np.einsum(f"{a},{o}->{b}", np.float64(x), np.float64(c))).max() > 1e-3


def test_same_dtype_is_plain_einsum_autodiff():
  r = np.random.default_rng(1)
  x, w = jnp.asarray(r.normal(size=(2, 3, 8)), jnp.float32), jnp.asarray(r.normal(size=(8, 5)))
  f = lambda fn: jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), (0, 1))(x, w)
  got = f(lambda x, w: numerics.dot("btd,dv->btv", x, w, "float32"))
  want = f(lambda x, w: jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32))
  for g, h in zip(got, want):
    np.testing.assert_array_equal(g, h)


# + a tied head's [V, D], for decode and for the fused head's chunks
WEIGHT_MAJOR = dict(EQS, **{"btd,vd->btv": ((2, 3, 8), (11, 8)), "cd,vd->cv": ((6, 8), (11, 8))})


def _barriers(eq, x, w):
  jaxpr = jax.make_jaxpr(lambda x, w: numerics.dot(eq, x, w, x.dtype))(x, w)
  return str(jaxpr).count("optimization_barrier")


@pytest.mark.parametrize("eq", list(WEIGHT_MAJOR))
def test_cpu_weight_major_dot_is_the_same_matmul(eq, monkeypatch):
  """float32 and bfloat16, 2-64 rows (here 6): the CPU weight-major form (W[free, summed] @
  x[summed, rows]) gives the float64 product (of the bfloat16 values: float32 accumulation) and
  float32 gradients to float32 rounding, and is the path taken: its barriers appear in the jaxpr,
  and not outside the rows range (per dtype), for float16 inputs, or for a batch index."""
  monkeypatch.setattr(numerics, "CPU_WEIGHT_MAJOR_MIN_SIZE", 0)  # the test's weights are small
  xs, ws = WEIGHT_MAJOR[eq]
  r = np.random.default_rng(4)
  x, w = (jnp.asarray(r.normal(size=s), jnp.float32) for s in (xs, ws))
  c = r.normal(size=np.einsum(eq, np.zeros(xs), np.zeros(ws)).shape)
  assert _barriers(eq, x, w) == 3
  out = numerics.dot(eq, x, w, "float32")
  c32 = jnp.asarray(c, jnp.float32)
  gx, gw = jax.grad(lambda x, w: jnp.sum(c32 * numerics.dot(eq, x, w, "float32")), (0, 1))(x, w)
  a, b, o = eq.replace("->", ",").split(",")
  x64, w64 = np.float64(x), np.float64(w)
  assert out.shape == np.einsum(eq, x64, w64).shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.einsum(eq, x64, w64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, np.einsum(f"{o},{b}->{a}", c, w64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, np.einsum(f"{a},{o}->{b}", x64, c), rtol=1e-5, atol=1e-5)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  assert _barriers(eq, xb, wb) == 3
  outb = numerics.dot(eq, xb, wb, "bfloat16", jnp.float32)
  want = np.einsum(eq, np.float64(xb), np.float64(wb))
  np.testing.assert_allclose(outb, want, rtol=1e-5, atol=1e-5)
  assert _barriers(eq, x.astype(jnp.float16), w.astype(jnp.float16)) == 0
  monkeypatch.setattr(numerics, "CPU_WEIGHT_MAJOR_ROWS", {"float32": (7, 64), "bfloat16": (7, 64)})
  assert _barriers(eq, x, w) == 0 and _barriers(eq, xb, wb) == 0
  monkeypatch.setattr(numerics, "CPU_WEIGHT_MAJOR_ROWS", {"float32": (2, 64)})
  assert _barriers(eq, x, w) == 3 and _barriers(eq, xb, wb) == 0
  xb, wb = jnp.ones((3, 2, 4)), jnp.ones((3, 4, 5))
  assert _barriers("bij,bjk->bik", xb, wb) == 0


@pytest.mark.parametrize("eq,ws", [("cd,vd->cv", (4096, 64)), ("cd,dv->cv", (64, 4096))])
def test_cpu_weight_major_bfloat16_dot_with_one_row_axis_stays_bfloat16(eq, ws):
  """A 2-D x (the fused head's [C, D] chunk) in the weight-major form: CPU XLA ran a
  [V, D] @ [D, C] bf16 dot as float32, converting the whole weight on every call (10x slower
  at 64 rows and V = 49152); the form now gives x a unit axis, as a decode's [B, T, D] has.
  No float32 copy of the weight in the compiled program."""
  if jax.default_backend() != "cpu":
    pytest.skip("the weight-major form is CPU-only")
  w, x = jnp.ones(ws, jnp.bfloat16), jnp.ones((4, 64), jnp.bfloat16)
  assert _barriers(eq, x, w) == 3  # the weight-major form
  hlo = jax.jit(lambda x, w: numerics.dot(eq, x, w, "bfloat16", jnp.float32)).lower(x, w)
  text = hlo.compile().as_text()
  assert "bf16[4096,64]" in text or "bf16[64,4096]" in text
  assert "f32[4096,64]" not in text and "f32[64,4096]" not in text


def test_a_llama_decode_with_weight_major_dots_draws_what_the_plain_dots_draw(monkeypatch):
  """Greedy sampling (prefill, then 1-row-per-sequence decode steps: the weight-major form) with
  and without it: the same tokens, log-probs within float32 summation-order noise."""
  from gkd_jax.sampling import sample
  cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, mlp_dim=48, tie_embeddings=True)
  model = Llama(cfg, rngs=nnx.Rngs(5))
  prompts = jnp.asarray(np.random.default_rng(5).integers(0, 64, (3, 6)), jnp.int32)
  run = lambda: sample(model, prompts, jnp.asarray([6, 4, 5]), rng=jax.random.PRNGKey(0),
                       max_new_tokens=9, temperature=0.0)
  barriers, barrier = [], jax.lax.optimization_barrier
  monkeypatch.setattr(jax.lax, "optimization_barrier", lambda x: barriers.append(1) or barrier(x))
  monkeypatch.setattr(numerics, "CPU_WEIGHT_MAJOR_MIN_SIZE", 0)
  jax.clear_caches()  # the constants are read at trace time
  on, taken = run(), len(barriers)
  monkeypatch.setattr(numerics, "CPU_WEIGHT_MAJOR_ROWS", {})
  jax.clear_caches()
  off = run()
  assert taken > 0 and len(barriers) == taken  # weight-major in the first run only
  np.testing.assert_array_equal(on.tokens, off.tokens)
  np.testing.assert_allclose(on.logprobs, off.logprobs, rtol=1e-5, atol=1e-5)
  jax.clear_caches()


def test_out_dtype_and_bad_equations():
  x, w = jnp.ones((2, 4), jnp.bfloat16), jnp.ones((4, 3), jnp.float32)
  assert numerics.dot("cd,dv->cv", x, w, "bfloat16", jnp.float32).dtype == jnp.float32
  assert numerics.dot("cd,dv->cv", x, w, "bfloat16").dtype == jnp.bfloat16
  for eq in ("...d,dv->...v", "cd,dv", "cdd,dv->cv", "cde,dv->cv"):
    with pytest.raises(ValueError, match="dot"):
      numerics.dot(eq, jnp.ones((2, 4, 4)) if "dd" in eq or "de" in eq else x, w, "bfloat16")


def test_with_dot_dtype_stores_matrices_rounded_and_changes_no_number():
  cfg = LlamaConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                    mlp_dim=24, tie_embeddings=True)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 32, (2, 7)), jnp.int32)
  rounding = Llama(dataclasses.replace(cfg, dot_dtype="bfloat16"), rngs=nnx.Rngs(0))
  stored = numerics.with_dot_dtype(*nnx.split(model), "bfloat16")
  leaves = jax.tree.leaves(nnx.state(stored, nnx.Param))
  assert {x.dtype for x in leaves if x.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in leaves if x.ndim == 1} == {jnp.dtype(jnp.float32)}  # norms
  assert stored.cfg.dot_dtype == "bfloat16"
  np.testing.assert_array_equal(stored(tokens), rounding(tokens))
  assert np.abs(np.asarray(stored(tokens)) - np.asarray(model(tokens))).max() > 1e-4
  assert numerics.with_dot_dtype(*nnx.split(model), None).cfg.dot_dtype is None


def test_llama_training_gradient_with_bf16_dots_is_close_to_float32():
  """dot_dtype='bfloat16' training: float32 gradients (parameters stay float32), within
  bfloat16 rounding of the float32 gradient, and not equal to it."""
  cfg = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, mlp_dim=48, tie_embeddings=True)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 9)), jnp.int32)

  def grads(c):
    gd, params = nnx.split(Llama(c, rngs=nnx.Rngs(0)))
    loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(gd, p)(tokens))[..., 0])
    return jax.tree.leaves(jax.grad(loss)(params))

  full, half = grads(cfg), grads(dataclasses.replace(cfg, dot_dtype="bfloat16"))
  assert all(h.dtype == jnp.float32 for h in half)
  rel = max(float(jnp.abs(h - f).max() / jnp.abs(f).max()) for h, f in zip(half, full))
  assert 1e-5 < rel < 3e-2


def test_dot_dtype_keys_refuse_encoder_decoder_models():
  import ml_collections

  from gkd_jax.models import students
  from gkd_jax.models.t5 import T5, T5Config

  t5 = T5(T5Config(vocab_size=32, d_model=16, d_kv=4, n_heads=2, d_ff=24, n_encoder_layers=1,
                   n_decoder_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="teacher.dot_dtype='bfloat16' is for decoder-only"):
    students.frozen_teacher(t5, ml_collections.ConfigDict({"dot_dtype": "bfloat16",
                                                            "scan_layers": False}))
  assert students.frozen_teacher(t5, ml_collections.ConfigDict({"dot_dtype": "",
                                                            "scan_layers": False})) is t5


@pytest.mark.parametrize(
  "platform, flags, want",
  [
    ("cpu", {"avx", "avx2", "fma"}, ""),  # e.g. a Zen 3 EPYC: bf16 is widened, float32 wins
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ("cpu", {"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),
    ("cpu", set(), ""),  # no /proc/cpuinfo (macOS): the model's own numerics
    ("tpu", set(), "bfloat16"),
    ("gpu", set(), "bfloat16"),
  ],
)
def test_auto_dot_dtype_follows_the_hardware(monkeypatch, platform, flags, want):
  monkeypatch.setattr(numerics, "cpu_flags", lambda: frozenset(flags))
  assert numerics.resolve_dot_dtype("auto", platform) == want
  for fixed in ("", "float32", "bfloat16"):  # only "auto" is resolved
    assert numerics.resolve_dot_dtype(fixed, platform) == fixed


def test_cpu_flags_reads_this_machine():
  flags = numerics.cpu_flags()
  assert isinstance(flags, frozenset)
  if jax.default_backend() == "cpu" and flags:  # x86 Linux: every x86-64 CPU has SSE2
    assert "sse2" in flags or "fp" in flags or "asimd" in flags


def test_auto_dot_dtypes_in_a_config(monkeypatch):
  from gkd_jax import config as config_lib

  c = config_lib.defaults()
  c.teacher.dot_dtype = c.student.dot_dtype = "auto"
  c.gkd.sample_dot_dtype = "float32"
  config_lib.validate(c)
  monkeypatch.setattr(numerics, "native_bf16_dots", lambda platform=None: True)
  r = config_lib.resolve_dot_dtypes(c, encoder_decoder=False)
  assert (r.teacher.dot_dtype, r.student.dot_dtype, r.gkd.sample_dot_dtype) == (
    "bfloat16", "bfloat16", "float32")
  assert c.teacher.dot_dtype == "auto"  # a copy: the user's config (and config.json) keep it
  assert config_lib.dot_dtypes(r) == {"gkd.sample_dot_dtype": "float32",
                                      "teacher.dot_dtype": "bfloat16", "student.dot_dtype": "bfloat16"}
  assert config_lib.resolve_dot_dtypes(c, encoder_decoder=True).student.dot_dtype == ""
  monkeypatch.setattr(numerics, "native_bf16_dots", lambda platform=None: False)
  assert config_lib.resolve_dot_dtypes(c, encoder_decoder=False).teacher.dot_dtype == ""
  c.student.dot_dtype = "bf16"
  with pytest.raises(ValueError, match="student.dot_dtype = 'bf16'.*'auto'"):
    config_lib.validate(c)
