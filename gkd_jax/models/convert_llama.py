"""Hugging Face <-> gkd_jax conversion for Llama / Mistral / Qwen2 causal LMs.

HF Linear weights are [out, in]; ours are [in, ...out] with heads split out:
  q_proj.weight [H*Dh, D] -> wq [D, H, Dh]      o_proj.weight [D, H*Dh] -> wo [H, Dh, D]
  gate/up_proj.weight [F, D] -> [D, F]          down_proj.weight [D, F] -> [F, D]
  embed_tokens.weight [V, D] -> embed [V, D]    lm_head.weight [V, D] -> lm_head [D, V]

The "flat" view used here names our params "embed", "final_norm", "lm_head" and
"layers.{i}.{name}" (per layer, whether or not the model scans its layers).
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax.models.llama import Llama, LlamaConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPE = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen2ForCausalLM": "qwen2",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers in old checkpoints


def _arch(hf_config: dict) -> str:
  archs = hf_config.get("architectures") or []
  if archs:
    arch = archs[0]
  else:
    by_type = {v: k for k, v in _MODEL_TYPE.items()}
    arch = by_type.get(hf_config.get("model_type"), f"model_type={hf_config.get('model_type')!r}")
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch!r}; supported: {list(ARCHITECTURES)}")
  return arch


def _require(hf_config: dict, key: str):
  if hf_config.get(key) is None:
    raise ValueError(f"HF config is missing required field {key!r}")
  return hf_config[key]


def config_from_hf(hf_config: dict, **overrides) -> LlamaConfig:
  """LlamaConfig from a HF config.json dict (Llama / Mistral / Qwen2)."""
  arch = _arch(hf_config)
  d_model = _require(hf_config, "hidden_size")
  n_heads = _require(hf_config, "num_attention_heads")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(
      f"HF config hidden_act={hf_config['hidden_act']!r} is unsupported (only 'silu')"
    )
  if hf_config.get("mlp_bias"):
    raise ValueError("HF config mlp_bias=True is unsupported")
  if arch == "LlamaForCausalLM" and hf_config.get("attention_bias"):
    raise ValueError("HF config attention_bias=True (Llama: bias on q/k/v/o) is unsupported")

  rp = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
  theta = rp.get("rope_theta", hf_config.get("rope_theta", 10000.0))
  kind = rp.get("rope_type", rp.get("type", "default"))
  scaling = None
  if kind == "linear":
    scaling = {"rope_type": "linear", "factor": rp.get("factor")}
  elif kind == "llama3":
    scaling = {k: rp.get(k) for k in ("factor", "low_freq_factor", "high_freq_factor")}
    scaling["rope_type"] = "llama3"
    scaling["original_max_position_embeddings"] = rp.get(
      "original_max_position_embeddings", hf_config.get("max_position_embeddings")
    )
  elif kind != "default":
    raise ValueError(
      f"HF config rope_type {kind!r} is unsupported; supported: default, linear, llama3"
    )
  if scaling is not None:
    missing = [k for k, v in scaling.items() if v is None]
    if missing:
      raise ValueError(f"HF config rope scaling ({kind}) is missing {missing}")

  n_layers = _require(hf_config, "num_hidden_layers")
  sliding_window = None
  if arch == "MistralForCausalLM":
    sliding_window = hf_config.get("sliding_window")
  elif arch == "Qwen2ForCausalLM" and hf_config.get("use_sliding_window"):
    if hf_config.get("max_window_layers", 28) < n_layers:
      raise ValueError(
        "HF config use_sliding_window=True with per-layer windows "
        "(max_window_layers < num_hidden_layers) is unsupported"
      )

  kwargs = dict(
    vocab_size=_require(hf_config, "vocab_size"),
    d_model=d_model,
    n_layers=n_layers,
    n_heads=n_heads,
    n_kv_heads=hf_config.get("num_key_value_heads") or n_heads,
    head_dim=hf_config.get("head_dim") or d_model // n_heads,
    mlp_dim=_require(hf_config, "intermediate_size"),
    rope_theta=float(theta),
    rope_scaling=scaling,
    rms_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
    qkv_bias=arch == "Qwen2ForCausalLM",
    sliding_window=sliding_window,
    max_seq_len=int(hf_config.get("max_position_embeddings", 2048)),
  )
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)


def config_to_hf(cfg: LlamaConfig, architecture: str | None = None) -> dict:
  """HF config.json dict. Default architecture: Qwen2 if qkv_bias, Mistral if sliding_window, else Llama."""
  arch = architecture or (
    "Qwen2ForCausalLM"
    if cfg.qkv_bias
    else "MistralForCausalLM"
    if cfg.sliding_window
    else "LlamaForCausalLM"
  )
  if arch not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {arch!r}; supported: {list(ARCHITECTURES)}")
  if cfg.final_logit_softcap is not None:
    raise ValueError(f"final_logit_softcap={cfg.final_logit_softcap} has no equivalent in {arch}")
  if cfg.qkv_bias != (arch == "Qwen2ForCausalLM"):
    raise ValueError(
      f"qkv_bias={cfg.qkv_bias} cannot be expressed as {arch} "
      "(only Qwen2ForCausalLM has q/k/v biases)"
    )
  if cfg.sliding_window is not None and arch != "MistralForCausalLM":
    raise ValueError(f"sliding_window={cfg.sliding_window} cannot be expressed as {arch}")
  scaling = cfg.rope_scaling_dict
  rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
  out = {
    "architectures": [arch],
    "model_type": _MODEL_TYPE[arch],
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.n_layers,
    "num_attention_heads": cfg.n_heads,
    "num_key_value_heads": cfg.n_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "max_position_embeddings": cfg.max_seq_len,
    "rms_norm_eps": cfg.rms_eps,
    "tie_word_embeddings": cfg.tie_embeddings,
    "rope_theta": cfg.rope_theta,
    "rope_scaling": scaling,
    "rope_parameters": rope_parameters,
    "torch_dtype": cfg.param_dtype,
    "dtype": cfg.param_dtype,
  }
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=False, mlp_bias=False)
  elif arch == "MistralForCausalLM":
    out.update(sliding_window=cfg.sliding_window)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


# ----------------------------------------------------------------------------
# Name / layout table.
# ----------------------------------------------------------------------------


def _hf_table(cfg: LlamaConfig) -> dict:
  """hf_name -> (flat_name, hf_shape, hf_to_ours, ours_to_hf)."""
  d, h, k, dh, f, v = (
    cfg.d_model,
    cfg.n_heads,
    cfg.n_kv_heads,
    cfg.head_dim,
    cfg.mlp_dim,
    cfg.vocab_size,
  )
  ident = (lambda a: a, lambda a: a)

  def proj(n):  # [n*Dh, D] <-> [D, n, Dh]
    return (lambda a: a.T.reshape(d, n, dh), lambda a: a.reshape(d, n * dh).T)

  def bias(n):  # [n*Dh] <-> [n, Dh]
    return (lambda a: a.reshape(n, dh), lambda a: a.reshape(n * dh))

  transpose = (lambda a: a.T, lambda a: a.T)
  out_proj = (lambda a: a.T.reshape(h, dh, d), lambda a: a.reshape(h * dh, d).T)

  table = {
    "model.embed_tokens.weight": ("embed", (v, d), *ident),
    "model.norm.weight": ("final_norm", (d,), *ident),
  }
  if not cfg.tie_embeddings:
    table["lm_head.weight"] = ("lm_head", (v, d), *transpose)
  for i in range(cfg.n_layers):
    p, o = f"model.layers.{i}.", f"layers.{i}."
    table.update(
      {
        p + "input_layernorm.weight": (o + "attn_norm", (d,), *ident),
        p + "self_attn.q_proj.weight": (o + "wq", (h * dh, d), *proj(h)),
        p + "self_attn.k_proj.weight": (o + "wk", (k * dh, d), *proj(k)),
        p + "self_attn.v_proj.weight": (o + "wv", (k * dh, d), *proj(k)),
        p + "self_attn.o_proj.weight": (o + "wo", (d, h * dh), *out_proj),
        p + "post_attention_layernorm.weight": (o + "mlp_norm", (d,), *ident),
        p + "mlp.gate_proj.weight": (o + "w_gate", (f, d), *transpose),
        p + "mlp.up_proj.weight": (o + "w_up", (f, d), *transpose),
        p + "mlp.down_proj.weight": (o + "w_down", (d, f), *transpose),
      }
    )
    if cfg.qkv_bias:
      table.update(
        {
          p + "self_attn.q_proj.bias": (o + "bq", (h * dh,), *bias(h)),
          p + "self_attn.k_proj.bias": (o + "bk", (k * dh,), *bias(k)),
          p + "self_attn.v_proj.bias": (o + "bv", (k * dh,), *bias(k)),
        }
      )
  return table


# ----------------------------------------------------------------------------
# Flat view of a model's params.
# ----------------------------------------------------------------------------


def flat_params(model: Llama) -> dict[str, np.ndarray]:
  """{"embed", "final_norm", ["lm_head"], "layers.{i}.{name}"} -> host arrays."""
  cfg = model.cfg
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = {k: np.asarray(pure[k]) for k in ("embed", "final_norm", "lm_head") if k in pure}
  for i in range(cfg.n_layers):
    layer = {n: a[i] for n, a in pure["layers"].items()} if cfg.scan_layers else pure["layers"][i]
    flat.update({f"layers.{i}.{n}": np.asarray(a) for n, a in layer.items()})
  return flat


def model_from_flat(cfg: LlamaConfig, flat: dict) -> Llama:
  """Builds a Llama(cfg) holding `flat` (no random init); arrays cast to cfg.param_dtype."""
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  expected = _flat_shapes(nnx.to_pure_dict(state), cfg)
  for name, shape in expected.items():
    if name not in flat:
      raise ValueError(f"missing parameter {name!r} (expected shape {shape})")
    if tuple(flat[name].shape) != shape:
      raise ValueError(f"parameter {name!r} has shape {tuple(flat[name].shape)}, expected {shape}")
  unknown = sorted(set(flat) - set(expected))
  if unknown:
    raise ValueError(f"unknown parameters {unknown}")

  dt = jnp.dtype(cfg.param_dtype)
  cast = lambda a: jnp.array(np.asarray(a), dtype=dt)  # a copy: never an alias of the source
  pure = {k: cast(flat[k]) for k in ("embed", "final_norm", "lm_head") if k in expected}
  names = {n.split(".", 2)[2] for n in expected if n.startswith("layers.")}
  per_layer = [{n: flat[f"layers.{i}.{n}"] for n in names} for i in range(cfg.n_layers)]
  if cfg.scan_layers:
    pure["layers"] = {n: cast(np.stack([layer[n] for layer in per_layer])) for n in names}
  else:
    pure["layers"] = {
      i: {n: cast(a) for n, a in layer.items()} for i, layer in enumerate(per_layer)
    }
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _flat_shapes(pure: dict, cfg: LlamaConfig) -> dict[str, tuple]:
  shapes = {k: tuple(pure[k].shape) for k in ("embed", "final_norm", "lm_head") if k in pure}
  for i in range(cfg.n_layers):
    layer = pure["layers"] if cfg.scan_layers else pure["layers"][i]
    for n, a in layer.items():
      shapes[f"layers.{i}.{n}"] = tuple(a.shape[1:] if cfg.scan_layers else a.shape)
  return shapes


# ----------------------------------------------------------------------------
# State dicts.
# ----------------------------------------------------------------------------


def from_hf_state_dict(cfg: LlamaConfig, state: dict, *, param_dtype=None, dtype=None) -> Llama:
  """Model from HF-named arrays. Missing / unknown / wrong-shaped tensors -> ValueError."""
  if param_dtype is not None or dtype is not None:
    cfg = dataclasses.replace(
      cfg, param_dtype=param_dtype or cfg.param_dtype, dtype=dtype or cfg.dtype
    )
  table = _hf_table(cfg)
  missing = [n for n in table if n not in state]
  if missing:
    raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} missing in total)")
  for name in state:
    if name in table or name.endswith(_IGNORED_SUFFIXES):
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      if not np.array_equal(
        np.asarray(state[name]), np.asarray(state["model.embed_tokens.weight"])
      ):
        raise ValueError(
          "tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' "
          "but the config ties embeddings"
        )
      continue
    raise ValueError(f"unknown tensor {name!r} for {cfg.n_layers}-layer config")
  flat = {}
  for name, (ours, shape, to_ours, _) in table.items():
    a = np.asarray(state[name])
    if tuple(a.shape) != shape:
      raise ValueError(f"tensor {name!r} has shape {tuple(a.shape)}, expected {shape}")
    flat[ours] = to_ours(a)
  return model_from_flat(cfg, flat)


def to_hf_state_dict(model: Llama) -> dict[str, np.ndarray]:
  """HF-named contiguous host arrays in the model's param dtype."""
  flat = flat_params(model)
  return {
    name: np.ascontiguousarray(to_hf(flat[ours]))
    for name, (ours, _, _, to_hf) in _hf_table(model.cfg).items()
  }


