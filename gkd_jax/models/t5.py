"""Encoder-decoder T5 in Flax NNX: T5 v1.1 / Flan-T5 and original T5.

Architecture (matches transformers' T5ForConditionalGeneration):
  * pre-norm blocks, T5 RMS norm (no mean subtraction, fp32 variance), no biases;
  * attention WITHOUT 1/sqrt(d_kv) scaling, plus a learned relative-position bias
    (bucketed: bidirectional in the encoder, causal in the decoder) owned by the
    first layer of each stack and shared by all its self-attention layers;
    cross-attention has no position bias;
  * FFN "gated-gelu" (v1.1 / Flan: gelu_new(x Wi0) * (x Wi1)) or "relu" (original);
  * head: untied lm_head (v1.1) or tied to the embedding with the decoder output
    scaled by d_model**-0.5 (original T5, ``tie_embeddings=True``).

Decoder inputs are the targets shifted right: ``[decoder_start_id, y0, y1, ...]``
(decoder_start_id = pad_id = 0 for T5), exactly as HF's ``_shift_right``.

Sharding: every ``nnx.Param`` carries logical axis names as flax partitioning
metadata (``out_sharding``, created through ``nnx.with_partitioning``) with
``eager_sharding=False``, so models build without a mesh;
``nnx.get_partition_spec(nnx.state(model))`` returns the logical specs to map on a
mesh. Logical names: "vocab", "embed", "heads", "head_dim", "mlp", "norm",
"relpos_buckets" ("kv_heads" is unused: T5 has no GQA); activations follow the
parameters' and the batch's shardings (gkd_jax.sharding), as in the Llama model.

dtype policy: params stored in ``param_dtype``, cast to ``dtype`` for compute;
norms and softmax in fp32; logits always float32.

Shape suffixes: B batch, S encoder length, T decoder length, D d_model, H heads,
K d_kv, F d_ff, V vocab, N relative-position buckets, L decoder layers,
M cache length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax.models import base

FFN_KINDS = ("relu", "gated-gelu")
_NEG = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyper-parameters (defaults: t5-small)."""

  family: ClassVar[str] = "t5"  # gkd_jax.models.base.FAMILIES

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  n_heads: int = 8
  d_ff: int = 2048
  n_encoder_layers: int = 6
  n_decoder_layers: int = 6
  rel_buckets: int = 32
  rel_max_distance: int = 128
  ffn: str = "relu"  # "relu" (original T5) | "gated-gelu" (v1.1 / Flan-T5)
  tie_embeddings: bool = True  # tied head + decoder output scaled by d_model**-0.5
  layer_norm_eps: float = 1e-6
  pad_id: int = 0
  decoder_start_id: int = 0
  eos_id: int = 1
  max_decode_len: int = 256  # default KV-cache length
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32  # compute dtype
  remat: bool = False

  def __post_init__(self):
    if self.ffn not in FFN_KINDS:
      raise ValueError(f"T5Config.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
    for name in (
      "vocab_size",
      "d_model",
      "d_kv",
      "n_heads",
      "d_ff",
      "n_encoder_layers",
      "n_decoder_layers",
      "rel_buckets",
      "rel_max_distance",
      "max_decode_len",
    ):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
    for name in ("param_dtype", "dtype"):
      try:
        dt = jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"T5Config.{name}: not a dtype: {getattr(self, name)!r}") from e
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"T5Config.{name} must be a float dtype, got {dt}")
      object.__setattr__(self, name, dt)


# ----------------------------------------------------------------------------- math


def rms_norm(x_BxTxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
  """T5 LayerNorm: x / sqrt(mean(x^2) + eps) * scale, in fp32; returns x's dtype."""
  x32 = x_BxTxD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale_D.astype(jnp.float32)).astype(x_BxTxD.dtype)


