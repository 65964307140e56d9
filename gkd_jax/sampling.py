"""Batched sampling with a KV cache: prefill once, then ``lax.scan`` decode loops.

Decoder-only models decode in segments of ``_SEGMENT`` steps (``segments``): the KV cache
grows between them, so each step attends over the slots filled by its segment's end, not
over all prompt + max_new_tokens slots (about 0.7x the attention reads for 128 new tokens;
one more compiled loop body per segment).

Padding side: ``prompt_tokens [B, P]`` are RIGHT-padded (row b holds its prompt in
``[:prompt_lengths[b]]``, the layout data pipelines produce). For decoder-only
models the sampler left-aligns them internally so all rows share one cache slot
index; encoder-decoder models take the prompt as encoder input.

The jitted core takes the model's parameters as arguments (``nnx.split``), so a
new set of student weights of the same shapes reuses the compiled program. Every
sampling knob is static: change one, and that call compiles once, ahead of its run
(``hostmem.Precompiled``: the compiler's garbage goes back to the system before the
sampler's own buffers are allocated).

Rows that emit an EOS keep emitting ``pad_id`` and are masked; the EOS itself is
part of the output and of the mask (so a student learns to stop).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gkd_jax import hostmem
from gkd_jax.models import base
from gkd_jax.models.numerics import with_dot_dtype

_NEG = -1e30


class Samples(NamedTuple):
  """tokens ``[B, N]`` int32 (pad after EOS); mask ``[B, N]`` bool (valid generated
  tokens, EOS included); lengths ``[B]`` int32 (= mask.sum(1)); logprobs ``[B, N]``
  float32: log-prob of each chosen token under the sampling distribution (after
  temperature, top-k and top-p; for greedy, under the model's own softmax), 0 where
  masked."""

  tokens: jax.Array
  mask: jax.Array
  lengths: jax.Array
  logprobs: jax.Array


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  dot_dtype: str | None = None

  def __post_init__(self):
    if self.dot_dtype is not None:
      try:
        name = jnp.dtype(self.dot_dtype).name
      except TypeError as e:
        raise ValueError(f"dot_dtype: unknown dtype {self.dot_dtype!r}") from e
      if not jnp.issubdtype(jnp.dtype(name), jnp.floating):
        raise ValueError(f"dot_dtype must be a float dtype (e.g. 'bfloat16'), got {name}")
      object.__setattr__(self, "dot_dtype", name)
    if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


def split(model):
  """-> (graphdef, params, module) of a model given as an ``nnx.Module`` or as a
  ``(graphdef, params)`` pair (a trainer's parameters, the only copy: the module is merged
  from them for host-side checks, and never kept)."""
  if isinstance(model, tuple):
    graphdef, params = model
    return graphdef, params, nnx.merge(graphdef, params)
  graphdef, params = nnx.split(model)
  return graphdef, params, model


def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
  """Sets logits outside the top-k / top-p (nucleus) sets to a large negative value.

  top-p keeps the smallest prefix of tokens (by probability) whose mass reaches
  top_p; ties with the last kept logit are kept too.
  """
  if top_k and top_k < logits_BxV.shape[-1]:
    kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth, _NEG, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # always keeps the first
    last_kept = jnp.min(jnp.where(keep, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < last_kept, _NEG, logits_BxV)
  return logits_BxV


_CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def _below(x):
  """The largest float32 below x (x > 0): a draw u < total, so that u picks a token."""
  return jnp.nextafter(x, jnp.zeros_like(x))


def inverse_cdf_sample(key, logits_BxV):
  """``inverse_cdf_draw`` with the row uniforms ``jax.random.uniform(key, (B, 1))``."""
  return inverse_cdf_draw(jax.random.uniform(key, (logits_BxV.shape[0], 1)), logits_BxV)


def inverse_cdf_draw(u_Bx1, logits_BxV):
  """Exact categorical draw from softmax(logits) with one uniform u in [0, 1) per row (Gumbel-max
  needs V of them) -> (token_B int32, logprob_B float32 = logits[token] - logsumexp(logits)).

  Token i is chosen when cdf[i-1] <= u < cdf[i], u ~ U[0, cdf[-1]), over the unnormalised
  p = exp(logits - max); zero-probability tokens can never be chosen. Two levels, so no
  length-V scan: u picks a block of ``_CDF_BLOCK`` tokens by the cumulative block masses,
  then a token inside that block by the block's own cumulative sum (the same rule, with
  shorter float32 sums). Only the block masses and the chosen block's p are formed: no
  [B, V] probabilities or log-probabilities are written (two reads of the logits).
  """
  b, v = logits_BxV.shape
  n = -(-v // _CDF_BLOCK)
  max_Bx1 = jnp.max(logits_BxV, axis=-1, keepdims=True)
  pad = ((0, 0), (0, n * _CDF_BLOCK - v))
  logits_BxNxC = jnp.pad(logits_BxV, pad, constant_values=-jnp.inf).reshape(b, n, _CDF_BLOCK)
  mass_BxN = jnp.sum(jnp.exp(logits_BxNxC - max_Bx1[..., None]), axis=-1)
  cdf_BxN = jnp.cumsum(mass_BxN, axis=-1)
  total_Bx1 = cdf_BxN[:, -1:]
  u_Bx1 = jnp.minimum(u_Bx1 * total_Bx1, _below(total_Bx1))
  blk_B = jnp.sum(cdf_BxN <= u_Bx1, axis=-1)  # its block has mass > 0
  at = lambda x_BxN: jnp.take_along_axis(x_BxN, blk_B[:, None], axis=1)[:, 0]
  mass_B = at(mass_BxN)
  block_BxC = jnp.take_along_axis(logits_BxNxC, blk_B[:, None, None], axis=1)[:, 0]
  cdf_BxC = jnp.cumsum(jnp.exp(block_BxC - max_Bx1), axis=-1)
  # the residual, rescaled to the block's own sum (rounded apart from mass_BxN), stays below it
  r_B = (u_Bx1[:, 0] - (at(cdf_BxN) - mass_B)) * (cdf_BxC[:, -1] / mass_B)
  r_B = jnp.clip(r_B, 0.0, _below(cdf_BxC[:, -1]))
  in_block_B = jnp.sum(cdf_BxC <= r_B[:, None], axis=-1)
  tok_B = (blk_B * _CDF_BLOCK + in_block_B).astype(jnp.int32)
  logz_B = max_Bx1[:, 0] + jnp.log(total_Bx1[:, 0])
  return tok_B, jnp.take_along_axis(block_BxC, in_block_B[:, None], axis=1)[:, 0] - logz_B


def uniforms(rng, steps: int, batch: int):
  """Row uniforms of every decode step at once -> [steps, batch, 1]: step i's are
  ``jax.random.uniform(fold_in(rng, i), (batch, 1))``. Drawn before the decode loop, as one
  vectorised call: on CPU each threefry call is a small while loop of its own, two per step
  inside the loop (fold_in, uniform)."""
  draw = lambda i: jax.random.uniform(jax.random.fold_in(rng, i), (batch, 1))
  return jax.vmap(draw)(jnp.arange(steps))


def choose(logits_BxV, u_Bx1, cfg: SampleConfig):
  """One token per row from its uniform u_Bx1 (unused when greedy) -> (token_B int32,
  logprob_B float32)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if cfg.temperature == 0:
    tok = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logz = jax.nn.logsumexp(logits_BxV, axis=-1)
    return tok, jnp.take_along_axis(logits_BxV, tok[:, None], axis=-1)[:, 0] - logz
  return inverse_cdf_draw(u_Bx1, filter_logits(logits_BxV / cfg.temperature, cfg.top_k, cfg.top_p))


