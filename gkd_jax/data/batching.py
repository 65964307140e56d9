"""Tokenized (prompt, target) pairs -> fixed-shape numpy int32 batches. NumPy only.

Decoder-only batch (P, T are bucketed prompt/target lengths, L = P + T):
  tokens          [B, L]  prompt + target (target ends with EOS), right-padded with pad_id
  positions       [B, L]  0..L-1 (every row starts at position 0)
  prompt_mask     [B, L]  1 on prompt tokens
  target_mask     [B, L]  1 on target tokens, EOS included. The logit predicting tokens[:, t] is
                          logits[:, t-1]: loss over logits[:, :-1] vs tokens[:, 1:] with target_mask[:, 1:]
  prompt_tokens   [B, P]  prompt alone, right-padded (input of the on-policy sampler)
  prompt_lengths  [B]
  target_tokens   [B, T]  target alone (EOS included), right-padded
  target_lengths  [B]
Encoder-decoder batch (S = bucketed input length, T = bucketed target length):
  encoder_tokens  [B, S]  input (T5: ends with EOS), right-padded;  encoder_mask [B, S]
  decoder_tokens  [B, T]  targets shifted right, starting with decoder_start_id (0 for T5)
  decoder_targets [B, T]  targets (EOS included), right-padded;     decoder_mask [B, T]
  prompt_tokens   [B, S]  = encoder_tokens;  prompt_lengths [B];  target_lengths [B]
Rows past the end of the data (a last partial batch) are all padding with zero masks and lengths.
The pipeline's batches also hold example_ids [B] int32: each row's index among the split's
examples (load_examples' order), -1 on padding rows (a teacher cache is looked up by it).
"""

from __future__ import annotations

import math

import numpy as np

OVERLONG = ("truncate", "drop")


def bucket_lengths(
  max_len: int, num_buckets: int = 3, multiple: int = 8, ratio: float = 2.0
) -> list[int]:
  """Ascending lengths max_len / ratio**i rounded up to `multiple` (capped at max_len),
  i < num_buckets: ratio 2 halves, a ratio nearer 1 packs the buckets below max_len closer."""
  if max_len < 1 or num_buckets < 1:
    raise ValueError(f"max_len={max_len} and num_buckets={num_buckets} must be >= 1")
  if not ratio > 1:
    raise ValueError(f"bucket ratio must be > 1, got {ratio!r}")
  sizes = {
    min(max_len, max(multiple, -(-math.ceil(max_len / ratio**i) // multiple) * multiple))
    for i in range(num_buckets)
  }
  return sorted(sizes | {max_len})


def pick_bucket(n: int, buckets) -> int:
  """The smallest bucket >= n."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def truncate(ids, max_len: int, tail=()):
  """Keep the head of `ids` and its fixed `tail` (EOS, or the chat generation prompt) in max_len ids."""
  ids, tail = list(ids), list(tail)
  if len(ids) <= max_len:
    return ids
  if tail and ids[-len(tail) :] == tail:
    ids = ids[: -len(tail)]
  keep = max(max_len - len(tail), 0)
  return (ids[:keep] + tail)[:max_len]


def right_pad(rows, length, pad_id):
  """Lists of ids -> int32 ``[len(rows), length]``, each row right-padded with pad_id."""
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, : len(r)] = r
  return out


def row_lengths(rows):
  """int32 ``[len(rows)]``: the length of each list of ids."""
  return np.asarray([len(r) for r in rows], np.int32)


def decoder_batch(prompts, targets, *, pad_id: int, prompt_len: int, target_len: int) -> dict:
  """Decoder-only batch from lists of prompt / target id sequences (see the module docstring)."""
  p_len, t_len = row_lengths(prompts), row_lengths(targets)
  seq = [list(p) + list(t) for p, t in zip(prompts, targets)]
  total = prompt_len + target_len
  cols = np.arange(total, dtype=np.int32)[None, :]
  return {
    "tokens": right_pad(seq, total, pad_id),
    "positions": np.broadcast_to(cols, (len(seq), total)).copy(),
    "prompt_mask": (cols < p_len[:, None]).astype(np.int32),
    "target_mask": ((cols >= p_len[:, None]) & (cols < (p_len + t_len)[:, None])).astype(np.int32),
    "prompt_tokens": right_pad(prompts, prompt_len, pad_id),
    "prompt_lengths": p_len,
    "target_tokens": right_pad(targets, target_len, pad_id),
    "target_lengths": t_len,
  }


def encdec_batch(
  prompts, targets, *, pad_id: int, prompt_len: int, target_len: int, decoder_start_id: int = 0
) -> dict:
  """Encoder-decoder batch (see the module docstring)."""
  p_len, t_len = row_lengths(prompts), row_lengths(targets)
  enc = right_pad(prompts, prompt_len, pad_id)
  dec_targets = right_pad(targets, target_len, pad_id)
  dec_in = np.full_like(dec_targets, pad_id)
  dec_in[:, 1:] = dec_targets[:, :-1]
  dec_in[:, 0] = decoder_start_id
  dec_in[t_len == 0, 0] = pad_id  # padding rows stay padding
  s_cols = np.arange(prompt_len)[None, :]
  t_cols = np.arange(target_len)[None, :]
  return {
    "encoder_tokens": enc,
    "encoder_mask": (s_cols < p_len[:, None]).astype(np.int32),
    "decoder_tokens": dec_in,
    "decoder_targets": dec_targets,
    "decoder_mask": (t_cols < t_len[:, None]).astype(np.int32),
    "prompt_tokens": enc.copy(),
    "prompt_lengths": p_len,
    "target_lengths": t_len,
  }
