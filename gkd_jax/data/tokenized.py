"""Tokenized examples on disk, read with NumPy alone (no TensorFlow, no seqio).

A run with ``data.tokenized_dir`` writes the tokenized, filtered examples of each split it
loads through seqio to ``DIR/TASK-SPLIT-KEY.npz``, KEY a hash of every setting that decides
them (task, split, format, source, lengths, overlong, BOS, the tokenizer's fingerprint); a
later run with the same settings, on any machine, reads that file instead, so a host without
TensorFlow (an accelerator host with only JAX, a pod worker) gets the same batches bit for bit.

File layout (``np.load(..., allow_pickle=False)``): ``pad_id``; ``prompts`` / ``targets``
int32 token ids concatenated, with ``prompt_offsets`` / ``target_offsets`` [n + 1]; ``texts``:
the UTF-8 JSON list of [prompt_text, target_text, references] per example.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

FORMAT = 1


def tokenizer_fingerprint(tokenizer) -> str:
  """A gkd_jax Tokenizer's fingerprint, or the hash of a SentencePiece model file."""
  if isinstance(tokenizer, (str, os.PathLike)):
    with open(tokenizer, "rb") as f:
      return hashlib.sha256(f.read()).hexdigest()[:16]
  from gkd_jax.tokenizers import Tokenizer

  if not isinstance(tokenizer, Tokenizer):
    raise ValueError(
      f"data.tokenized_dir needs a gkd_jax Tokenizer or a SentencePiece model path, got a "
      f"{type(tokenizer).__name__}"
    )
  return tokenizer.fingerprint()


def path(directory: str, task_name: str, split: str, args: dict) -> str:
  """The file of these example settings (``pipeline.example_args``) under ``directory``."""
  doc = {k: v for k, v in args.items() if k not in ("tokenizer", "tokenized_dir")}
  doc.update(
    format=FORMAT, task=task_name, split=split, tokenizer=tokenizer_fingerprint(args["tokenizer"])
  )
  key = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:12]
  return os.path.join(directory, f"{task_name}-{split}-{key}.npz")


def write(file: str, pad_id: int, examples: list[dict]) -> None:
  """Writes examples (``pipeline.load_examples``' dicts) atomically."""
  os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
  offsets = lambda key: np.concatenate([[0], np.cumsum([len(e[key]) for e in examples])])
  texts = [[e["prompt_text"], e["target_text"], e["references"]] for e in examples]
  tmp = file + ".tmp.npz"
  np.savez(
    tmp,
    pad_id=np.int64(pad_id),
    prompts=np.concatenate([e["prompt"] for e in examples]).astype(np.int32),
    targets=np.concatenate([e["target"] for e in examples]).astype(np.int32),
    prompt_offsets=offsets("prompt").astype(np.int64),
    target_offsets=offsets("target").astype(np.int64),
    texts=np.frombuffer(json.dumps(texts, ensure_ascii=False).encode(), np.uint8),
  )
  os.replace(tmp, file)


def read(file: str) -> tuple[int, list[dict]]:
  """(pad id, examples) from a file ``write`` made; ValueError naming a broken file."""
  try:
    with np.load(file, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    texts = json.loads(arrays["texts"].tobytes().decode())
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"tokenized examples {file}: unreadable ({e}); delete it to rewrite") from None
  po, to = arrays["prompt_offsets"], arrays["target_offsets"]
  examples = [
    {
      "prompt": arrays["prompts"][po[i] : po[i + 1]],
      "target": arrays["targets"][to[i] : to[i + 1]],
      "prompt_text": texts[i][0],
      "target_text": texts[i][1],
      "references": texts[i][2],
    }
    for i in range(len(texts))
  ]
  return int(arrays["pad_id"]), examples
