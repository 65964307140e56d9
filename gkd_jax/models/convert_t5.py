"""Hugging Face <-> gkd_jax T5 conversion (T5ForConditionalGeneration checkpoints).

HF Linear weights are [out, in]; ours are [in, ...]: q/k/v [H*K, D] -> DxHxK,
o [D, H*K] -> HxKxD, wi/wo/lm_head transposed; embeddings, norms and relative
position biases are copied.

Tolerated HF extras: ``encoder.embed_tokens.weight`` / ``decoder.embed_tokens.weight``
(copies of ``shared.weight``), ``lm_head.weight`` of a tied model (must equal
``shared.weight``), and the unused
``decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight`` of old
checkpoints. An untied config whose checkpoint has no ``lm_head.weight`` gets
``shared.weight`` (transformers >= 5 drops ``lm_head.weight`` on save when it
equals ``shared.weight``).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax.models.t5 import FFN_KINDS, T5, T5Config

_DUPLICATES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def config_from_hf(hf_config: dict) -> T5Config:
  """T5Config from an HF config.json dict (architecture T5ForConditionalGeneration)."""
  archs = hf_config.get("architectures") or ["T5ForConditionalGeneration"]
  if "T5ForConditionalGeneration" not in archs:
    raise ValueError(f"architectures: expected T5ForConditionalGeneration, got {archs}")
  ffn = hf_config.get("feed_forward_proj", "relu")
  if ffn not in FFN_KINDS:
    raise ValueError(f"feed_forward_proj: {ffn!r} not supported (expected one of {FFN_KINDS})")
  # transformers >= 5 writes tie_word_embeddings=true always and records the real
  # switch (scale decoder output / tied head) as scale_decoder_outputs.
  tie = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
  eos = hf_config.get("eos_token_id", 1)
  eos = eos[0] if isinstance(eos, (list, tuple)) else eos
  pad = hf_config.get("pad_token_id", 0)
  n_layers = hf_config.get("num_layers", 6)
  start = hf_config.get("decoder_start_token_id")
  return T5Config(
    vocab_size=hf_config.get("vocab_size", 32128),
    d_model=hf_config.get("d_model", 512),
    d_kv=hf_config.get("d_kv", 64),
    n_heads=hf_config.get("num_heads", 8),
    d_ff=hf_config.get("d_ff", 2048),
    n_encoder_layers=n_layers,
    n_decoder_layers=hf_config.get("num_decoder_layers") or n_layers,
    rel_buckets=hf_config.get("relative_attention_num_buckets", 32),
    rel_max_distance=hf_config.get("relative_attention_max_distance", 128),
    ffn=ffn,
    tie_embeddings=bool(tie),
    layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-6),
    pad_id=0 if pad is None else pad,
    decoder_start_id=(0 if pad is None else pad) if start is None else start,
    eos_id=1 if eos is None else eos,
  )


def config_to_hf(cfg: T5Config, architecture: str | None = None) -> dict:
  """HF config.json dict (loadable by transformers.T5Config, v4 and v5)."""
  if architecture not in (None, "T5ForConditionalGeneration"):
    raise ValueError(f"architecture: expected T5ForConditionalGeneration, got {architecture!r}")
  return {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "is_encoder_decoder": True,
    "vocab_size": cfg.vocab_size,
    "d_model": cfg.d_model,
    "d_kv": cfg.d_kv,
    "num_heads": cfg.n_heads,
    "d_ff": cfg.d_ff,
    "num_layers": cfg.n_encoder_layers,
    "num_decoder_layers": cfg.n_decoder_layers,
    "relative_attention_num_buckets": cfg.rel_buckets,
    "relative_attention_max_distance": cfg.rel_max_distance,
    "feed_forward_proj": cfg.ffn,
    "tie_word_embeddings": cfg.tie_embeddings,
    "layer_norm_epsilon": cfg.layer_norm_eps,
    "dropout_rate": 0.0,  # this implementation has no dropout
    "pad_token_id": cfg.pad_id,
    "eos_token_id": cfg.eos_id,
    "decoder_start_token_id": cfg.decoder_start_id,
    "dtype": np.dtype(cfg.param_dtype).name,
  }


def _layout(cfg: T5Config) -> dict[str, tuple[tuple, str]]:
  """HF tensor name -> (path of our Param in the T5 module, kind of transform)."""
  ffn = ("wi_0", "wi_1", "wo") if cfg.ffn == "gated-gelu" else ("wi", "wo")
  out = {
    "shared.weight": (("embed",), "copy"),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
      ("enc_relpos",),
      "copy",
    ),
    "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
      ("dec_relpos",),
      "copy",
    ),
    "encoder.final_layer_norm.weight": (("enc_norm", "scale"), "copy"),
    "decoder.final_layer_norm.weight": (("dec_norm", "scale"), "copy"),
  }
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (("lm_head",), "linear")

  def attn(prefix, path):
    for w in "qkv":
      out[f"{prefix}.{w}.weight"] = ((*path, w), "in_proj")
    out[f"{prefix}.o.weight"] = ((*path, "o"), "out_proj")

  def ffn_(prefix, path):
    for w in ffn:
      out[f"{prefix}.DenseReluDense.{w}.weight"] = ((*path, w), "linear")

  for i in range(cfg.n_encoder_layers):
    p = f"encoder.block.{i}.layer"
    attn(f"{p}.0.SelfAttention", ("encoder", i, "attn"))
    out[f"{p}.0.layer_norm.weight"] = (("encoder", i, "attn_norm", "scale"), "copy")
    ffn_(f"{p}.1", ("encoder", i, "ffn"))
    out[f"{p}.1.layer_norm.weight"] = (("encoder", i, "ffn_norm", "scale"), "copy")
  for i in range(cfg.n_decoder_layers):
    p = f"decoder.block.{i}.layer"
    attn(f"{p}.0.SelfAttention", ("decoder", i, "self_attn"))
    out[f"{p}.0.layer_norm.weight"] = (("decoder", i, "self_norm", "scale"), "copy")
    attn(f"{p}.1.EncDecAttention", ("decoder", i, "cross_attn"))
    out[f"{p}.1.layer_norm.weight"] = (("decoder", i, "cross_norm", "scale"), "copy")
    ffn_(f"{p}.2", ("decoder", i, "ffn"))
    out[f"{p}.2.layer_norm.weight"] = (("decoder", i, "ffn_norm", "scale"), "copy")
  return out


def _get(model: T5, path: tuple) -> nnx.Param:
  obj = model
  for p in path:
    obj = obj[p] if isinstance(p, int) else getattr(obj, p)
  return obj


def _to_ours(kind: str, w: np.ndarray, shape: tuple) -> np.ndarray:
  if kind == "copy":
    return w
  return w.T.reshape(shape)  # linear / in_proj [H*K, D] / out_proj [D, H*K]


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return w
  if kind == "in_proj":  # DxHxK -> [H*K, D]
    return w.reshape(w.shape[0], -1).T
  if kind == "out_proj":  # HxKxD -> [D, H*K]
    return w.reshape(-1, w.shape[-1]).T
  return w.T


def _hf_shape(kind: str, shape: tuple) -> tuple:
  return _to_hf(kind, np.empty(shape, np.int8)).shape


def _check_duplicate(name: str, w: np.ndarray, shared: np.ndarray) -> None:
  if w.shape != shared.shape or not np.array_equal(w, shared):
    raise ValueError(
      f"tensor {name}: expected a copy of shared.weight (shape "
      f"{shared.shape}), got a different tensor of shape {w.shape}"
    )


def from_hf_state_dict(
  cfg: T5Config, state: dict[str, np.ndarray], param_dtype=None, dtype=None
) -> T5:
  """Build a T5 from HF tensors; missing / unknown / wrong-shaped tensors -> ValueError."""
  repl = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
  cfg = dataclasses.replace(cfg, **repl)
  layout = _layout(cfg)
  state = dict(state)
  if "shared.weight" not in state:
    raise ValueError("missing tensor shared.weight")
  shared = np.asarray(state["shared.weight"])
  for name in _DUPLICATES:
    if name in state:
      _check_duplicate(name, np.asarray(state.pop(name)), shared)
  for name in _IGNORED:
    state.pop(name, None)
  if cfg.tie_embeddings and "lm_head.weight" in state:
    _check_duplicate("lm_head.weight", np.asarray(state.pop("lm_head.weight")), shared)
  if not cfg.tie_embeddings and "lm_head.weight" not in state:
    state["lm_head.weight"] = shared
  unknown = sorted(set(state) - set(layout))
  if unknown:
    raise ValueError(f"unknown tensor {unknown[0]} ({len(unknown)} unknown: {unknown[:5]})")
  missing = sorted(set(layout) - set(state))
  if missing:
    raise ValueError(f"missing tensor {missing[0]} ({len(missing)} missing: {missing[:5]})")

  model = nnx.eval_shape(lambda: T5(cfg, rngs=nnx.Rngs(0)))
  for name, (path, kind) in layout.items():
    param = _get(model, path)
    w = np.asarray(state[name])
    expected = _hf_shape(kind, param.shape)
    if w.shape != expected:
      raise ValueError(f"tensor {name}: expected shape {expected}, got {w.shape}")
    param.set_value(jnp.array(_to_ours(kind, w, param.shape), dtype=cfg.param_dtype))  # a copy
  return model


def to_hf_state_dict(model: T5) -> dict[str, np.ndarray]:
  """HF T5ForConditionalGeneration tensors (param dtype; no duplicated embeddings)."""
  return {
    name: np.ascontiguousarray(_to_hf(kind, np.asarray(_get(model, path)[...])))
    for name, (path, kind) in _layout(model.cfg).items()
  }