def left_align(tokens_BxP, lengths_B, pad_id=0):
  """Right-padded -> left-padded: returns (tokens_BxP, mask_BxP)."""
  p = tokens_BxP.shape[1]
  src = jnp.arange(p)[None, :] - (p - lengths_B[:, None])
  mask = src >= 0
  out = jnp.take_along_axis(tokens_BxP, jnp.clip(src, 0, p - 1), axis=1)
  return jnp.where(mask, out, pad_id), mask


_SEGMENT = 32  # decode steps per segment: each attends over only the cache slots filled by its end


def segments(max_new_tokens: int, every: int | None = None) -> tuple[tuple[int, int], ...]:
  """Decode steps 1..max_new_tokens-1 (step 0 samples from the prefill) as (start, stop) ranges
  cut at multiples of ``every`` (a last range shorter than every / 2 joins the one before);
  empty for one new token. ``every`` defaults to ``_SEGMENT``."""
  every = every or _SEGMENT
  cuts = [1] + list(range(every, max_new_tokens, every)) + [max_new_tokens]
  if len(cuts) > 2 and cuts[-1] - cuts[-2] < every // 2:
    del cuts[-2]
  return tuple((a, b) for a, b in zip(cuts, cuts[1:]) if a < b)


def _decode_loop(step_fn, first_logits_BxV, carry, rng, cfg: SampleConfig, grow=None):
  """Shared loop: choose from logits, feed the token back. step_fn(carry, tok, valid).

  The steps run as one ``lax.scan`` per ``segments(cfg.max_new_tokens)`` range; before the
  range (start, stop), ``grow(carry, stop)`` may enlarge the carry (a decoder's KV cache, to
  the slots that range fills), so early steps attend over fewer slots.
  """
  eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)
  b = first_logits_BxV.shape[0]
  u_NxBx1 = uniforms(rng, cfg.max_new_tokens, b)

  def emit(logits, done, i):
    tok, logp = choose(logits, u_NxBx1[i], cfg)
    valid = ~done
    tok = jnp.where(valid, tok, cfg.pad_id)
    done = done | (valid & jnp.isin(tok, eos))
    return tok, jnp.where(valid, logp, 0.0), valid, done

  tok0, lp0, v0, done0 = emit(first_logits_BxV, jnp.zeros((b,), bool), 0)

  def body(state, i):
    carry, tok, done = state
    logits, carry = step_fn(carry, tok, ~done)
    tok, logp, valid, done = emit(logits, done, i)
    return (carry, tok, done), (tok, logp, valid)

  toks, logps, mask = [tok0[None]], [lp0[None]], [v0[None]]
  state = (carry, tok0, done0)
  for start, stop in segments(cfg.max_new_tokens) if grow else ((1, cfg.max_new_tokens),):
    if grow:
      state = (grow(state[0], stop),) + state[1:]
    state, (t, lp, v) = jax.lax.scan(body, state, jnp.arange(start, stop))
    toks, logps, mask = toks + [t], logps + [lp], mask + [v]
  toks, logps, mask = (jnp.concatenate(x, 0).T for x in (toks, logps, mask))
  return Samples(toks, mask, mask.sum(1).astype(jnp.int32), logps)


