"""The model contract: what the trainer, the train step and the sampler ask of a model, and
the registry of model families (HF architecture -> config, model, converter, kind).

A model is an ``nnx.Module`` with a frozen-dataclass ``cfg`` (its config, with a ``family``
class attribute naming its ``Family``) and a ``kind`` class attribute: ``DECODER`` models
implement ``DecoderLM``, ``ENCODER_DECODER`` models ``EncoderDecoderLM``. Code branches on
``kind(model)``, never on which methods happen to exist. Shapes: B batch, T tokens, S cache
or encoder slots, D model width, V vocabulary; logits are float32.

Adding a family (README, "Adding a model family"): a config dataclass and a model implementing
one protocol, a converter module implementing ``Converter``, and one ``Family`` in
``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar, Protocol

DECODER = "decoder"
ENCODER_DECODER = "encoder_decoder"
KINDS = (DECODER, ENCODER_DECODER)


class DecoderLM(Protocol):
  """A decoder-only LM. cfg has vocab_size, max_seq_len, dtype."""

  kind: ClassVar[str]  # DECODER
  cfg: Any

  def head(self):
    """The unembedding W_DxV: logits == softcap(hidden_states @ W, logit_softcap())."""

  def unembedding(self) -> tuple[Any, str]:
    """(W, layout), W as stored: [D, V] for layout "dv", [V, D] (a tied embedding) for "vd";
    logits == softcap(einsum(f"btd,{layout}->btv", hidden_states, W), logit_softcap())."""

  def logit_softcap(self) -> float | None:
    """The soft cap of the logits (``divergences.softcap``), None for none."""

  def hidden_states(self, tokens_BxT, *, mask_BxT=None, positions_BxT=None):
    """Final-norm hidden states h_BxTxD, causal; mask 1 = real token (padding never attended)."""

  def __call__(self, tokens_BxT, *, mask_BxT=None, positions_BxT=None):
    """Causal logits_BxTxV."""

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache (a pytree) for ``max_len`` slots."""

  def forward_with_cache(
    self, tokens_BxT, cache, *, mask_BxT=None, positions_BxT=None, last_only=False
  ):
    """Prefill (T = prompt length, left-padded) or decode (T = 1) -> (logits, new cache)."""


class EncoderDecoderLM(Protocol):
  """An encoder-decoder LM. cfg has vocab_size, max_decode_len, decoder_start_id, pad_id."""

  kind: ClassVar[str]  # ENCODER_DECODER
  cfg: Any

  def head(self):
    """W_DxV: logits == softcap(decoder_hidden_states @ W, logit_softcap())."""

  def logit_softcap(self) -> float | None:
    """The soft cap of the logits, None for none."""

  def encode(self, encoder_tokens_BxS, encoder_mask_BxS=None):
    """Encoder output enc_BxSxD."""

  def decoder_hidden_states(
    self, enc_BxSxD, encoder_mask_BxS, decoder_tokens_BxT, decoder_mask_BxT=None
  ):
    """Final decoder states h_BxTxD for decoder INPUTS (targets shifted right)."""

  def __call__(
    self, encoder_tokens_BxS, decoder_tokens_BxT, *, encoder_mask_BxS=None, decoder_mask_BxT=None
  ):
    """Teacher-forced logits_BxTxV."""

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
    """An empty decoder KV cache."""

  def decode_with_cache(self, decoder_tokens_BxT, enc_BxSxD, encoder_mask_BxS, cache: dict):
    """Incremental decoding -> (logits_BxTxV, new cache)."""


class Converter(Protocol):
  """A family's module that maps Hugging Face configs and weights to ours and back."""

  def config_from_hf(self, hf_config: dict): ...

  def config_to_hf(self, cfg, architecture: str | None = None) -> dict: ...

  def from_hf_state_dict(self, cfg, state: dict): ...

  def to_hf_state_dict(self, model) -> dict: ...


class StudentBuilder(Protocol):
  """Converter extras of a family whose students can be cut from the teacher (init "prune")
  or built smaller from its config (init "fresh"), and rebuilt with other numerics."""

  def prune_layers(self, model, keep_layers): ...

  def smaller_config(self, teacher_cfg, **overrides): ...

  def fresh_model(self, cfg, seed: int): ...

  def with_config(self, model, cfg): ...


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family: its HF architecture names, its kind, and where its code lives."""

  name: str  # the value of its config classes' ``family`` attribute
  kind: str
  architectures: tuple[str, ...]  # the first one is the default for export
  model_types: tuple[str, ...]  # HF config.json "model_type", parallel to architectures
  converter_module: str  # implements Converter (and StudentBuilder when student_inits say so)
  student_inits: tuple[str, ...] = ("path",)  # student.init values it supports

  def converter(self):
    return importlib.import_module(self.converter_module)

  @property
  def builds_students(self) -> bool:
    """Its converter is also a StudentBuilder (inits "prune" / "fresh", ``with_config``)."""
    return bool(set(self.student_inits) - {"path"})


FAMILIES = (
  Family(
    "llama",
    DECODER,
    ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    ("llama", "mistral", "qwen2"),
    "gkd_jax.models.convert_llama",
    ("path", "prune", "fresh"),
  ),
  Family(
    "t5",
    ENCODER_DECODER,
    ("T5ForConditionalGeneration",),
    ("t5",),
    "gkd_jax.models.convert_t5",
  ),
)


def architectures() -> tuple[str, ...]:
  return tuple(a for f in FAMILIES for a in f.architectures)


def family_for_architecture(arch: str) -> Family:
  for f in FAMILIES:
    if arch in f.architectures:
      return f
  raise ValueError(f"unsupported architecture {arch!r}; supported: {list(architectures())}")


def architecture_for_model_type(model_type) -> str | None:
  for f in FAMILIES:
    if model_type in f.model_types:
      return f.architectures[f.model_types.index(model_type)]
  return None


def family_of(cfg) -> Family:
  """The family of a model config (its ``family`` class attribute)."""
  name = getattr(type(cfg), "family", None)
  for f in FAMILIES:
    if f.name == name:
      return f
  raise ValueError(
    f"{type(cfg).__name__} names no registered model family (family={name!r}; known: "
    f"{[f.name for f in FAMILIES]}); see gkd_jax/models/base.py"
  )


def kind(model) -> str:
  """DECODER or ENCODER_DECODER, from the model class's ``kind`` attribute."""
  k = getattr(type(model), "kind", None)
  if k not in KINDS:
    raise TypeError(
      f"{type(model).__name__} declares no model kind (kind={k!r}, want one of {KINDS}); "
      "see gkd_jax/models/base.py"
    )
  return k


def is_encoder_decoder(model) -> bool:
  return kind(model) == ENCODER_DECODER


def context_len(model) -> int:
  """The longest sequence the model's decoder takes (prompt + answer for a decoder-only LM)."""
  cfg = model.cfg
  return cfg.max_decode_len if is_encoder_decoder(model) else cfg.max_seq_len