# ----------------------------------------------------------------------------
# Students.
# ----------------------------------------------------------------------------


def _check_keep(keep_layers, n_layers: int) -> list[int]:
  keep = list(keep_layers)
  if not keep:
    raise ValueError("keep_layers is empty")
  for i in keep:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < n_layers:
      raise ValueError(f"keep_layers index {i!r} out of range for {n_layers} layers")
  dups = sorted({i for i in keep if keep.count(i) > 1})
  if dups:
    raise ValueError(f"keep_layers has duplicate indices {dups}")
  return [int(i) for i in keep]


def prune_layers(model_or_state, keep_layers):
  """Depth pruning: keep the given layers (in the given order), renumbered 0..n-1.

  Takes a Llama (returns a new Llama with n_layers=len(keep_layers)) or a HF
  state dict (returns a new HF state dict).
  """
  if isinstance(model_or_state, Llama):
    cfg = model_or_state.cfg
    keep = _check_keep(keep_layers, cfg.n_layers)
    flat = flat_params(model_or_state)
    new = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    for j, i in enumerate(keep):
      prefix = f"layers.{i}."
      new.update(
        {f"layers.{j}.{k[len(prefix) :]}": v for k, v in flat.items() if k.startswith(prefix)}
      )
    return model_from_flat(dataclasses.replace(cfg, n_layers=len(keep)), new)

  if not isinstance(model_or_state, dict):
    raise ValueError(f"prune_layers expects a Llama or a HF state dict, got {type(model_or_state)}")
  pat = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
  layer_ids = {int(m.group(1)) for n in model_or_state if (m := pat.match(n))}
  keep = _check_keep(keep_layers, max(layer_ids) + 1 if layer_ids else 0)
  new_index = {i: j for j, i in enumerate(keep)}
  out = {}
  for name, a in model_or_state.items():
    m = pat.match(name)
    if m is None:
      out[name] = a
    elif int(m.group(1)) in new_index:
      out[f"model.layers.{new_index[int(m.group(1))]}.{m.group(2)}"] = a
  return out


def smaller_config(teacher_cfg: LlamaConfig, **overrides) -> LlamaConfig:
  """Config for a fresh student sharing the teacher's vocab (default: half the layers)."""
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"smaller_config: unknown LlamaConfig fields {unknown}")
  if overrides.get("vocab_size", teacher_cfg.vocab_size) != teacher_cfg.vocab_size:
    raise ValueError(
      f"smaller_config: vocab_size={overrides['vocab_size']} must equal the "
      f"teacher's {teacher_cfg.vocab_size} (student shares the vocab)"
    )
  kwargs = {"n_layers": max(1, teacher_cfg.n_layers // 2), **overrides}
  return dataclasses.replace(teacher_cfg, **kwargs)


def fresh_model(cfg: LlamaConfig, seed: int) -> Llama:
  """A randomly initialised model of ``cfg`` (student.init "fresh")."""
  return Llama(cfg, rngs=nnx.Rngs(seed))


def with_config(model: Llama, cfg: LlamaConfig) -> Llama:
  """``model``'s weights under another config of the same shapes (dtypes, remat)."""
  return model_from_flat(cfg, flat_params(model))
