"""The trainer's entry points: `get_dataset` (training batches) and `get_eval_examples` (prompts +
references for decoding-based evaluation).

A split is read once through its seqio Task (gkd_jax.data.seqio_tasks), tokenized, filtered (empty
targets dropped; over-long examples truncated or dropped per `overlong`, both counted in a log line)
and kept in host memory. Training batches are then drawn in NumPy:

  * order: epoch e visits the examples in `np.random.default_rng([seed, e]).permutation(n)`
    (`shuffle=False`: file order); epochs follow each other without gaps;
  * global step k takes stream positions [k*G, (k+1)*G), G = batch_size * num_shards, and host
    `shard_index` keeps rows [shard_index*batch_size, (shard_index+1)*batch_size) of them;
  * shapes: prompt / target lengths are each rounded up to the smallest bucket (bucket_lengths of
    the configured max, `num_buckets` sizes) that fits the longest in the *global* batch, so all hosts
    agree on shapes and jit sees at most num_buckets**2 shapes;
  * resume: `start_step=k` yields exactly batches k, k+1, ... of an uninterrupted run (O(1) seek).

Every host reads and tokenizes the whole split (it needs every length to agree on bucket shapes).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys

import numpy as np

from gkd_jax.data import batching, tasks, tokenized

log = logging.getLogger("gkd_jax.data")
_CACHE: dict = {}


def _default_shards(shard_index, num_shards):
  """jax.process_index()/process_count() if jax is already imported, else a single shard."""
  if shard_index is None or num_shards is None:
    jax = sys.modules.get("jax")
    idx, count = (jax.process_index(), jax.process_count()) if jax is not None else (0, 1)
    shard_index = idx if shard_index is None else shard_index
    num_shards = count if num_shards is None else num_shards
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"shard_index={shard_index} is not in [0, num_shards={num_shards})")
  return shard_index, num_shards


def _text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


_FIELDS = ("inputs", "targets", "inputs_pretokenized", "targets_pretokenized", "references")


def _examples(ds, batch_size=1024):
  """Examples of a seqio dataset as dicts of Python lists / bytes, read 1024 at a time."""
  ds = ds.map(lambda ex: {k: ex[k] for k in _FIELDS}).ragged_batch(batch_size)
  for batch in ds.as_numpy_iterator():
    # ragged columns arrive as object arrays of per-row arrays
    cols = {
      k: [r.tolist() if isinstance(r, np.ndarray) else r for r in v] for k, v in batch.items()
    }
    yield from (dict(zip(cols, row)) for row in zip(*cols.values()))


_TASK_ARGS = (
  "tokenizer",
  "model_kind",
  "prompt_format",
  "source",
  "data_dir",
  "paths",
  "tfds_name",
  "tfds_data_dir",
)


def _load(task_name, split, args):
  """(pad id, examples) for ``example_args`` ``args``: from the tokenized file of these
  settings under ``args["tokenized_dir"]`` when there is one (NumPy only), else through seqio
  (then written there, when a tokenized_dir is given)."""
  d = args["tokenized_dir"]
  path = tokenized.path(d, task_name, split, args) if d else None
  if path and os.path.isfile(path):
    return tokenized.read(path)
  try:
    vocab, out = _load_seqio(task_name, split, args)
  except ImportError as e:
    if path is None:
      raise
    raise ValueError(
      f"{task_name}/{split}: no tokenized examples for these settings at {path}, and seqio/"
      f"TensorFlow cannot load here ({e}); write them with any run of the same data settings "
      "on a machine with seqio"
    ) from None
  if path:
    tokenized.write(path, vocab.pad_id, out)
  return vocab.pad_id, out


def _load_seqio(task_name, split, args):
  """(vocabulary, examples) through seqio; the task arguments go to seqio_tasks.get_task."""
  task_kwargs = {k: args[k] for k in _TASK_ARGS}
  max_prompt_len, max_target_len = args["max_prompt_len"], args["max_target_len"]
  overlong, add_bos, max_examples = args["overlong"], args["add_bos"], args["max_examples"]
  spec = tasks.get_spec(task_name)  # unknown names fail here, before TensorFlow loads
  if overlong not in batching.OVERLONG:
    raise ValueError(f"overlong={overlong!r}; expected one of {list(batching.OVERLONG)}")
  from gkd_jax.data import seqio_tasks  # seqio + TensorFlow

  task = seqio_tasks.get_task(task_name, **task_kwargs)
  vocab = task.output_features["targets"].vocabulary
  key = (task.name, split, max_prompt_len, max_target_len, overlong, add_bos, max_examples)
  if key in _CACHE:
    return vocab, _CACHE[key]
  if add_bos and vocab.bos_id is None:
    raise ValueError("add_bos=True but the vocabulary has no BOS id")
  prefix, suffix = tasks.prompt_parts(
    spec, task_kwargs.get("prompt_format", "t5"), getattr(vocab, "tokenizer", None)
  )
  prompt_tail = list(vocab.encode(suffix)) if suffix else []
  if task_kwargs.get("model_kind") == "encdec":
    prompt_tail.append(vocab.eos_id)

  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  if max_examples is not None:
    ds = ds.take(max_examples)
  out, empty, truncated, dropped = [], 0, 0, 0
  for ex in _examples(ds):
    target_text = _text(ex["targets_pretokenized"])
    if not target_text.strip():
      empty += 1
      continue
    prompt = ([vocab.bos_id] if add_bos else []) + ex["inputs"]
    target = ex["targets"]
    if len(prompt) > max_prompt_len or len(target) > max_target_len:
      if overlong == "drop":
        dropped += 1
        continue
      truncated += 1
      prompt = batching.truncate(prompt, max_prompt_len, prompt_tail)
      target = batching.truncate(target, max_target_len, [vocab.eos_id])
    out.append(
      {
        "prompt": np.asarray(prompt, np.int32),
        "target": np.asarray(target, np.int32),
        "prompt_text": _text(ex["inputs_pretokenized"]),
        "target_text": target_text,
        "references": [_text(r) for r in ex["references"]],
      }
    )
  log.info(
    "%s/%s (%s): %d examples; filtered %d with empty targets; over-long (prompt > %d or "
    "target > %d tokens): %d %s",
    task_name,
    split,
    task.name,
    len(out),
    empty,
    max_prompt_len,
    max_target_len,
    truncated if overlong == "truncate" else dropped,
    "truncated" if overlong == "truncate" else "dropped",
  )
  if not out:
    raise ValueError(f"{task_name}/{split}: no examples left after filtering")
  _CACHE[key] = out
  return vocab, out


def load_examples(
  task_name,
  split,
  *,
  tokenizer,
  model_kind="decoder",
  prompt_format="t5",
  source=None,
  data_dir=None,
  paths=None,
  tfds_name=None,
  tfds_data_dir=None,
  max_prompt_len=512,
  max_target_len=256,
  overlong="truncate",
  add_bos=False,
  max_examples=None,
  tokenized_dir=None,
) -> list[dict]:
  """The split's examples after filtering: [{"prompt": int32 [p], "target": int32 [t], "prompt_text",
  "target_text", "references": [str]}] in source order. Cached per configuration in this process.

  Prompts hold at most max_prompt_len ids (BOS first if add_bos), targets at most max_target_len
  (EOS last). overlong="truncate" keeps a prompt's head plus its format tail (the chat generation
  prompt / T5 EOS) and a target's head plus EOS; "drop" drops the example.
  tokenized_dir: a directory of tokenized example files (gkd_jax.data.tokenized): read with
  NumPy alone when it holds these settings' file, else written there after seqio made them.
  """
  return _load(task_name, split, example_args(locals()))[1]


def example_args(kw) -> dict:
  """``kw`` completed with ``load_examples``' defaults: its signature is the one home of the
  examples' arguments (unknown ones raise TypeError naming them)."""
  kw = {k: v for k, v in kw.items() if k not in ("task_name", "split")}
  bound = inspect.signature(load_examples).bind("", "", **kw)
  bound.apply_defaults()
  return {k: v for k, v in bound.arguments.items() if k not in ("task_name", "split")}


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def stream_indices(n, start, count, seed, shuffle=True) -> np.ndarray:
  """Example indices at positions [start, start + count) of the epoch-after-epoch stream."""
  out, pos = [], start
  while len(out) < count:
    epoch, offset = divmod(pos, n)
    take = epoch_order(n, epoch, seed, shuffle)[offset : offset + count - len(out)]
    out.extend(take.tolist())
    pos += len(take)
  return np.asarray(out, np.int64)