def relative_position_bucket(
  rel_TxS: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
  """Bucket of relative position (key_pos - query_pos), as in mesh-tensorflow / HF T5.

  Half the buckets are exact small distances, the rest log-spaced up to max_distance.
  Bidirectional: half the buckets for keys after the query; otherwise future keys map
  to bucket 0 (they are masked anyway). Returns int32 in [0, num_buckets).
  """
  buckets = jnp.zeros_like(rel_TxS, dtype=jnp.int32)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel_TxS > 0).astype(jnp.int32) * num_buckets
    dist = jnp.abs(rel_TxS)
  else:
    dist = -jnp.minimum(rel_TxS, 0)
  max_exact = num_buckets // 2
  is_small = dist < max_exact
  # Same fp32 op order as HF so bucket boundaries agree bit for bit.
  safe = jnp.maximum(dist, 1).astype(jnp.float32)
  large = max_exact + (
    jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, dist, large).astype(jnp.int32)


def position_bias(
  relpos_NxH: jax.Array,
  q_pos_T: jax.Array,
  k_pos_S: jax.Array,
  bidirectional: bool,
  max_distance: int,
) -> jax.Array:
  """Relative position bias HxTxS (fp32) for absolute query / key positions."""
  buckets_TxS = relative_position_bucket(
    k_pos_S[None, :] - q_pos_T[:, None], bidirectional, relpos_NxH.shape[0], max_distance
  )
  return jnp.transpose(relpos_NxH.astype(jnp.float32)[buckets_TxS], (2, 0, 1))


def attention(
  q_BxTxHxK: jax.Array,
  k_BxSxHxK: jax.Array,
  v_BxSxHxK: jax.Array,
  bias_HxTxS: jax.Array | None,
  mask_BxTxS: jax.Array,
) -> jax.Array:
  """T5 attention: fp32 scores q.k (no 1/sqrt(K) scaling) + bias, masked softmax.

  mask_BxTxS is boolean (True = may attend), broadcastable (e.g. Bx1xS, 1xTxS).
  Returns BxTxHxK in v's dtype.
  """
  s_BxHxTxS = jnp.einsum(
    "bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
  )
  if bias_HxTxS is not None:
    s_BxHxTxS = s_BxHxTxS + bias_HxTxS[None]
  s_BxHxTxS = jnp.where(mask_BxTxS[:, None], s_BxHxTxS, _NEG)
  p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1).astype(v_BxSxHxK.dtype)
  return jnp.einsum("bhts,bshk->bthk", p_BxHxTxS, v_BxSxHxK)


def _param(
  rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float | None, dtype
) -> nnx.Param:
  """Param with logical axis names; normal(std) init, or ones if std is None."""
  init = nnx.initializers.ones if std is None else nnx.initializers.normal(std)
  init = nnx.with_partitioning(init, names, eager_sharding=False)
  return nnx.Param(init(rngs.params(), shape, dtype))


# ----------------------------------------------------------------------------- modules


class RMSNorm(nnx.Module):
  """T5 LayerNorm (scale only)."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.eps = cfg.layer_norm_eps
    self.scale = _param(rngs, (cfg.d_model,), ("norm",), None, cfg.param_dtype)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    return rms_norm(x_BxTxD, self.scale[...], self.eps)


class Attention(nnx.Module):
  """Multi-head attention projections; q/k/v DxHxK, o HxKxD; HF-style init."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    d, h, k, pd = cfg.d_model, cfg.n_heads, cfg.d_kv, cfg.param_dtype
    self.dtype = cfg.dtype
    self.q = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), (d * k) ** -0.5, pd)
    self.k = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), d**-0.5, pd)
    self.v = _param(rngs, (d, h, k), ("embed", "heads", "head_dim"), d**-0.5, pd)
    self.o = _param(rngs, (h, k, d), ("heads", "head_dim", "embed"), (h * k) ** -0.5, pd)

  def _proj(self, w: nnx.Param, x_BxTxD: jax.Array) -> jax.Array:
    return jnp.einsum("btd,dhk->bthk", x_BxTxD, w[...].astype(self.dtype))

  def __call__(self, x_BxTxD, kv_BxSxD, bias_HxTxS, mask_BxTxS, cache=None):
    """Attend from x to kv_BxSxD -> (out_BxTxD, new_cache).

    cache: optional (k_BxMxHxK, v_BxMxHxK, index) for self-attention; the T new
    keys/values are written at slots [index, index+T) and attention runs over all
    M slots (mask_BxTxS must then be Bx?xM). Returns (k, v) as new_cache, else None.
    """
    q = self._proj(self.q, x_BxTxD)
    k, v = self._proj(self.k, kv_BxSxD), self._proj(self.v, kv_BxSxD)
    new_cache = None
    if cache is not None:
      k_cache, v_cache, index = cache
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      new_cache = (k, v)
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    ctx_BxTxHxK = attention(q, k, v, bias_HxTxS, mask_BxTxS)
    out = jnp.einsum("bthk,hkd->btd", ctx_BxTxHxK, self.o[...].astype(self.dtype))
    return out, new_cache


