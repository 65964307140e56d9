"""seqio vocabularies over gkd_jax tokenizers (imports seqio and TensorFlow).

`TokenizerVocabulary` wraps a `gkd_jax.tokenizers.Tokenizer` (HF byte-level BPE or SentencePiece):
`encode_tf` runs the tokenizer through `tf.numpy_function` (a whole batch of strings per call when given
a vector), so seqio tokenization gives exactly `Tokenizer.encode(text)`. For T5 SentencePiece models `seqio.SentencePieceVocabulary(path)`
(TF-native ops) gives the same ids; `make_vocabulary` accepts either.
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf


class TokenizerVocabulary(seqio.Vocabulary):
  """A seqio.Vocabulary whose ids are the tokenizer's; pad/eos/bos/unk are the tokenizer's too."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    super().__init__(extra_ids=0)

  @property
  def bos_id(self):
    return self.tokenizer.bos_id

  @property
  def eos_id(self):
    return self.tokenizer.eos_id

  @property
  def pad_id(self):
    return self.tokenizer.pad_id

  @property
  def unk_id(self):
    return self.tokenizer.unk_id

  @property
  def _base_vocab_size(self):
    return self.tokenizer.vocab_size

  def _encode(self, s):
    return self.tokenizer.encode(s)

  def _decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids])

  def _encode_batch_np(self, texts):
    ids = self.tokenizer.encode_batch([t.decode("utf-8") for t in texts])
    flat = np.fromiter((i for row in ids for i in row), np.int32)
    return flat, np.asarray([len(row) for row in ids], np.int64)

  def _encode_tf(self, s):
    """tf.string [] -> int32 [n], or [b] -> int32 RaggedTensor [b, None] (one encode_batch call)."""
    s = tf.convert_to_tensor(s, tf.string)
    flat, lengths = tf.numpy_function(
      self._encode_batch_np, [tf.reshape(s, [-1])], [tf.int32, tf.int64], stateful=False
    )
    flat.set_shape([None])
    if s.shape.rank == 0:
      return flat
    lengths.set_shape([None])
    return tf.RaggedTensor.from_row_lengths(flat, lengths)

  def _decode_np(self, ids):
    flat = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 0)
    texts = [self.tokenizer.decode([int(i) for i in row]).encode("utf-8") for row in flat]
    return np.asarray(texts, dtype=object).reshape(ids.shape[:-1])

  def _decode_tf(self, ids):
    """int32 [..., n] -> tf.string [...] (special tokens, pad included, skipped)."""
    text = tf.numpy_function(self._decode_np, [ids], tf.string, stateful=False)
    text.set_shape(ids.shape[:-1])
    return text

  def __eq__(self, other):
    return isinstance(other, TokenizerVocabulary) and other.tokenizer is self.tokenizer

  def __hash__(self):
    return id(self.tokenizer)

  def __str__(self):
    return f"TokenizerVocabulary(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def make_vocabulary(tokenizer) -> seqio.Vocabulary:
  """A seqio.Vocabulary from a gkd_jax Tokenizer, a SentencePiece `.model` path, or a Vocabulary."""
  if isinstance(tokenizer, seqio.Vocabulary):
    return tokenizer
  if isinstance(tokenizer, str):
    return seqio.SentencePieceVocabulary(tokenizer)
  return TokenizerVocabulary(tokenizer)