def get_dataset(
  task_name,
  split="train",
  *,
  batch_size=8,
  seed=0,
  shuffle=True,
  num_epochs=None,
  shard_index=None,
  num_shards=None,
  start_step=0,
  num_buckets=3,
  bucket_ratio=2.0,
  decoder_start_id=0,
  drop_remainder=True,
  **example_kw,
):
  """Iterator of numpy int32 batches (dict layout in gkd_jax.data.batching) for this host.

  task_name: one of gkd_jax.data.tasks.TASKS ("xsum", "scitldr", "translate_en_de", "gsm8k", "instruct").
  example_kw: the examples' arguments, as ``load_examples`` takes them (tokenizer, model_kind,
  prompt_format, source, data_dir, paths, max_prompt_len, max_target_len, overlong, ...).
  batch_size: rows per host; num_epochs: None = repeat forever; drop_remainder=False pads the last
  batch with empty rows. shard_index/num_shards default to jax.process_index()/process_count() when
  jax is already imported, else 0/1. start_step: first global step to yield. num_buckets,
  bucket_ratio: the padded lengths (``batching.bucket_lengths``).
  """
  shard_index, num_shards = _default_shards(shard_index, num_shards)
  ex = example_args(example_kw)
  pad_id, examples = _load(task_name, split, ex)
  return _batches(
    examples,
    pad_id=pad_id,
    model_kind=ex["model_kind"],
    batch_size=batch_size,
    seed=seed,
    shuffle=shuffle,
    num_epochs=num_epochs,
    shard_index=shard_index,
    num_shards=num_shards,
    start_step=start_step,
    prompt_buckets=batching.bucket_lengths(ex["max_prompt_len"], num_buckets, ratio=bucket_ratio),
    target_buckets=batching.bucket_lengths(ex["max_target_len"], num_buckets, ratio=bucket_ratio),
    decoder_start_id=decoder_start_id,
    drop_remainder=drop_remainder,
  )