class FeedForward(nnx.Module):
  """relu: relu(x Wi) Wo; gated-gelu: (gelu_tanh(x Wi0) * x Wi1) Wo."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
    self.gated = cfg.ffn == "gated-gelu"
    self.dtype = cfg.dtype
    if self.gated:
      self.wi_0 = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5, pd)
      self.wi_1 = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5, pd)
    else:
      self.wi = _param(rngs, (d, f), ("embed", "mlp"), d**-0.5, pd)
    self.wo = _param(rngs, (f, d), ("mlp", "embed"), f**-0.5, pd)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    dot = lambda x, w: jnp.einsum("...i,io->...o", x, w[...].astype(self.dtype))
    if self.gated:
      h_BxTxF = jax.nn.gelu(dot(x_BxTxD, self.wi_0), approximate=True) * dot(x_BxTxD, self.wi_1)
    else:
      h_BxTxF = jax.nn.relu(dot(x_BxTxD, self.wi))
    return dot(h_BxTxF, self.wo)


class EncoderBlock(nnx.Module):
  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)

  def __call__(self, x_BxSxD, bias_HxSxS, mask_BxSxS):
    h = self.attn_norm(x_BxSxD)
    x_BxSxD = x_BxSxD + self.attn(h, h, bias_HxSxS, mask_BxSxS)[0]
    x_BxSxD = x_BxSxD + self.ffn(self.ffn_norm(x_BxSxD))
    return x_BxSxD


class DecoderBlock(nnx.Module):
  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.self_norm = RMSNorm(cfg, rngs=rngs)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.cross_norm = RMSNorm(cfg, rngs=rngs)
    self.cross_attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, enc_BxSxD, bias_HxTxT, self_mask_BxTxT, cross_mask_BxTxS, cache=None):
    """-> (x_BxTxD, new_cache); cache as in Attention (self-attention k/v)."""
    h = self.self_norm(x_BxTxD)
    a, new_cache = self.self_attn(h, h, bias_HxTxT, self_mask_BxTxT, cache)
    x_BxTxD = x_BxTxD + a
    x_BxTxD = (
      x_BxTxD + self.cross_attn(self.cross_norm(x_BxTxD), enc_BxSxD, None, cross_mask_BxTxS)[0]
    )
    x_BxTxD = x_BxTxD + self.ffn(self.ffn_norm(x_BxTxD))
    return x_BxTxD, new_cache


def _run(block, *args):
  return block(*args)


class T5(nnx.Module):
  """Encoder-decoder T5 (see module docstring). Build: ``T5(cfg, rngs=nnx.Rngs(0))``."""

  kind: ClassVar[str] = base.ENCODER_DECODER  # implements base.EncoderDecoderLM

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, pd = cfg.d_model, cfg.param_dtype
    self.embed = _param(rngs, (cfg.vocab_size, d), ("vocab", "embed"), 1.0, pd)
    self.enc_relpos = _param(
      rngs, (cfg.rel_buckets, cfg.n_heads), ("relpos_buckets", "heads"), d**-0.5, pd
    )
    self.encoder = nnx.List([EncoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_encoder_layers)])
    self.enc_norm = RMSNorm(cfg, rngs=rngs)
    self.dec_relpos = _param(
      rngs, (cfg.rel_buckets, cfg.n_heads), ("relpos_buckets", "heads"), d**-0.5, pd
    )
    self.decoder = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_decoder_layers)])
    self.dec_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), d**-0.5, pd)

  # -- helpers -------------------------------------------------------------------

  def _embed(self, tokens_BxT: jax.Array) -> jax.Array:
    x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(self.cfg.dtype)
    return x

  def _runner(self):
    return nnx.remat(_run) if self.cfg.remat else _run

  def _tokens(self, name: str, tokens) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
        f"{name} must be an int array [batch, length], got {tokens.dtype}{list(tokens.shape)}"
      )
    return tokens

  def _mask(self, name: str, mask, tokens_BxT: jax.Array, default) -> jax.Array:
    if mask is None:
      return default
    mask = jnp.asarray(mask)
    if mask.shape != tokens_BxT.shape:
      raise ValueError(f"{name} shape {list(mask.shape)} != tokens shape {list(tokens_BxT.shape)}")
    return mask.astype(bool)

  def _enc_mask(self, enc_BxSxD: jax.Array, mask, batch: int) -> jax.Array:
    """Validated boolean encoder mask BxS (None = all ones)."""
    if enc_BxSxD.ndim != 3 or enc_BxSxD.shape[0] != batch:
      raise ValueError(f"enc shape {list(enc_BxSxD.shape)} does not match decoder batch {batch}")
    if mask is None:
      return jnp.ones(enc_BxSxD.shape[:2], bool)
    mask = jnp.asarray(mask)
    if mask.shape != enc_BxSxD.shape[:2]:
      raise ValueError(
        f"encoder_mask shape {list(mask.shape)} != enc shape {list(enc_BxSxD.shape[:2])}"
      )
    return mask.astype(bool)

  def _finish(self, x_BxTxD: jax.Array) -> jax.Array:
    h = self.dec_norm(x_BxTxD)
    if self.cfg.tie_embeddings:
      h = h * jnp.asarray(self.cfg.d_model**-0.5, h.dtype)
    return h

  def _logits(self, h_BxTxD: jax.Array) -> jax.Array:
    return jnp.einsum("btd,dv->btv", h_BxTxD, self.head(), preferred_element_type=jnp.float32)

  # -- public API ----------------------------------------------------------------

  def head(self) -> jax.Array:
    """Output projection W_DxV (compute dtype): logits == decoder_hidden_states @ W."""
    w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return w.astype(self.cfg.dtype)

  def logit_softcap(self) -> None:
    """T5 caps no logits."""
    return None  # noqa: RET501 - the protocol's value, not an omission

  def encode(self, encoder_tokens_BxS, encoder_mask_BxS=None) -> jax.Array:
    """Encoder output enc_BxSxD (after final norm). Mask: 1 = real token
    (default: tokens != pad_id)."""
    tokens = self._tokens("encoder_tokens", encoder_tokens_BxS)
    mask_BxS = self._mask("encoder_mask", encoder_mask_BxS, tokens, tokens != self.cfg.pad_id)
    s = tokens.shape[1]
    pos = jnp.arange(s)
    bias_HxSxS = position_bias(self.enc_relpos[...], pos, pos, True, self.cfg.rel_max_distance)
    run, x = self._runner(), self._embed(tokens)
    for block in self.encoder:
      x = run(block, x, bias_HxSxS, mask_BxS[:, None, :])
    return self.enc_norm(x)

  def decoder_hidden_states(
    self, enc_BxSxD, encoder_mask_BxS, decoder_tokens_BxT, decoder_mask_BxT=None
  ) -> jax.Array:
    """Final decoder states h_BxTxD (after final norm, times d_model**-0.5 if tied).

    decoder_tokens are decoder INPUTS (targets shifted right, starting with
    decoder_start_id). encoder_mask None = all ones; decoder_mask None = all ones.
    """
    tokens = self._tokens("decoder_tokens", decoder_tokens_BxT)
    b, t = tokens.shape
    enc_mask = self._enc_mask(enc_BxSxD, encoder_mask_BxS, b)
    dec_mask_BxT = self._mask("decoder_mask", decoder_mask_BxT, tokens, jnp.ones((b, t), bool))
    pos = jnp.arange(t)
    bias_HxTxT = position_bias(self.dec_relpos[...], pos, pos, False, self.cfg.rel_max_distance)
    self_mask_BxTxT = (pos[None, :] <= pos[:, None])[None] & dec_mask_BxT[:, None, :]
    enc = enc_BxSxD.astype(self.cfg.dtype)
    run, x = self._runner(), self._embed(tokens)
    for block in self.decoder:
      x, _ = run(block, x, enc, bias_HxTxT, self_mask_BxTxT, enc_mask[:, None, :])
    return self._finish(x)

  def __call__(
    self, encoder_tokens_BxS, decoder_tokens_BxT, *, encoder_mask_BxS=None, decoder_mask_BxT=None
  ) -> jax.Array:
    """Teacher-forced logits_BxTxV (float32).

    decoder_tokens_BxT are the decoder INPUTS: targets shifted right, starting with
    decoder_start_id (= pad_id = 0), as HF's ``_shift_right``; logits[:, t] predict
    target t. Masks: 1 = real token; encoder default tokens != pad_id, decoder
    default all ones (the start token is the pad id).
    """
    tokens = self._tokens("encoder_tokens", encoder_tokens_BxS)
    enc_mask = self._mask("encoder_mask", encoder_mask_BxS, tokens, tokens != self.cfg.pad_id)
    enc_BxSxD = self.encode(tokens, enc_mask)
    return self._logits(
      self.decoder_hidden_states(enc_BxSxD, enc_mask, decoder_tokens_BxT, decoder_mask_BxT)
    )

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> dict:
    """Empty decoder KV cache (plain pytree): {"k", "v": [L, B, M, H, K], "index": int32 0}.

    Only self-attention k/v are cached; cross-attention k/v are recomputed from
    enc_BxSxD at every decode_with_cache call (keeps the cache independent of S).
    """
    max_len = self.cfg.max_decode_len if max_len is None else max_len
    if batch <= 0 or max_len <= 0:
      raise ValueError(f"init_cache: batch and max_len must be > 0, got {batch}, {max_len}")
    dtype = self.cfg.dtype if dtype is None else dtype
    shape = (self.cfg.n_decoder_layers, batch, max_len, self.cfg.n_heads, self.cfg.d_kv)
    return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "index": jnp.zeros((), jnp.int32),
    }

  def decode_with_cache(self, decoder_tokens_BxT, enc_BxSxD, encoder_mask_BxS, cache: dict):
    """Incremental decoding -> (logits_BxTxV float32, new_cache).

    Writes the T new tokens at cache slots [index, index+T) (no bound check at trace
    time: index + T must be <= M), attends causally over written slots, with the
    relative position bias taken at absolute positions (query = index + t).
    Feeding a sequence in any chunking gives the same logits as ``__call__``.
    """
    tokens = self._tokens("decoder_tokens", decoder_tokens_BxT)
    b, t = tokens.shape
    k_cache, v_cache, index = cache["k"], cache["v"], cache["index"]
    expected = (self.cfg.n_decoder_layers, b, self.cfg.n_heads, self.cfg.d_kv)
    got = (k_cache.shape[0], k_cache.shape[1], *k_cache.shape[3:])
    if k_cache.ndim != 5 or got != expected or v_cache.shape != k_cache.shape:
      raise ValueError(
        f"cache k/v shape {list(k_cache.shape)} does not match "
        f"[L={expected[0]}, B={b}, M, H={expected[2]}, K={expected[3]}]"
      )
    m = k_cache.shape[2]
    if t > m:
      raise ValueError(f"decoder_tokens length {t} exceeds cache length {m}")
    enc_mask = self._enc_mask(enc_BxSxD, encoder_mask_BxS, b)
    q_pos_T = index + jnp.arange(t, dtype=jnp.int32)
    k_pos_M = jnp.arange(m, dtype=jnp.int32)
    bias_HxTxM = position_bias(
      self.dec_relpos[...], q_pos_T, k_pos_M, False, self.cfg.rel_max_distance
    )
    self_mask_1xTxM = (k_pos_M[None, :] <= q_pos_T[:, None])[None]
    enc = enc_BxSxD.astype(self.cfg.dtype)
    run, x = self._runner(), self._embed(tokens)
    ks, vs = [], []
    for layer, block in enumerate(self.decoder):
      x, (k, v) = run(
        block,
        x,
        enc,
        bias_HxTxM,
        self_mask_1xTxM,
        enc_mask[:, None, :],
        (k_cache[layer], v_cache[layer], index),
      )
      ks.append(k)
      vs.append(v)
    logits = self._logits(self._finish(x))
    return logits, {"k": jnp.stack(ks), "v": jnp.stack(vs), "index": index + t}