def _sample_core(graphdef, state, prompt_BxP, lengths_B, rng, cfg: SampleConfig):
  model = with_dot_dtype(graphdef, state, cfg.dot_dtype)
  b, p = prompt_BxP.shape
  grow = None
  if base.is_encoder_decoder(model):
    enc_mask = jnp.arange(p)[None, :] < lengths_B[:, None]
    enc = model.encode(prompt_BxP, enc_mask)
    cache = model.init_cache(b, cfg.max_new_tokens)
    start = jnp.full((b, 1), model.cfg.decoder_start_id, jnp.int32)
    logits, cache = model.decode_with_cache(start, enc, enc_mask, cache)

    def step(cache, tok_B, valid_B):
      del valid_B  # decoder self-attention is causal; rows after EOS are masked outputs
      logits, cache = model.decode_with_cache(tok_B[:, None], enc, enc_mask, cache)
      return logits[:, -1], cache
  else:
    tokens, mask = left_align(prompt_BxP, lengths_B, cfg.pad_id)
    cache = model.init_cache(b, p)
    logits, cache = model.forward_with_cache(tokens, cache, mask_BxT=mask, last_only=True)

    def step(cache, tok_B, valid_B):
      logits, cache = model.forward_with_cache(tok_B[:, None], cache, mask_BxT=valid_B[:, None])
      return logits[:, -1], cache

    def grow(cache, stop):  # steps < stop write slots < p + stop - 1
      return _cache_pad(cache, p + stop - 1)

  return _decode_loop(step, logits[:, -1], cache, rng, cfg, grow)


