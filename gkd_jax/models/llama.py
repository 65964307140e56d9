"""Decoder-only transformer (Llama / SmolLM2 / Mistral / Qwen2) in Flax NNX.

Semantics follow Hugging Face `modeling_llama` / `modeling_qwen2` / `modeling_mistral`:
pre-norm RMSNorm blocks, rotate-half RoPE, grouped-query attention (query head
h uses kv head h // (n_heads // n_kv_heads)), SwiGLU MLP.

Every parameter carries logical axis names in its `out_sharding` metadata
("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm", "layers");
`gkd_jax.sharding` maps them to mesh axes. Parameters are created with
`eager_sharding=False`, so building a model never needs a mesh.

Shape suffixes: B batch, T query length, S key/cache length, D d_model,
H query heads, K kv heads, G = H // K, Dh head_dim, F mlp_dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax.divergences import softcap
from gkd_jax.models import base
from gkd_jax.models.numerics import dot

ROPE_SCALING_TYPES = ("linear", "llama3")
# cfg.remat_policy -> what a rematerialised layer saves for its backward pass: "full" nothing
# (the backward recomputes the whole layer), "dots" the outputs of its weight matmuls (it
# recomputes attention and the elementwise ops only)
REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_NEG_INF = -1e30  # finite, so fully masked (padding) rows stay NaN-free


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture + dtype policy. Hashable (it is static model metadata).

  rope_scaling: None or a dict like HF's {"rope_type": "linear", "factor": 2.0} or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}; stored as a sorted tuple of items.
  sliding_window: None or Mistral-style window (key slot > query slot - window).
  param_dtype / dtype: parameter storage / compute dtype names; logits are float32.
  remat / remat_policy: with remat each layer is rematerialised (jax.checkpoint); the policy
    (REMAT_POLICIES) is what it saves for the backward pass.
  dot_dtype: None (= dtype) or the dtype both inputs of every weight matmul are
    rounded to (the embedding table and tied head included); accumulation is float32
    and results return to dtype; gradients as ``numerics.dot`` (the backward matmuls
    round too, cotangents keep the parameters' dtype). Attention runs in dtype, except over
    a KV cache (init_cache: keys and values stored in the matmul dtype), where its two
    matmuls take inputs in the cache's dtype (decoding and prefill).
    "bfloat16" with float32 dtype is a TPU's default matmul precision; on CPUs it halves
    the bytes a matmul reads.
  """

  family: ClassVar[str] = "llama"  # gkd_jax.models.base.FAMILIES

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  rope_scaling: Any = None
  rms_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  final_logit_softcap: float | None = None
  sliding_window: int | None = None
  max_seq_len: int = 2048
  param_dtype: Any = "float32"
  dtype: Any = "float32"
  dot_dtype: Any = None
  remat: bool = False
  remat_policy: str = "full"
  scan_layers: bool = False

  def __post_init__(self):
    for f in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "head_dim",
      "mlp_dim",
      "max_seq_len",
    ):
      v = getattr(self, f)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LlamaConfig.{f} must be a positive int, got {v!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f"LlamaConfig.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
    if not self.rope_theta > 0:
      raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
    if not self.rms_eps > 0:
      raise ValueError(f"LlamaConfig.rms_eps must be > 0, got {self.rms_eps!r}")
    if self.final_logit_softcap is not None and not self.final_logit_softcap > 0:
      raise ValueError(
        f"LlamaConfig.final_logit_softcap must be None or > 0, got {self.final_logit_softcap!r}"
      )
    if self.sliding_window is not None and not self.sliding_window > 0:
      raise ValueError(
        f"LlamaConfig.sliding_window must be None or > 0, got {self.sliding_window!r}"
      )
    for f in ("param_dtype", "dtype", "dot_dtype"):
      if getattr(self, f) is None:
        continue
      try:
        name = jnp.dtype(getattr(self, f)).name
      except TypeError as e:
        raise ValueError(f"LlamaConfig.{f}: unknown dtype {getattr(self, f)!r}") from e
      if not jnp.issubdtype(jnp.dtype(name), jnp.floating):
        raise ValueError(f"LlamaConfig.{f} must be a float dtype, got {name}")
      object.__setattr__(self, f, name)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"LlamaConfig.remat_policy must be one of {sorted(REMAT_POLICIES)}, "
        f"got {self.remat_policy!r}"
      )
    rs = self.rope_scaling
    if rs is not None:
      rs = dict(rs)
      kind = rs.get("rope_type", rs.get("type"))
      if kind not in ROPE_SCALING_TYPES:
        raise ValueError(
          f"LlamaConfig.rope_scaling: unsupported rope_type {kind!r}; "
          f"supported: {ROPE_SCALING_TYPES}"
        )
      need = (
        ("factor",)
        if kind == "linear"
        else ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
      )
      missing = [k for k in need if k not in rs]
      if missing:
        raise ValueError(f"LlamaConfig.rope_scaling ({kind}) is missing {missing}")
      rs = {k: v for k, v in rs.items() if k in need}
      rs["rope_type"] = kind
      object.__setattr__(self, "rope_scaling", tuple(sorted(rs.items())))

  @property
  def matmul_dtype(self) -> str:
    """dtype of every matmul's inputs: dot_dtype, else the compute dtype."""
    return self.dot_dtype or self.dtype

  @property
  def rope_scaling_dict(self) -> dict | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)


