"""Sampler: greedy vs no-cache references and transformers, distribution tests, recompiles."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from flax import nnx

from gkd_jax import sampling
from gkd_jax.models.llama import Llama, LlamaConfig
from gkd_jax.models.t5 import T5, T5Config
from gkd_jax.sampling import sample

CFG = LlamaConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_seq_len=48)
PROMPTS = np.array([[5, 6, 7, 8, 0, 0, 0], [9, 10, 11, 12, 13, 14, 15], [3, 0, 0, 0, 0, 0, 0]])
LENS = np.array([4, 7, 1])


@pytest.fixture(scope="module")
def llama():
  return Llama(CFG, rngs=nnx.Rngs(0))


def _greedy_reference(model, prompt, n):
  """argmax of a full, cache-free forward at every step."""
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(jnp.argmax(model(jnp.array([seq]))[0, -1])))
  return seq[len(prompt):]


def test_greedy_equals_no_cache_reference(llama):
  out = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=10,
               temperature=0)
  for b in range(3):
    assert np.asarray(out.tokens[b]).tolist() == _greedy_reference(llama, PROMPTS[b, :LENS[b]], 10)
  assert out.tokens.shape == (3, 10) and bool(out.mask.all()) and out.lengths.tolist() == [10] * 3


def test_mixed_lengths_batch_equals_each_prompt_alone(llama):
  both = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=8, temperature=0)
  for b in range(3):
    alone = sample(llama, PROMPTS[b:b + 1, :LENS[b]], LENS[b:b + 1], rng=jax.random.PRNGKey(0),
                   max_new_tokens=8, temperature=0)
    np.testing.assert_array_equal(both.tokens[b], alone.tokens[0])
    np.testing.assert_allclose(both.logprobs[b], alone.logprobs[0], atol=1e-5)


def test_eos_stays_and_rows_after_it_are_padded_and_masked(llama):
  greedy = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=10,
                  temperature=0)
  eos = int(greedy.tokens[0, 3])  # make row 0's 4th greedy token the EOS
  out = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=10,
               temperature=0, eos_ids=[eos], pad_id=60)
  for b in range(3):
    row = np.asarray(greedy.tokens[b]).tolist()
    n = row.index(eos) + 1 if eos in row else 10
    assert int(out.lengths[b]) == n
    assert np.asarray(out.tokens[b, :n]).tolist() == row[:n]  # EOS kept, in the mask
    assert np.asarray(out.mask[b]).tolist() == [True] * n + [False] * (10 - n)
    assert np.all(np.asarray(out.tokens[b, n:]) == 60)
    assert np.all(np.asarray(out.logprobs[b, n:]) == 0)
  assert int(out.lengths[0]) == 4


def _first_token_draws(model, n, **kw):
  prompts = np.tile(PROMPTS[1:2], (n, 1))
  out = sample(model, prompts, np.full((n,), 7), rng=jax.random.PRNGKey(1), max_new_tokens=1,
               **kw)
  return np.asarray(out.tokens[:, 0]), np.asarray(out.logprobs[:, 0])


def test_first_token_frequencies_match_softmax_chi_square(llama):
  temperature, n = 0.03, 6000  # the tiny random model's logits are small: sharpen them
  toks, logps = _first_token_draws(llama, n, temperature=temperature)
  logits = np.asarray(llama(jnp.asarray(PROMPTS[1:2]))[0, -1], np.float64) / temperature
  p = np.exp(logits - logits.max())
  p /= p.sum()
  counts = np.bincount(toks, minlength=CFG.vocab_size)
  assert p.max() > 20 * p.min()  # far from uniform, so the test has power
  keep = p * n >= 5  # pool rare cells, as the chi-square test wants
  obs = np.append(counts[keep], counts[~keep].sum())
  exp = np.append(p[keep], p[~keep].sum()) * n
  assert scipy.stats.chisquare(obs, exp).pvalue > 1e-3
  uniform = np.full_like(exp, n / exp.size)
  assert scipy.stats.chisquare(obs, uniform).pvalue < 1e-6  # a wrong sampler fails
  np.testing.assert_allclose(logps, np.log(p[toks]), atol=1e-4)  # reported log-probs


def test_top_k_and_top_p_never_emit_excluded_tokens(llama):
  logits = np.asarray(llama(jnp.asarray(PROMPTS[1:2]))[0, -1], np.float64)
  order = np.argsort(-logits)
  toks, _ = _first_token_draws(llama, 2000, top_k=5)
  assert set(toks) <= set(order[:5]) and len(set(toks)) > 1
  p = np.exp(logits - logits.max())
  p /= p.sum()
  nucleus = order[: np.searchsorted(np.cumsum(p[order]), 0.5) + 1]
  toks, logps = _first_token_draws(llama, 2000, top_p=0.5)
  assert set(toks) <= set(nucleus)
  renorm = p[nucleus] / p[nucleus].sum()
  want = dict(zip(nucleus.tolist(), renorm))
  np.testing.assert_allclose(np.exp(logps), [want[t] for t in toks], rtol=1e-3)


def test_filter_logits_reference():
  r = np.random.default_rng(0)
  logits = r.standard_normal((4, 30)).astype(np.float32)
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k=3, top_p=1.0))
  for row, o in zip(logits, out):
    assert set(np.flatnonzero(o > -1e29)) == set(np.argsort(-row)[:3])
  out = np.asarray(sampling.filter_logits(jnp.asarray(logits), top_k=0, top_p=0.8))
  for row, o in zip(logits, out):
    p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
    order = np.argsort(-p)
    k = np.searchsorted(np.cumsum(p[order]), 0.8) + 1
    assert set(np.flatnonzero(o > -1e29)) == set(order[:k])


def test_new_params_do_not_recompile(llama):
  other = Llama(CFG, rngs=nnx.Rngs(1))
  kw = dict(rng=jax.random.PRNGKey(0), max_new_tokens=5, temperature=1.0)
  sample(llama, PROMPTS, LENS, **kw)
  before = sampling._sample.cache_size()
  a = sample(other, PROMPTS, LENS, **kw)
  b = sample(llama, PROMPTS, np.array([3, 5, 1]), **kw)
  assert sampling._sample.cache_size() == before
  assert not np.array_equal(a.tokens, b.tokens)


def test_t5_greedy_matches_transformers_generate():
  torch = pytest.importorskip("torch")
  import transformers
  from gkd_jax.models import convert_t5
  torch.manual_seed(0)
  hf_cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                 num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1)
  hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  cfg = convert_t5.config_from_hf(hf_cfg.to_dict())
  model = convert_t5.from_hf_state_dict(cfg, state)
  enc = np.array([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
  lens = np.array([5, 3])
  out = sample(model, enc, lens, rng=jax.random.PRNGKey(0), max_new_tokens=12, temperature=0)
  for b in range(2):
    with torch.no_grad():
      ref = hf.generate(torch.tensor(enc[b:b + 1, :lens[b]]), max_new_tokens=12,
                        do_sample=False, num_beams=1, eos_token_id=None)[0, 1:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens[b]), ref)


def test_t5_eos_masks_rest():
  model = T5(T5Config(vocab_size=20, d_model=16, d_kv=4, n_heads=2, d_ff=32, n_encoder_layers=1,
                      n_decoder_layers=1, max_decode_len=16), rngs=nnx.Rngs(0))
  enc = np.array([[3, 4, 5], [6, 7, 0]])
  g = sample(model, enc, np.array([3, 2]), rng=jax.random.PRNGKey(0), max_new_tokens=6,
             temperature=0)
  eos = int(g.tokens[0, 1])
  out = sample(model, enc, np.array([3, 2]), rng=jax.random.PRNGKey(0), max_new_tokens=6,
               temperature=0, eos_ids=eos)
  for b in range(2):
    row = np.asarray(g.tokens[b]).tolist()
    n = row.index(eos) + 1 if eos in row else 6
    assert int(out.lengths[b]) == n and not bool(out.mask[b, n:].any())
    assert np.asarray(out.tokens[b, :n]).tolist() == row[:n]


def test_sampling_under_a_mesh_matches_single_device(llama):
  from gkd_jax import sharding
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  with jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh:
    sharded = sharding.shard_model(Llama(CFG, rngs=nnx.Rngs(0)), mesh)
    prompts = np.tile(PROMPTS, (4, 1))[:8]
    lens = np.tile(LENS, 4)[:8]
    batch = sharding.shard_batch({"p": jnp.asarray(prompts), "l": jnp.asarray(lens)}, mesh)
    out = sample(sharded, batch["p"], batch["l"], rng=jax.random.PRNGKey(0), max_new_tokens=6,
                 temperature=0)
  ref = sample(llama, prompts, lens, rng=jax.random.PRNGKey(0), max_new_tokens=6, temperature=0)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  assert out.tokens.sharding.spec[0] is not None  # batch stays sharded on the data axis


@pytest.mark.parametrize("kw,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 42}, "exceeds the model's context of 48"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"temperature": -0.5}, "temperature"),
])
def test_bad_input(llama, kw, match):
  args = {"rng": jax.random.PRNGKey(0), "max_new_tokens": 4, **kw}
  with pytest.raises(ValueError, match=match):
    sample(llama, PROMPTS, LENS, **args)


def test_bad_prompt_shapes(llama):
  with pytest.raises(ValueError, match="prompt_lengths must be in"):
    sample(llama, PROMPTS, np.array([4, 8, 1]), rng=jax.random.PRNGKey(0), max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt_lengths must be \[B=3\]"):
    sample(llama, PROMPTS, LENS[:2], rng=jax.random.PRNGKey(0), max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt_tokens must be \[B, P\]"):
    sample(llama, PROMPTS[0], LENS, rng=jax.random.PRNGKey(0), max_new_tokens=2)


def _brute_force_best(model, prompt, vocab, n, eos, lp):
  """Every hypothesis of <= n tokens (EOS only last; shorter ones must end in EOS)."""
  best = None
  for length in range(1, n + 1):
    for seq in itertools.product(range(vocab), repeat=length):
      if eos in seq[:-1] or (length < n and seq[-1] != eos):
        continue
      logp = np.asarray(jax.nn.log_softmax(model(jnp.array([list(prompt) + list(seq)]))[0], -1))
      score = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(seq)) / length ** lp
      if best is None or score > best[0]:
        best = (score, seq)
  return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_equals_exhaustive_search(length_penalty):
  cfg = LlamaConfig(vocab_size=4, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    mlp_dim=32, max_seq_len=16)
  model = Llama(cfg, rngs=nnx.Rngs(3))
  model.lm_head[...] = model.lm_head[...] * 60.0  # peaked next-token distributions
  prompts, lens, n = np.array([[1, 2, 0], [2, 2, 1], [0, 0, 0]]), np.array([2, 3, 1]), 3
  eos = int(jnp.argmax(model(jnp.array([[1, 2]]))[0, -1]))  # row 0 likes to stop at once
  # beam 18: 2*18 candidates cover every (alive prefix x token), so beam search is exact.
  out = sampling.beam_search(model, prompts, lens, beam_size=18, max_new_tokens=n,
                             length_penalty=length_penalty, eos_ids=eos)
  ended_early = 0
  for b in range(3):
    score, seq = _brute_force_best(model, prompts[b, :lens[b]], 4, n, eos, length_penalty)
    assert np.asarray(out.tokens[b, :len(seq)]).tolist() == list(seq)
    assert int(out.lengths[b]) == len(seq)
    np.testing.assert_allclose(float(out.scores[b]), score, rtol=1e-4, atol=1e-5)
    ended_early += len(seq) < n
  if length_penalty == 0.0:
    assert ended_early  # the EOS path is exercised


def test_beam_size_one_is_greedy(llama):
  greedy = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=6,
                  temperature=0)
  beams = sampling.beam_search(llama, PROMPTS, LENS, beam_size=1, max_new_tokens=6,
                               length_penalty=0.0)
  np.testing.assert_array_equal(beams.tokens, greedy.tokens)
  t5 = T5(T5Config(vocab_size=20, d_model=16, d_kv=4, n_heads=2, d_ff=32, n_encoder_layers=1,
                   n_decoder_layers=1, max_decode_len=16), rngs=nnx.Rngs(0))
  enc = np.array([[3, 4, 5], [6, 7, 0]])
  greedy = sample(t5, enc, np.array([3, 2]), rng=jax.random.PRNGKey(0), max_new_tokens=5,
                  temperature=0)
  beams = sampling.beam_search(t5, enc, np.array([3, 2]), beam_size=1, max_new_tokens=5)
  np.testing.assert_array_equal(beams.tokens, greedy.tokens)


def test_beam_bad_input(llama):
  with pytest.raises(ValueError, match="beam_size"):
    sampling.beam_search(llama, PROMPTS, LENS, beam_size=0, max_new_tokens=3)
  with pytest.raises(ValueError, match="max_new_tokens"):
    sampling.beam_search(llama, PROMPTS, LENS, beam_size=2, max_new_tokens=0)


def test_dot_dtype_precast_changes_no_number(llama):
  """sample(dot_dtype='bfloat16') pre-casts the matrices once; it must equal sampling
  a model whose own cfg says dot_dtype='bfloat16' (rounding at every use), and that
  model's greedy tokens equal its cache-free argmax reference."""
  import dataclasses
  half = Llama(dataclasses.replace(CFG, dot_dtype="bfloat16"), rngs=nnx.Rngs(0))
  for t in (0.0, 1.0):
    args = dict(rng=jax.random.PRNGKey(3), max_new_tokens=10, temperature=t)
    fast = sample(llama, PROMPTS, LENS, dot_dtype="bfloat16", **args)
    slow = sample(half, PROMPTS, LENS, **args)
    np.testing.assert_array_equal(fast.tokens, slow.tokens)
    np.testing.assert_allclose(fast.logprobs, slow.logprobs, atol=1e-6)
  f32 = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(3), max_new_tokens=10)
  assert np.abs(np.asarray(f32.logprobs) - np.asarray(fast.logprobs)).max() > 1e-5
  greedy = sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=10,
                  temperature=0, dot_dtype="bfloat16")
  for b in range(3):
    assert np.asarray(greedy.tokens[b]).tolist() == _greedy_reference(half, PROMPTS[b, :LENS[b]], 10)