def _batches(
  examples,
  *,
  pad_id,
  model_kind,
  batch_size,
  seed,
  shuffle,
  num_epochs,
  shard_index,
  num_shards,
  start_step,
  prompt_buckets,
  target_buckets,
  decoder_start_id,
  drop_remainder,
):
  n = len(examples)
  global_batch = batch_size * num_shards
  prompt_lens = np.asarray([len(e["prompt"]) for e in examples])
  target_lens = np.asarray([len(e["target"]) for e in examples])
  total = None if num_epochs is None else n * num_epochs
  step = start_step
  while True:
    start = step * global_batch
    if total is not None and (start >= total or (drop_remainder and start + global_batch > total)):
      return
    count = global_batch if total is None else min(global_batch, total - start)
    idx = stream_indices(n, start, count, seed, shuffle)
    prompt_len = batching.pick_bucket(int(prompt_lens[idx].max()), prompt_buckets)
    target_len = batching.pick_bucket(int(target_lens[idx].max()), target_buckets)
    mine = idx[shard_index * batch_size : (shard_index + 1) * batch_size]
    rows = [examples[i] for i in mine]
    empty = [np.zeros(0, np.int32)] * (batch_size - len(rows))
    prompts = [e["prompt"] for e in rows] + empty
    targets = [e["target"] for e in rows] + empty
    if model_kind == "encdec":
      batch = batching.encdec_batch(
        prompts,
        targets,
        pad_id=pad_id,
        prompt_len=prompt_len,
        target_len=target_len,
        decoder_start_id=decoder_start_id,
      )
    else:
      batch = batching.decoder_batch(
        prompts, targets, pad_id=pad_id, prompt_len=prompt_len, target_len=target_len
      )
    batch["example_ids"] = np.concatenate([mine, np.full(len(empty), -1)]).astype(np.int32)
    yield batch
    step += 1


def get_eval_examples(task_name, split, **example_kw) -> list[dict]:
  """[{"prompt_tokens": int32 [p], "prompt_text": str, "reference": str, "references": [str]}] in source
  order, for decoding then scoring with `gkd_jax.data.evaluate(task_name, references, predictions)`.
  "reference" is the training target (the first reference). example_kw as ``load_examples``."""
  examples = load_examples(task_name, split, **example_kw)
  return [
    {
      "prompt_tokens": e["prompt"],
      "prompt_text": e["prompt_text"],
      "reference": e["target_text"],
      "references": e["references"],
    }
    for e in examples
  ]