# ----------------------------------------------------------------------------
# Pure math.
# ----------------------------------------------------------------------------


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2] (float32), with HF's linear / llama3 scaling."""
  dim = cfg.head_dim
  inv = (1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(
    np.float32
  )
  rs = cfg.rope_scaling_dict
  if rs is None:
    return inv
  factor = rs["factor"]
  if rs["rope_type"] == "linear":
    return (inv / factor).astype(np.float32)
  # llama3: keep high frequencies, divide low ones by factor, interpolate between.
  old_len = rs["original_max_position_embeddings"]
  lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_BxT, inv_freq, bound=None):
  """(cos, sin) of the RoPE angles, each [B, T, Dh] float32 (HF's rotate-half layout: the Dh/2
  angles positions * inv_freq, twice), computed once per forward for every layer.

  bound: None, or a static int that every position is known to be below (default positions:
  the sequence or cache length). Then the result is rows of [bound, Dh] tables, gathered by
  position. XLA fuses cos/sin into each consumer, so without a bound every layer's RoPE
  recomputes them per head; a gathered row is a load (on CPU the recomputation was ~5% of a
  batch-32 decode step of SmolLM2-135M).
  """
  inv_freq = jnp.asarray(inv_freq)
  angles = lambda pos: jnp.concatenate([pos.astype(jnp.float32)[..., None] * inv_freq] * 2, -1)
  if bound is None:
    ang_BxTxDh = angles(positions_BxT)
    return jnp.cos(ang_BxTxDh), jnp.sin(ang_BxTxDh)
  ang_NxDh = angles(jnp.arange(bound))
  rows = lambda table: jnp.take(table, positions_BxT, axis=0, mode="clip")
  return rows(jnp.cos(ang_NxDh)), rows(jnp.sin(ang_NxDh))


def apply_rope(x_BxTxNxDh, cos_BxTxDh, sin_BxTxDh):
  """Rotate-half RoPE (HF layout: first half / second half of Dh), in float32, back to x's
  dtype; cos/sin from ``rope_tables``."""
  x = x_BxTxNxDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x * cos_BxTxDh[:, :, None] + rotated * sin_BxTxDh[:, :, None]
  return out.astype(x_BxTxNxDh.dtype)


def rms_norm(x_BxTxD, scale_D, eps):
  """HF RMSNorm: normalise in float32, cast back, then multiply by the scale."""
  x = x_BxTxD.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return x.astype(x_BxTxD.dtype) * scale_D.astype(x_BxTxD.dtype)


def attention_mask(kv_mask_BxS, q_slots_T, sliding_window=None):
  """Bool [B, T, S]: key slot is valid, causal (slot <= query slot), in window."""
  k_slots_S = jnp.arange(kv_mask_BxS.shape[1])
  allowed_TxS = k_slots_S[None, :] <= q_slots_T[:, None]
  if sliding_window is not None:
    allowed_TxS &= k_slots_S[None, :] > q_slots_T[:, None] - sliding_window
  return kv_mask_BxS[:, None, :] & allowed_TxS[None]