_STATIC = ("graphdef", "cfg")
_sample = hostmem.Precompiled(jax.jit(_sample_core, static_argnames=_STATIC), _STATIC)


def check_prompts(model, prompt_tokens, prompt_lengths, max_new_tokens):
  """Shape and length checks on the host, before anything compiles."""
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must be [B, P], got shape {tuple(prompt_tokens.shape)}")
  b, p = prompt_tokens.shape
  if tuple(prompt_lengths.shape) != (b,):
    raise ValueError(f"prompt_lengths must be [B={b}], got shape {tuple(prompt_lengths.shape)}")
  if not isinstance(prompt_lengths, jax.core.Tracer):
    lens = np.asarray(prompt_lengths)
    if lens.min() < 1 or lens.max() > p:
      raise ValueError(
        f"prompt_lengths must be in [1, P={p}], got min {lens.min()} max {lens.max()}"
      )
  need = max_new_tokens if base.is_encoder_decoder(model) else p + max_new_tokens
  if need > base.context_len(model):
    what = "max_new_tokens" if base.is_encoder_decoder(model) else "prompt length + max_new_tokens"
    raise ValueError(
      f"{what} = {need} exceeds the model's context of {base.context_len(model)} "
      "tokens (cfg.max_seq_len / cfg.max_decode_len)"
    )


def sample(
  model,
  prompt_tokens,
  prompt_lengths,
  *,
  rng,
  max_new_tokens,
  temperature=1.0,
  top_k=0,
  top_p=1.0,
  eos_ids=None,
  pad_id=0,
  dot_dtype=None,
) -> Samples:
  """Samples ``max_new_tokens`` continuations for a batch of right-padded prompts.

  Args:
    model: a ``gkd_jax.models`` model (``base.DecoderLM`` or ``base.EncoderDecoderLM``),
      as an ``nnx.Module`` or a ``(graphdef, params)`` pair.
    prompt_tokens: ``[B, P]`` int, right-padded; prompt_lengths ``[B]`` int in [1, P].
    rng: a PRNG key; step i uses ``fold_in(rng, i)``.
    temperature: 0 = greedy; top_k 0 = off; top_p 1 = off.
    eos_ids: int or iterable of ints; None = never stop early.
    dot_dtype: None (the model's own numerics) or e.g. "bfloat16": sample from the
      model with every matmul's inputs rounded to bfloat16 and float32 accumulation (the
      weight matmuls, and attention's over a bf16 KV cache; softmax and sampling stay
      float32), as a TPU does by default; ~1.6x faster on CPUs with AVX512-BF16/AMX.
      Decoder-only models only.
  Returns: ``Samples`` (tokens, mask, lengths, logprobs), each ``[B, max_new_tokens]``
  (lengths ``[B]``).
  """
  if isinstance(eos_ids, (int, np.integer)):
    eos_ids = (int(eos_ids),)
  cfg = SampleConfig(
    max_new_tokens,
    float(temperature),
    top_k,
    float(top_p),
    tuple(int(e) for e in (eos_ids or ())),
    int(pad_id),
    dot_dtype,
  )
  graphdef, state, model = split(model)
  if dot_dtype is not None and not hasattr(model.cfg, "dot_dtype"):
    raise ValueError(
      f"dot_dtype={dot_dtype!r}: {type(model).__name__} has no dot_dtype policy; use dot_dtype=None"
    )
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  prompt_lengths_arr = jnp.asarray(prompt_lengths, jnp.int32)
  check_prompts(
    model,
    prompt_tokens,
    prompt_lengths if isinstance(prompt_lengths, jax.core.Tracer) else np.asarray(prompt_lengths),
    max_new_tokens,
  )
  return _sample(
    graphdef=graphdef,
    state=state,
    prompt_BxP=prompt_tokens,
    lengths_B=prompt_lengths_arr,
    rng=rng,
    cfg=cfg,
  )