def test_dot_dtype_bad_input(llama):
  for bad in ("int8", "nonsense"):
    with pytest.raises(ValueError, match="dot_dtype"):
      sample(llama, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=2, dot_dtype=bad)
  t5 = T5(T5Config(vocab_size=32, d_model=16, d_kv=4, n_heads=2, d_ff=32, n_encoder_layers=1,
                   n_decoder_layers=1, rel_buckets=8, rel_max_distance=16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dot_dtype"):
    sample(t5, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=2, dot_dtype="bfloat16")


@pytest.mark.parametrize("v", [61, 256, 257, 5000])
def test_inverse_cdf_draw_is_the_float64_inverse_cdf_of_its_uniform(v):
  """The two-level draw from logits (one block or several) picks, for the same uniform u, the token a
  float64 inverse CDF of softmax(logits) picks (up to float32 rounding at the boundaries), never
  a zero-probability one (whole blocks of them included), its frequencies follow p, and the
  log-prob it returns is the float64 log-softmax at that token."""
  r = np.random.default_rng(v)
  logits = r.normal(size=(3, v)) * 2 + 5.0  # unnormalised: the draw must not assume logsumexp 0
  logits[:, r.random(v) < 0.3] = -1e30
  logits[0, : v // 2] = -1e30  # whole blocks of zero probability
  logits[1, -1] = 13.0  # most mass in the last (padded) block
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draw = jax.vmap(lambda k: sampling.inverse_cdf_sample(k, jnp.asarray(logits, jnp.float32)))
  toks, logps = (np.asarray(x) for x in draw(keys))
  u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (3, 1)))(keys), np.float64)[..., 0]
  want_logp = scipy.special.log_softmax(np.asarray(logits, np.float32).astype(np.float64), -1)
  p = np.exp(want_logp)
  cdf = np.cumsum(p, -1)
  want = np.stack([np.searchsorted(cdf[b], u[:, b] * cdf[b, -1], side="right") for b in range(3)], 1)
  assert (p[np.arange(3), toks] > 0).all()
  assert (toks == want).mean() > 0.995
  np.testing.assert_allclose(logps, want_logp[np.arange(3), toks], atol=2e-5)
  for b in range(3):
    counts = np.bincount(toks[:, b], minlength=v)
    keep = p[b] * len(keys) >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(p[b, keep], p[b, ~keep].sum()) * len(keys)
    assert scipy.stats.chisquare(obs, exp).pvalue > 1e-4