def gqa_attention(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, mask_BxTxS, dtype=jnp.float32):
  """Grouped-query softmax attention -> [B, T, H, Dh] in q's dtype.

  Keys/values are [B, K, S, Dh] (the KV cache's layout, read in place). Both matmuls take
  inputs rounded to `dtype` and accumulate in float32; scores and softmax are float32. Each
  kv head's G x T queries form one [G*T, Dh] by [Dh, S] matmul: CPU XLA has a bfloat16 kernel
  for every shape of that form (not of a two-free-dim einsum), and with bfloat16 inputs a
  batch-32 decode step of SmolLM2-135M spends 17 ms in attention and cache writes (30 layers,
  118 slots) against 28 ms in float32.
  """
  b, t, h, dh = q_BxTxHxDh.shape
  k, g = k_BxKxSxDh.shape[1], h // k_BxKxSxDh.shape[1]
  q_BxKxMxDh = q_BxTxHxDh.reshape(b, t, k, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, dh)
  s_BxKxMxS = jnp.einsum(
    "bkmd,bksd->bkms",
    q_BxKxMxDh.astype(dtype),
    k_BxKxSxDh.astype(dtype),
    preferred_element_type=jnp.float32,
  ) * (dh**-0.5)
  s_BxKxGxTxS = s_BxKxMxS.reshape(b, k, g, t, -1)
  s_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], s_BxKxGxTxS, _NEG_INF)
  p_BxKxMxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(dtype).reshape(b, k, g * t, -1)
  out_BxKxMxDh = jnp.einsum(
    "bkms,bksd->bkmd", p_BxKxMxS, v_BxKxSxDh.astype(dtype), preferred_element_type=jnp.float32
  )
  out_BxTxKxGxDh = out_BxKxMxDh.reshape(b, k, g, t, dh).transpose(0, 3, 1, 2, 4)
  return out_BxTxKxGxDh.reshape(b, t, h, dh).astype(q_BxTxHxDh.dtype)


def default_positions(mask_BxT, offset_B=None):
  """cumsum(mask) - 1 clipped at 0 (+ offset = number of real tokens already cached)."""
  pos = jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)
  return pos if offset_B is None else pos + offset_B[:, None]


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