# ----------------------------------------------------------------------------- beam search
class Beams(NamedTuple):
  """tokens ``[B, N]`` (pad after EOS), lengths ``[B]`` (EOS included), scores ``[B]``:
  the best hypothesis per row, score = sum of log-probs / length ** length_penalty."""

  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  beam_size: int
  max_new_tokens: int
  length_penalty: float = 1.0
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    if not isinstance(self.beam_size, (int, np.integer)) or self.beam_size < 1:
      raise ValueError(f"beam_size must be a positive int, got {self.beam_size!r}")
    SampleConfig(self.max_new_tokens)  # same checks


def _cache_take(cache, rows):
  """Reorders the batch rows of a model cache: k/v leaves with the batch axis at ndim - 4 (a
  decoder's [B,K,S,Dh] per layer, T5's stacked [L,B,S,H,Dkv]); kv_mask [B,S]."""
  out = dict(cache)
  for name in ("k", "v"):
    out[name] = jax.tree.map(lambda a: jnp.take(a, rows, axis=a.ndim - 4), cache[name])
  if "kv_mask" in cache:
    out["kv_mask"] = jnp.take(cache["kv_mask"], rows, axis=0)
  return out


def _cache_pad(cache, slots):
  """A decoder's KV cache with empty slots appended up to ``slots``: k/v leaves are
  [B,K,S,Dh], one per layer (slot axis = ndim - 2), kv_mask [B,S]."""
  pad = slots - cache["kv_mask"].shape[1]
  if pad <= 0:
    return cache
  pad_axis = lambda a, axis: jnp.pad(a, [(0, pad if d == axis else 0) for d in range(a.ndim)])
  out = dict(cache)
  for name in ("k", "v"):
    out[name] = jax.tree.map(lambda a: pad_axis(a, a.ndim - 2), cache[name])
  out["kv_mask"] = pad_axis(cache["kv_mask"], 1)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"))