def _stochastic_reference(model, prompt, n, rng):
  """Cache-free forward at every step; step i draws with inverse_cdf_sample(fold_in(rng, i))."""
  seq = list(prompt)
  for i in range(n):
    logits = model(jnp.array([seq]))[:, -1].astype(jnp.float32)
    key = jax.random.fold_in(rng, i)
    seq.append(int(sampling.inverse_cdf_sample(key, jnp.repeat(logits, 3, 0))[0][0]))
  return seq[len(prompt):]


def test_step_i_draws_with_fold_in_rng_i_and_no_draw_runs_inside_the_decode_loop(llama):
  """Temperature-1 tokens equal a cache-free loop drawing step i from fold_in(rng, i) (row 0 of
  a 3-row draw: the rows' uniforms come from one call per step); the uniforms are drawn before
  the decode scans, so no random-bits primitive runs inside them."""
  rng = jax.random.PRNGKey(11)
  prompt = PROMPTS[:1].repeat(3, 0)
  out = sample(llama, prompt, LENS[:1].repeat(3), rng=rng, max_new_tokens=12)
  want = _stochastic_reference(llama, PROMPTS[0, : LENS[0]], 12, rng)
  assert np.asarray(out.tokens[0]).tolist() == want
  assert len(set(want)) > 3  # a real draw, not a constant
  u = np.asarray(sampling.uniforms(rng, 12, 3))
  ref = np.stack([np.asarray(jax.random.uniform(jax.random.fold_in(rng, i), (3, 1))) for i in range(12)])
  np.testing.assert_array_equal(u, ref)

  graphdef, params = nnx.split(llama)
  cfg = sampling.SampleConfig(max_new_tokens=12)
  jaxpr = jax.make_jaxpr(sampling._sample_core, static_argnums=(0, 5))(
    graphdef, params, jnp.asarray(prompt), jnp.asarray(LENS[:1].repeat(3)), rng, cfg)

  def prims(jx, inside):
    for eqn in jx.eqns:
      sub = inside or eqn.primitive.name == "scan"
      yield eqn.primitive.name, inside
      for v in eqn.params.values():
        for j in v if isinstance(v, (tuple, list)) else (v,):
          if hasattr(j, "jaxpr"):
            yield from prims(j.jaxpr if hasattr(j.jaxpr, "eqns") else j.jaxpr.jaxpr, sub)

  seen = list(prims(jaxpr.jaxpr, False))
  draws = {"random_bits", "threefry2x32", "random_fold_in"}
  assert any(name in draws for name, inside in seen if not inside)
  assert any(name == "scan" for name, _ in seen)
  assert not [name for name, inside in seen if inside and name in draws]


