"""Read a llama.cpp GGUF checkpoint (Llama architecture) into a Hugging Face Llama state dict.

`read_gguf(path)` gives `(hf_config, state, tokenizer)`: a config.json-like dict, float32 numpy
arrays under HF Llama names in HF's [out, in] layout, and the GGUF's `gkd_jax.tokenizers.Tokenizer`.
Q and K are un-permuted from llama.cpp's interleaved-RoPE row order back to HF's (the inverse of
`permute` in llama.cpp's convert_hf_to_gguf.py). Uses the `gguf` package's reader and dequantizer.
"""

from __future__ import annotations

import os
import re

import numpy as np

from gkd_jax.tokenizers import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")

_GLOBAL_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
  "attn_q": "self_attn.q_proj",
  "attn_k": "self_attn.k_proj",
  "attn_v": "self_attn.v_proj",
  "attn_output": "self_attn.o_proj",
  "ffn_gate": "mlp.gate_proj",
  "ffn_up": "mlp.up_proj",
  "ffn_down": "mlp.down_proj",
  "attn_norm": "input_layernorm",
  "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def hf_name(gguf_name: str) -> str:
  """The HF Llama parameter name of a GGUF tensor name; ValueError if unknown."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER_RE.fullmatch(gguf_name)
  if m is None or m[2] not in _LAYER_NAMES:
    raise ValueError(f"unknown GGUF tensor name {gguf_name!r} for a llama model")
  return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.weight"


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation: per head, rows (pair, half) -> (half, pair)."""
  return (
    w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _field(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _config(reader, has_lm_head: bool, tokenizer: Tokenizer) -> dict:
  """A Llama config.json as a dict, from the `llama.*` metadata."""

  def get(key, default=None):
    value = _field(reader, f"llama.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata has no llama.{key}")
    return value

  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": int(get("vocab_size", tokenizer.vocab_size)),
    "hidden_size": hidden,
    "intermediate_size": int(get("feed_forward_length")),
    "num_hidden_layers": int(get("block_count")),
    "num_attention_heads": heads,
    "num_key_value_heads": int(get("attention.head_count_kv", heads)),
    "head_dim": int(get("rope.dimension_count", hidden // heads)),
    "hidden_act": "silu",
    "rope_theta": float(get("rope.freq_base", 10000.0)),
    "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
    "max_position_embeddings": int(get("context_length")),
    "tie_word_embeddings": not has_lm_head,
    "bos_token_id": tokenizer.bos_id,
    "eos_token_id": tokenizer.eos_id,
    "pad_token_id": tokenizer.pad_id,
  }


def _corrupt(path, error, where=None) -> ValueError:
  cause = " ".join(f"{type(error).__name__}: {error}".split())  # one line
  return ValueError(
    f"{path} is not a valid GGUF file or is truncated{f' ({where})' if where else ''}: {cause}"
  )


def read_gguf(path) -> tuple[dict, dict[str, np.ndarray], Tokenizer]:
  """`(hf_config, state, tokenizer)` of a Llama GGUF; state is float32 numpy, HF names and layout."""
  import gguf

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF":
      raise ValueError(f"not a GGUF file (no GGUF magic): {path}")
  try:
    reader = gguf.GGUFReader(path)
  except OSError:
    raise
  except (
    Exception
  ) as e:  # the reader parses with numpy views: a short file fails in reshape, unpack, ...
    raise _corrupt(path, e) from e
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
      f"{path}: general.architecture={arch!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )
  for t in reader.tensors:  # check names and types before any dequantizing
    hf_name(t.name)
    if t.tensor_type.name not in SUPPORTED_TYPES:
      raise ValueError(
        f"{path}: tensor {t.name!r} has type {t.tensor_type.name}; supported: {list(SUPPORTED_TYPES)}"
      )

  tokenizer = Tokenizer.from_gguf_metadata(reader)
  config = _config(reader, any(t.name == "output.weight" for t in reader.tensors), tokenizer)
  heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
  state = {}
  for t in reader.tensors:
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    except Exception as e:
      raise _corrupt(path, e, f"tensor {t.name!r}") from e
    kind = t.name.split(".")[-2]
    if kind in heads:
      w = unpermute_rope(w, heads[kind])
    state[hf_name(t.name)] = np.ascontiguousarray(w)
  return config, state, tokenizer