def _beam(graphdef, state, prompt_BxP, lengths_B, cfg: BeamConfig):
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  k, n = cfg.beam_size, cfg.max_new_tokens
  rep = lambda x: jnp.repeat(x, k, axis=0)
  if base.is_encoder_decoder(model):
    enc_mask = rep(jnp.arange(p)[None, :] < lengths_B[:, None])
    enc = model.encode(rep(prompt_BxP), enc_mask)
    cache = model.init_cache(b * k, n + 1)
    start = jnp.full((b * k, 1), model.cfg.decoder_start_id, jnp.int32)
    logits, cache = model.decode_with_cache(start, enc, enc_mask, cache)
    step = lambda tok, cache: model.decode_with_cache(tok[:, None], enc, enc_mask, cache)
  else:
    tokens, mask = left_align(prompt_BxP, lengths_B, cfg.pad_id)
    cache = model.init_cache(b * k, p + n)
    logits, cache = model.forward_with_cache(rep(tokens), cache, mask_BxT=rep(mask), last_only=True)
    step = lambda tok, cache: model.forward_with_cache(tok[:, None], cache)
  eos = jnp.asarray(cfg.eos_ids or (-1,), jnp.int32)
  neg = jnp.float32(_NEG)
  alive_seq = jnp.full((b, k, n), cfg.pad_id, jnp.int32)
  alive_score = jnp.where(jnp.arange(k) == 0, 0.0, neg)[None].repeat(b, 0)  # one live beam
  fin_seq, fin_score = alive_seq, jnp.full((b, k), neg)

  def body(carry, i):
    logits, cache, alive_seq, alive_score, fin_seq, fin_score = carry
    v = logits.shape[-1]
    logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)).reshape(b, k, v)
    cand = (alive_score[:, :, None] + logp).reshape(b, k * v)
    score, idx = jax.lax.top_k(cand, 2 * k)
    parent, tok = idx // v, (idx % v).astype(jnp.int32)
    seq = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1).at[:, :, i].set(tok)
    ended = jnp.isin(tok, eos) | (i == n - 1)  # the last step finishes every beam
    norm = score / ((i + 1.0) ** cfg.length_penalty)
    all_seq = jnp.concatenate([fin_seq, seq], 1)
    all_score = jnp.concatenate([fin_score, jnp.where(ended, norm, neg)], 1)
    fin_score, top = jax.lax.top_k(all_score, k)
    fin_seq = jnp.take_along_axis(all_seq, top[:, :, None], axis=1)
    alive_score, top = jax.lax.top_k(jnp.where(ended, neg, score), k)
    alive_seq = jnp.take_along_axis(seq, top[:, :, None], axis=1)
    rows = (jnp.take_along_axis(parent, top, axis=1) + jnp.arange(b)[:, None] * k).reshape(-1)
    logits, cache = step(alive_seq[:, :, i].reshape(-1), _cache_take(cache, rows))
    return (logits, cache, alive_seq, alive_score, fin_seq, fin_score), None

  carry = (logits[:, -1:], cache, alive_seq, alive_score, fin_seq, fin_score)
  carry, _ = jax.lax.scan(body, carry, jnp.arange(n))
  best_seq, best_score = carry[4][:, 0], carry[5][:, 0]
  is_eos = jnp.isin(best_seq, eos)
  first = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1) + 1, n)
  keep = jnp.arange(n)[None] < first[:, None]
  return Beams(jnp.where(keep, best_seq, cfg.pad_id), first.astype(jnp.int32), best_score)


def beam_search(
  model,
  prompt_tokens,
  prompt_lengths,
  *,
  beam_size,
  max_new_tokens,
  length_penalty=1.0,
  eos_ids=None,
  pad_id=0,
) -> Beams:
  """Beam search (e.g. for translation eval) on the sampler's cache machinery.

  Keeps ``beam_size`` live and ``beam_size`` finished hypotheses per row; a
  hypothesis ends at an EOS or after ``max_new_tokens``; finished ones are ranked by
  sum(log p) / length ** length_penalty (Hugging Face's convention; length counts
  generated tokens, EOS included). Runs all ``max_new_tokens`` steps (static shapes).
  Prompts as in ``sample`` (right-padded). Returns ``Beams`` with the best hypothesis.
  """
  if isinstance(eos_ids, (int, np.integer)):
    eos_ids = (int(eos_ids),)
  cfg = BeamConfig(
    beam_size,
    max_new_tokens,
    float(length_penalty),
    tuple(int(e) for e in (eos_ids or ())),
    int(pad_id),
  )
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  graphdef, state, model = split(model)
  check_prompts(
    model,
    prompt_tokens,
    np.asarray(prompt_lengths),
    max_new_tokens + (1 if base.is_encoder_decoder(model) else 0),
  )
  return _beam(graphdef, state, prompt_tokens, jnp.asarray(prompt_lengths, jnp.int32), cfg)