def _param(rngs, init, shape, names, cfg):
  value = init(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


_normal = jax.nn.initializers.normal(0.02)
_zeros = jax.nn.initializers.zeros
_ones = jax.nn.initializers.ones


class Block(nnx.Module):
  """One pre-norm decoder layer: x + attn(norm(x)); x + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    self.attn_norm = _param(rngs, _ones, (d,), ("norm",), cfg)
    self.wq = _param(rngs, _normal, (d, h, dh), ("embed", "heads", "head_dim"), cfg)
    self.wk = _param(rngs, _normal, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.wv = _param(rngs, _normal, (d, k, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.wo = _param(rngs, _normal, (h, dh, d), ("heads", "head_dim", "embed"), cfg)
    if cfg.qkv_bias:
      self.bq = _param(rngs, _zeros, (h, dh), ("heads", "head_dim"), cfg)
      self.bk = _param(rngs, _zeros, (k, dh), ("kv_heads", "head_dim"), cfg)
      self.bv = _param(rngs, _zeros, (k, dh), ("kv_heads", "head_dim"), cfg)
    self.mlp_norm = _param(rngs, _ones, (d,), ("norm",), cfg)
    self.w_gate = _param(rngs, _normal, (d, f), ("embed", "mlp"), cfg)
    self.w_up = _param(rngs, _normal, (d, f), ("embed", "mlp"), cfg)
    self.w_down = _param(rngs, _normal, (f, d), ("mlp", "embed"), cfg)

  def __call__(self, x_BxTxD, rope, mask_BxTxS, kv=None, index=None):
    """Returns (x_BxTxD, (k, v)); rope: (cos, sin) [B,T,Dh] of the tokens' positions (rope_tables).

    kv=None: keys are this call's T tokens, attention in the compute dtype; returns this
    call's k, v [B,K,T,Dh]. kv=(k_BxKxSxDh, v_BxKxSxDh) (this layer's cache): writes the T new
    keys/values at slots [index, index+T) in place and attends over the layer's S slots with
    matmul inputs in the cache's dtype; returns the updated cache.
    """
    cfg, mm = self.cfg, jnp.dtype(self.cfg.matmul_dtype)
    h_BxTxD = rms_norm(x_BxTxD, self.attn_norm[...], cfg.rms_eps)
    q = dot("btd,dhk->bthk", h_BxTxD, self.wq[...], mm)
    k = dot("btd,dhk->bthk", h_BxTxD, self.wk[...], mm)
    v = dot("btd,dhk->bthk", h_BxTxD, self.wv[...], mm)
    if cfg.qkv_bias:
      dt = x_BxTxD.dtype
      q, k, v = (
        q + self.bq[...].astype(dt),
        k + self.bk[...].astype(dt),
        v + self.bv[...].astype(dt),
      )
    q = apply_rope(q, *rope)
    k = apply_rope(k, *rope)
    # keys/values as attention (and a KV cache) holds them: [B,K,T,Dh]
    k_BxKxTxDh, v_BxKxTxDh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    att_dtype = x_BxTxD.dtype
    if kv is not None:  # write the T new slots in place, attend over the whole cache
      k_cache, v_cache = kv
      att_dtype = v_cache.dtype  # the cache holds attention's matmul inputs, rounded
      k_cache = _write(k_cache, k_BxKxTxDh.astype(k_cache.dtype), (0, 0, index, 0))
      v_cache = _write(v_cache, v_BxKxTxDh.astype(v_cache.dtype), (0, 0, index, 0))
      k_BxKxTxDh, v_BxKxTxDh = k_cache, v_cache
    out_BxTxHxDh = gqa_attention(q, k_BxKxTxDh, v_BxKxTxDh, mask_BxTxS, att_dtype)
    x_BxTxD = x_BxTxD + dot("bthk,hkd->btd", out_BxTxHxDh, self.wo[...], mm)

    h_BxTxD = rms_norm(x_BxTxD, self.mlp_norm[...], cfg.rms_eps)
    gate_BxTxF = dot("btd,df->btf", h_BxTxD, self.w_gate[...], mm)
    up_BxTxF = dot("btd,df->btf", h_BxTxD, self.w_up[...], mm)
    x_BxTxD = x_BxTxD + dot("btf,fd->btd", jax.nn.silu(gate_BxTxF) * up_BxTxF, self.w_down[...], mm)
    return x_BxTxD, ((k_cache, v_cache) if kv is not None else (k_BxKxTxDh, v_BxKxTxDh))


def take_rows(table_VxD, ids):
  """``jnp.take(table, ids, axis=0)`` (out-of-range ids give NaN rows), with take's gradient. A
  bfloat16 table is gathered as its uint16 bits: CPU XLA widens a bfloat16 gather to float32
  and moves the conversion onto the whole table, which a decode loop then hoists (a float32
  copy of the 49152x576 table, 47 ms, per sampler call); the bits are the same."""
  if table_VxD.dtype != jnp.bfloat16:
    return jnp.take(table_VxD, ids, axis=0)
  return _take_bits(table_VxD, ids)


@jax.custom_vjp
def _take_bits(table_VxD, ids):
  table_bits = jax.lax.bitcast_convert_type(table_VxD, jnp.uint16)
  bits = jnp.take(table_bits, ids, axis=0, fill_value=0x7FC0)  # take's fill: bf16's NaN
  return jax.lax.bitcast_convert_type(bits, table_VxD.dtype)


def _take_bits_fwd(table_VxD, ids):
  return _take_bits(table_VxD, ids), (table_VxD, ids)


def _take_bits_bwd(res, g_rows):  # take's own gradient
  table_VxD, ids = res
  return jax.vjp(lambda t: jnp.take(t, ids, axis=0), table_VxD)[1](g_rows)[0], None


_take_bits.defvjp(_take_bits_fwd, _take_bits_bwd)


def _write(cache, new, start):
  """dynamic_update_slice(cache, new, start), in place. A bfloat16 cache is written as its
  uint16 bits: CPU XLA widens a bf16 dynamic-update-slice to float32 and back, which copies
  the whole cache per write (at batch 32, 11 of a decode step's 84 ms); the bits are the same."""
  if cache.dtype != jnp.bfloat16:
    return jax.lax.dynamic_update_slice(cache, new, start)
  bits = lambda x, dt: jax.lax.bitcast_convert_type(x, dt)
  out = jax.lax.dynamic_update_slice(bits(cache, jnp.uint16), bits(new, jnp.uint16), start)
  return bits(out, jnp.bfloat16)


def _run_block(graphdef, state, x, rope, mask, kv, index):
  return nnx.merge(graphdef, state)(x, rope, mask, kv, index)


class Llama(nnx.Module):
  """Decoder-only LM. Params: embed [V,D], layers, final_norm [D], lm_head [D,V] (untied).

  With cfg.scan_layers the blocks are one Block whose params have a leading
  "layers" axis [L, ...] and run under lax.scan; otherwise `layers` is an
  nnx.List of L Blocks. cfg.remat wraps each block application in jax.checkpoint.
  """

  kind: ClassVar[str] = base.DECODER  # implements base.DecoderLM

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, _normal, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
    if cfg.scan_layers:

      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(rngs):
        return Block(cfg, rngs=rngs)

      self.layers = make_blocks(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = _param(rngs, _ones, (cfg.d_model,), ("norm",), cfg)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, _normal, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

  # -- public API ------------------------------------------------------------

  def unembedding(self):
    """(W, layout) in param dtype: the tied embedding [V, D] as "vd" (used as it is stored, no
    transposed copy), else lm_head [D, V] as "dv"."""
    return (self.embed[...], "vd") if self.cfg.tie_embeddings else (self.lm_head[...], "dv")

  def head(self):
    """Unembedding W_DxV (param dtype); embedding.T when tied."""
    w, layout = self.unembedding()
    return w.T if layout == "vd" else w

  def logit_softcap(self) -> float | None:
    """The cap of softcap(h @ W), or None."""
    return self.cfg.final_logit_softcap

  def logits_from_hidden(self, h_BxTxD):
    """softcap(h @ W) in float32 (inputs in cfg.matmul_dtype, float32 accumulation)."""
    w, layout = self.unembedding()
    logits = dot(f"btd,{layout}->btv", h_BxTxD, w, self.cfg.matmul_dtype, jnp.float32)
    return softcap(logits, self.cfg.final_logit_softcap)

  def hidden_states(self, tokens_BxT, *, mask_BxT=None, positions_BxT=None):
    """Final-norm hidden states h_BxTxD (compute dtype), causal, padding-aware."""
    t = tokens_BxT.shape[1]
    rope_bound = t if positions_BxT is None else None  # default positions are < T
    mask_BxT, positions_BxT = self._defaults(tokens_BxT, mask_BxT, positions_BxT, None)
    rope = rope_tables(positions_BxT, rope_inv_freq(self.cfg), rope_bound)
    mask_BxTxS = attention_mask(mask_BxT.astype(bool), jnp.arange(t), self.cfg.sliding_window)
    h, _ = self._layers(self._embed(tokens_BxT), rope, mask_BxTxS, None, None, None)
    return rms_norm(h, self.final_norm[...], self.cfg.rms_eps)

  def __call__(self, tokens_BxT, *, mask_BxT=None, positions_BxT=None):
    """Causal logits_BxTxV in float32. mask: 1 real token, 0 padding (never attended to)."""
    h = self.hidden_states(tokens_BxT, mask_BxT=mask_BxT, positions_BxT=positions_BxT)
    return self.logits_from_hidden(h)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: kv_mask [B,S] bool; index int32 scalar; k, v a tuple of L arrays
    [B,K,S,Dh] (one per layer, so attention reads each in place; a scanned model too, whose
    cached forward runs its layers unrolled). dtype (default: the matmul dtype, so a
    dot_dtype="bfloat16" model keeps bf16 keys and values) is also the dtype attention's
    matmuls over the cache take their inputs in."""
    cfg = self.cfg
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.matmul_dtype)
    kv = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return {
      "k": kv(),
      "v": kv(),
      "kv_mask": jnp.zeros((batch, max_len), bool),
      "index": jnp.zeros((), jnp.int32),
    }

  def forward_with_cache(
    self, tokens_BxT, cache, *, mask_BxT=None, positions_BxT=None, last_only=False
  ):
    """Prefill (T = prompt length, left-padded) or decode (T = 1) step.

    Writes the T new keys/values at slots [index, index+T), records mask_BxT in
    kv_mask, attends causally to valid slots <= own slot, index += T.
    Default positions continue from the number of real tokens already cached.
    The caller keeps index + T <= S (under jit an overflowing write would be
    clamped by dynamic_update_slice, not reported). Sliding windows count slots.
    Returns (logits_BxTxV float32, new_cache); with last_only, logits_Bx1xV of the
    last position only (what a sampler's prefill needs).
    """
    s = cache["kv_mask"].shape[1]
    t = tokens_BxT.shape[1]
    if t > s:
      raise ValueError(f"forward_with_cache: {t} new tokens do not fit a cache of length {s}")
    index = cache["index"]
    offset_B = jnp.sum(cache["kv_mask"], axis=1, dtype=jnp.int32)
    rope_bound = s if positions_BxT is None else None  # default positions count cached tokens: < S
    mask_BxT, positions_BxT = self._defaults(tokens_BxT, mask_BxT, positions_BxT, offset_B)
    rope = rope_tables(positions_BxT, rope_inv_freq(self.cfg), rope_bound)
    kv_mask_BxS = jax.lax.dynamic_update_slice(cache["kv_mask"], mask_BxT.astype(bool), (0, index))
    mask_BxTxS = attention_mask(kv_mask_BxS, index + jnp.arange(t), self.cfg.sliding_window)
    h, (k, v) = self._layers(
      self._embed(tokens_BxT), rope, mask_BxTxS, cache["k"], cache["v"], index
    )
    if last_only:
      h = h[:, -1:]
    h = rms_norm(h, self.final_norm[...], self.cfg.rms_eps)
    new_cache = {"k": k, "v": v, "kv_mask": kv_mask_BxS, "index": index + t}
    return self.logits_from_hidden(h), new_cache

  # -- internals -------------------------------------------------------------

  def _defaults(self, tokens_BxT, mask_BxT, positions_BxT, offset_B):
    if tokens_BxT.ndim != 2:
      raise ValueError(f"tokens_BxT must be 2-D [batch, length], got shape {tokens_BxT.shape}")
    if mask_BxT is None:
      mask_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    elif mask_BxT.shape != tokens_BxT.shape:
      raise ValueError(f"mask_BxT shape {mask_BxT.shape} != tokens_BxT shape {tokens_BxT.shape}")
    if positions_BxT is None:
      positions_BxT = default_positions(mask_BxT, offset_B)
    elif positions_BxT.shape != tokens_BxT.shape:
      raise ValueError(
        f"positions_BxT shape {positions_BxT.shape} != tokens_BxT shape {tokens_BxT.shape}"
      )
    return mask_BxT, positions_BxT

  def _embed(self, tokens_BxT):
    """Rows of the table as the head reads it (rounded to matmul_dtype), in dtype."""
    rows = take_rows(self.embed[...], tokens_BxT)
    mm = jnp.dtype(self.cfg.matmul_dtype)
    if mm != rows.dtype:  # rounded as the head reads it; the rounding's gradient is the identity
      rows = rows + jax.lax.stop_gradient(rows.astype(mm).astype(rows.dtype) - rows)
    return rows.astype(jnp.dtype(self.cfg.dtype))

  def _layers(self, x_BxTxD, rope, mask_BxTxS, k_cache, v_cache, index):
    """Runs all blocks (rope: rope_tables' (cos, sin)); with a cache returns the updated k, v
    (as init_cache)."""
    cfg = self.cfg
    run = _run_block
    if cfg.remat:
      run = jax.checkpoint(_run_block, static_argnums=(0,), policy=REMAT_POLICIES[cfg.remat_policy])
    has_cache = k_cache is not None

    if cfg.scan_layers and not has_cache:  # training and scoring: one scanned layer body
      graphdef, state = nnx.split(self.layers)

      def body(x, st):
        return run(graphdef, st, x, rope, mask_BxTxS, None, None)[0], None

      return jax.lax.scan(body, x_BxTxD, state)[0], (None, None)

    # unrolled, also for a scanned model's cached prefill and decode: each layer reads and
    # writes its own cache array in place (a scan carrying the whole cache ran the decode of a
    # 10-layer student at half the speed on CPU, README "Speed against TRL")
    if cfg.scan_layers:
      graphdef, stacked = nnx.split(self.layers)
      blocks = [(graphdef, jax.tree.map(lambda a: a[i], stacked)) for i in range(cfg.n_layers)]
    else:
      blocks = [nnx.split(block) for block in self.layers]
    new_k, new_v = [], []
    for i, (graphdef, state) in enumerate(blocks):
      kv = (k_cache[i], v_cache[i]) if has_cache else None
      x_BxTxD, (k, v) = run(graphdef, state, x_BxTxD, rope, mask_BxTxS, kv, index)
      new_k.append(k)
      new_v.append(v)
    if has_cache:
      k_cache, v_cache = tuple(new_k), tuple(new_v)
    return x_BxTxD, (k_cache, v_cache)
