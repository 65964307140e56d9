"""T5 (gkd_jax.models.t5 / convert_t5) against transformers' T5ForConditionalGeneration."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file

from gkd_jax.models import convert_t5
from gkd_jax.models.t5 import T5, T5Config

V, PAD, EOS = 100, 0, 1
# v1.1 / Flan-T5: gated-gelu, untied head. Original T5: relu, tied + scaled head,
# and few buckets / short max distance so the clamped log buckets are exercised.
HF_KW = {
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "orig": dict(feed_forward_proj="relu", tie_word_embeddings=True,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20),
}


def hf_model(kind: str, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                                num_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                                decoder_start_token_id=PAD, **HF_KW[kind])
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    if kind == "v1_1":  # transformers 5 ties lm_head at init; make it a real, distinct head
        model.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 32 ** -0.5)
    return model


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_logits(model, enc, enc_mask, dec, dec_mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                     decoder_input_ids=torch.tensor(dec),
                     decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()


@nnx.jit
def forward(model, enc, dec, enc_mask=None, dec_mask=None):
    return model(enc, dec, encoder_mask_BxS=enc_mask, decoder_mask_BxT=dec_mask)


def build(cfg: T5Config, seed: int) -> T5:
    return nnx.jit(lambda: T5(cfg, rngs=nnx.Rngs(seed)))()  # one compile, not per-op


def padded_batch(seed: int = 0, s: int = 30, t: int = 25):
    """Right-padded encoder / decoder batch (decoder inputs start with PAD)."""
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, V, (3, s))
    enc[1, 20:] = PAD
    enc[2, 7:] = PAD
    dec = rng.integers(2, V, (3, t))
    dec[:, 0] = PAD
    dec_mask = np.ones_like(dec)
    dec_mask[1, 18:] = 0
    dec_mask[2, 5:] = 0
    return enc, (enc != PAD).astype(np.int64), dec, dec_mask


@pytest.fixture(scope="module", params=["v1_1", "orig"])
def pair(request):
    hf = hf_model(request.param)
    cfg = convert_t5.config_from_hf(hf.config.to_dict())
    return hf, convert_t5.from_hf_state_dict(cfg, hf_state(hf))


def test_config_from_hf(pair):
    hf, ours = pair
    assert ours.cfg.ffn == hf.config.feed_forward_proj
    assert ours.cfg.tie_embeddings == (hf.config.feed_forward_proj == "relu")
    assert (ours.cfg.n_encoder_layers, ours.cfg.n_heads, ours.cfg.d_kv) == (2, 4, 8)


def test_logits_match_hf(pair):
    hf, ours = pair
    enc, enc_mask, dec, dec_mask = padded_batch()
    ref = hf_logits(hf, enc, enc_mask, dec, dec_mask)
    got = forward(ours, enc, dec, enc_mask, dec_mask)
    assert got.dtype == jnp.float32 and got.shape == (3, 25, V)
    valid = dec_mask.astype(bool)
    assert np.abs(np.asarray(got) - ref)[valid].max() <= 1e-4
    # default masks: encoder = tokens != pad, decoder = all ones
    got_default = forward(ours, enc, dec)
    ref_default = hf_logits(hf, enc, enc_mask, dec, np.ones_like(dec))
    assert np.abs(np.asarray(got_default) - ref_default).max() <= 1e-4


def test_hidden_states_times_head_is_logits(pair):
    _, ours = pair
    enc, enc_mask, dec, dec_mask = padded_batch(seed=1, s=9, t=6)
    h = ours.decoder_hidden_states(ours.encode(enc, enc_mask), enc_mask, dec, dec_mask)
    w = ours.head()
    assert h.shape == (3, 6, 32) and w.shape == (32, V)
    logits = forward(ours, enc, dec, enc_mask, dec_mask)
    np.testing.assert_allclose(np.asarray(h @ w), np.asarray(logits), atol=1e-5)


def test_kv_cache_matches_full_forward(pair):
    _, ours = pair
    enc, enc_mask, dec, _ = padded_batch(seed=2, s=12, t=10)
    full = np.asarray(forward(ours, enc, dec, enc_mask))
    enc_h = ours.encode(enc, enc_mask)
    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, tokens, cache):
        return nnx.merge(graphdef, state).decode_with_cache(tokens, enc_h, enc_mask, cache)

    cache = ours.init_cache(3, 16)
    assert cache["k"].shape == (2, 3, 16, 4, 8) and cache["index"].dtype == jnp.int32
    chunks, pos = [], 0
    for size in (3, 1, 1, 2, 1, 1, 1):  # a prefill chunk, then mixed steps
        logits, cache = step(state, dec[:, pos:pos + size], cache)
        chunks.append(np.asarray(logits))
        pos += size
    assert pos == 10 and int(cache["index"]) == 10
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-5)


def greedy(model: T5, enc, enc_mask, n: int) -> np.ndarray:
    """Greedy decode with the KV cache inside lax.scan (params as jit arguments)."""
    graphdef, state = nnx.split(model)
    cfg = model.cfg

    @jax.jit
    def run(state, enc, enc_mask):
        m = nnx.merge(graphdef, state)
        enc_h = m.encode(enc, enc_mask)
        b = enc.shape[0]

        def body(carry, _):
            cache, tok_Bx1, done_B = carry
            logits, cache = nnx.merge(graphdef, state).decode_with_cache(
                tok_Bx1, enc_h, enc_mask, cache)
            nxt_B = jnp.where(done_B, cfg.pad_id, jnp.argmax(logits[:, -1], axis=-1))
            return (cache, nxt_B[:, None], done_B | (nxt_B == cfg.eos_id)), nxt_B

        start = jnp.full((b, 1), cfg.decoder_start_id, jnp.int32)
        carry = (m.init_cache(b, n), start, jnp.zeros((b,), bool))
        return jax.lax.scan(body, carry, None, length=n)[1].T

    return np.asarray(run(state, enc, enc_mask))


def test_greedy_matches_hf_generate():
    hf = hf_model("v1_1", seed=3)
    ours = convert_t5.from_hf_state_dict(convert_t5.config_from_hf(hf.config.to_dict()),
                                         hf_state(hf))
    enc, enc_mask, _, _ = padded_batch(seed=3, s=11)
    n = 12
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc_mask),
                          do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                          decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD).numpy()
    got = greedy(ours, enc, enc_mask, n)
    assert (ref[:, 0] == PAD).all()
    ref = ref[:, 1:]
    np.testing.assert_array_equal(got[:, :ref.shape[1]], ref)
    assert (got[:, ref.shape[1]:] == PAD).all()


@pytest.mark.parametrize("kind", ["v1_1", "orig"])
def test_export_round_trip(kind, tmp_path):
    ffn, tie = ("gated-gelu", False) if kind == "v1_1" else ("relu", True)
    cfg = T5Config(vocab_size=V, d_model=32, d_kv=8, n_heads=4, d_ff=64, n_encoder_layers=2,
                   n_decoder_layers=3, rel_buckets=16, rel_max_distance=32, ffn=ffn,
                   tie_embeddings=tie)
    ours = build(cfg, 5)
    state = convert_t5.to_hf_state_dict(ours)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(convert_t5.config_to_hf(cfg)))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    enc, enc_mask, dec, dec_mask = padded_batch(seed=4, s=13, t=9)
    ref = hf_logits(hf, enc, enc_mask, dec, dec_mask)
    got = np.asarray(forward(ours, enc, dec, enc_mask, dec_mask))
    assert np.abs(got - ref)[dec_mask.astype(bool)].max() <= 1e-4
    # and back: identical params
    back = convert_t5.from_hf_state_dict(convert_t5.config_from_hf(convert_t5.config_to_hf(cfg)),
                                         state)
    for (p1, a), (p2, b) in zip(nnx.to_flat_state(nnx.state(ours)),
                                nnx.to_flat_state(nnx.state(back))):
        assert p1 == p2
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_bad_checkpoints_raise():
    hf = hf_model("orig")
    cfg = convert_t5.config_from_hf(hf.config.to_dict())
    good = hf_state(hf)
    convert_t5.from_hf_state_dict(cfg, good)  # tolerates duplicated embed_tokens / lm_head

    name = "encoder.block.1.layer.0.SelfAttention.k.weight"
    with pytest.raises(ValueError, match=f"missing tensor {name}"):
        convert_t5.from_hf_state_dict(cfg, {k: v for k, v in good.items() if k != name})
    with pytest.raises(ValueError, match="unknown tensor encoder.block.7.layer.0.SelfAttention"):
        convert_t5.from_hf_state_dict(
            cfg, {**good, "encoder.block.7.layer.0.SelfAttention.q.weight": good[name]})
    name = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
    with pytest.raises(ValueError, match=f"tensor {name}: expected shape"):
        convert_t5.from_hf_state_dict(cfg, {**good, name: good[name].T})
    with pytest.raises(ValueError, match="lm_head.weight"):  # tied config, distinct head
        convert_t5.from_hf_state_dict(cfg, {**good, "lm_head.weight": good["shared.weight"] + 1})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        convert_t5.config_from_hf({**hf.config.to_dict(), "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="architectures"):
        convert_t5.config_from_hf({"architectures": ["T5EncoderModel"]})
    with pytest.raises(ValueError, match="ffn"):
        T5Config(ffn="gelu")


def test_bad_model_inputs_raise(pair):
    _, ours = pair
    enc = np.full((2, 5), 3)
    with pytest.raises(ValueError, match="decoder_tokens"):
        ours(enc, np.zeros((2, 3, 1), np.int32))
    with pytest.raises(ValueError, match="encoder_mask"):
        ours(enc, np.zeros((2, 3), np.int32), encoder_mask_BxS=np.ones((2, 4)))
    with pytest.raises(ValueError, match="cache"):
        ours.decode_with_cache(np.zeros((3, 1), np.int32), ours.encode(enc), None,
                               ours.init_cache(2, 4))


def test_partitioning_metadata():
    names = {"vocab", "embed", "heads", "head_dim", "mlp", "norm", "relpos_buckets"}
    ours = build(T5Config(vocab_size=V, d_model=16, d_kv=4, n_heads=2, d_ff=24, n_encoder_layers=1,
                          n_decoder_layers=1, ffn="gated-gelu", tie_embeddings=False), 0)
    params = nnx.to_flat_state(nnx.state(ours, nnx.Param))
    assert len(params) == 1 + 2 + 2 + 1 + (4 + 3 + 2) + (8 + 3 + 3)
    for path, p in params:
        axes = p.get_metadata()["out_sharding"]
        assert len(axes) == p[...].ndim and set(axes) <= names, path
    spec = nnx.get_partition_spec(nnx.state(ours))
    assert tuple(spec["decoder"][0]["ffn"]["wo"].get_value()) == ("mlp", "embed")


def test_remat_and_bf16():
    base = dict(vocab_size=V, d_model=16, d_kv=4, n_heads=2, d_ff=24, n_encoder_layers=1,
                n_decoder_layers=2, ffn="gated-gelu", tie_embeddings=False)
    enc, enc_mask, dec, dec_mask = padded_batch(seed=6, s=7, t=5)
    plain = build(T5Config(**base), 0)
    remat = build(T5Config(**base, remat=True), 0)

    def loss(m):
        return jnp.mean(m(enc, dec, encoder_mask_BxS=enc_mask, decoder_mask_BxT=dec_mask) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    g1, g2 = grad(plain), grad(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    bf16 = convert_t5.from_hf_state_dict(T5Config(**base), convert_t5.to_hf_state_dict(plain),
                                         param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert bf16.embed[...].dtype == jnp.bfloat16
    low = forward(bf16, enc, dec, enc_mask, dec_mask)
    high = forward(plain, enc, dec, enc_mask, dec_mask)
    assert low.dtype == jnp.float32
    assert np.abs(np.asarray(low) - np.asarray(high)).max() <= 0.1 * np.abs(np.asarray(high)).max()


def test_untied_checkpoint_without_lm_head_uses_shared():
    """transformers >= 5 drops lm_head.weight on save when it equals shared.weight."""
    hf = hf_model("v1_1")
    state = {k: v for k, v in hf_state(hf).items() if k != "lm_head.weight"}
    ours = convert_t5.from_hf_state_dict(convert_t5.config_from_hf(hf.config.to_dict()), state)
    np.testing.assert_array_equal(np.asarray(ours.head()), state["shared.weight"].T)


def test_load_and_save_hf_dispatch_t5(tmp_path):
    """gkd_jax.models.load / save_hf on a T5 Hugging Face directory."""
    import torch
    import transformers

    from gkd_jax import models

    torch.manual_seed(3)
    hf_cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=4, num_heads=2, d_ff=32,
                                   num_layers=1, num_decoder_layers=2,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, tok = models.load(str(tmp_path / "hf"))
    assert tok is None and model.cfg.n_decoder_layers == 2
    enc = np.array([[4, 5, 6, 1], [7, 8, 1, 0]])
    dec = np.array([[0, 3, 9], [0, 2, 2]])
    want = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
              decoder_input_ids=torch.tensor(dec)).logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(model(enc, dec)), want, atol=1e-4)
    models.save_hf(model, None, str(tmp_path / "out"))
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    got = back(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
               decoder_input_ids=torch.tensor(dec)).logits.detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