def test_segments_cover_every_decode_step_once():
  for n in range(1, 140):
    for every in (4, 32):
      segs = sampling.segments(n, every)
      steps = [i for a, b in segs for i in range(a, b)]
      assert steps == list(range(1, n))
      assert all(b - a >= every // 2 for a, b in segs[1:])  # no tiny tail (an extra compile)
  assert sampling.segments(128) == ((1, 32), (32, 64), (64, 96), (96, 128))


@pytest.mark.parametrize("scan", [False, True])
def test_a_cache_grown_by_segments_samples_what_one_full_cache_samples(llama, monkeypatch, scan):
  """Segments attend over only the slots filled so far (the cache grows between them): the
  draws, log-probs and EOS handling equal one scan over a full-length cache."""
  import dataclasses
  model = llama
  if scan:
    model = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
  eos = int(sample(model, PROMPTS, LENS, rng=jax.random.PRNGKey(0), max_new_tokens=2,
                   temperature=0).tokens[2, 1])
  out = {}
  for every in (4, 10**6):
    monkeypatch.setattr(sampling, "_SEGMENT", every)
    sampling._sample.clear_cache()  # _SEGMENT is read when _sample traces
    out[every] = sample(model, PROMPTS, LENS, rng=jax.random.PRNGKey(5), max_new_tokens=30,
                        temperature=1.0, eos_ids=[eos])
  assert len(sampling.segments(30, 4)) > 5
  np.testing.assert_array_equal(out[4].tokens, out[10**6].tokens)
  np.testing.assert_array_equal(out[4].mask, out[10**6].mask)
  np.testing.assert_allclose(out[4].logprobs, out[10**6].logprobs, atol=1e-5)
  sampling._sample.clear_cache()


def test_sampling_a_model_cast_once_equals_casting_in_every_call(llama):
  """numerics.with_dot_dtype outside the sampler (as the benchmark does, once) samples exactly
  what sample(dot_dtype=...) samples, which casts inside every call."""
  from gkd_jax.models.numerics import with_dot_dtype

  cast = with_dot_dtype(*nnx.split(llama), "bfloat16")
  assert cast.layers[0].wq[...].dtype == jnp.bfloat16
  args = dict(rng=jax.random.PRNGKey(7), max_new_tokens=6, dot_dtype="bfloat16")
  a, b = sample(llama, PROMPTS, LENS, **args), sample(cast, PROMPTS, LENS, **args)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
