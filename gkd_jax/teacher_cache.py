"""A top-k teacher-logit cache: written once, read by off-policy (dataset) steps instead of
running the teacher.

  python -m gkd_jax.teacher_cache --config=configs/NAME.py --out=DIR [--k=64]
      [--dtype=bfloat16] [--batch_size=8] [--config.KEY=VALUE ...]

For every example of the task's train split (in the data pipeline's order) and every target
token, the cache keeps the teacher's top-k token ids, their log-probabilities at
``gkd.loss_temperature`` and the log of the remaining mass (``gkd_jax.sparse``); the target
token is always among the kept ids (ATKD needs it). With ``teacher.sft.steps`` the teacher is
the fine-tuned one of the teacher-SFT stage (run or reused first, as the trainer does).

Layout (why not ArrayRecord: the reader must run with NumPy alone on hosts without
TensorFlow, and rows are looked up by example index, which plain .npy shards give directly):
  DIR/meta.json         k, dtype, temperature, teacher and tokenizer fingerprints, task, split,
                        the data settings, example count, shard size, the shards written
  DIR/shard-NNNNN.npz   examples [i0, i0 + shard size): offsets [n + 1] into the token axis,
                        targets, ids [tokens, k] int32, logp [tokens, k] (dtype), tail [tokens]
A shard is written to a temporary name and renamed when complete, so a killed writer resumes
at the first missing shard. A cache is read only by a config with the same k-independent
settings: another teacher, tokenizer, temperature, task, split or data setting is an error
naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from gkd_jax import files

FORMAT = 1
DTYPES = ("bfloat16", "float32")


def _digest(h, path, chunk=1 << 20):
  size = os.path.getsize(path)
  h.update(f"{os.path.basename(path)}:{size}".encode())
  with open(path, "rb") as f:
    h.update(f.read(chunk))
    if size > 2 * chunk:
      f.seek(size - chunk)
    h.update(f.read(chunk))


def teacher_fingerprint(path: str) -> str:
  """A hash of a model's files: config.json whole, each weight file's name, size, first and
  last MiB (cheap for GB-sized files, and any re-export or fine-tune changes it)."""
  from gkd_jax import models

  path = models.alias_path(path) if path in models.ALIASES else path
  h = hashlib.sha256()
  if os.path.isdir(path):
    names = sorted(
      f for f in os.listdir(path) if f == "config.json" or f.endswith((".safetensors", ".json"))
    )
    for f in names:
      _digest(h, os.path.join(path, f))
  else:
    _digest(h, path)
  return h.hexdigest()[:16]


def data_settings(c) -> dict:
  """The data settings a cache depends on (the example set and its token ids)."""
  d = c.data
  return {
    "task": d.task,
    "split": d.train_split,
    "prompt_format": d.prompt_format,
    "source": d.source,
    "paths": dict(d.paths),
    "max_prompt_len": d.max_prompt_len,
    "max_target_len": d.max_target_len,
    "overlong": d.overlong,
  }


def expected_meta(c, teacher_path, tokenizer) -> dict:
  """What a cache for config ``c`` must record (all but k, dtype and the shard list)."""
  return {
    "format": FORMAT,
    "temperature": float(c.gkd.loss_temperature),
    "teacher": teacher_fingerprint(teacher_path),
    "tokenizer": tokenizer.fingerprint(),
    "data": data_settings(c),
  }


def check_meta(meta: dict, want: dict, where: str) -> None:
  """ValueError naming the first field where a cache's metadata and a config disagree."""
  for key, value in want.items():
    if meta.get(key) != value:
      raise ValueError(
        f"teacher cache {where}: {key} is {meta.get(key)!r} in the cache but {value!r} for "
        "this config (another teacher, tokenizer, temperature or data setting); write a new "
        "cache or point teacher.cache elsewhere"
      )


def shard_path(out, i: int) -> str:
  return os.path.join(out, f"shard-{i:05d}.npz")


class Cache:
  """Reads a cache directory: ``rows(example_ids, length)`` -> padded arrays for a batch."""

  def __init__(self, path: str):
    self.path = path
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
      raise ValueError(
        f"teacher cache {path!r} has no meta.json (write it with python -m gkd_jax.teacher_cache)"
      )
    self.meta = files.read_json(meta_path)
    if not self.meta.get("complete"):
      raise ValueError(
        f"teacher cache {path!r} is incomplete ({len(self.meta.get('shards', []))}"
        " shards written): re-run python -m gkd_jax.teacher_cache to finish it"
      )
    self.k, self.shard_size = int(self.meta["k"]), int(self.meta["shard_size"])
    self._shards: dict[int, dict] = {}

  def _shard(self, i):
    if i not in self._shards:
      with np.load(shard_path(self.path, i)) as z:
        self._shards[i] = {k: z[k] for k in z.files}
    return self._shards[i]

  def example(self, e: int):
    """(targets [t], ids [t, k], logp [t, k] float32, tail [t] float32) of example e."""
    z = self._shard(e // self.shard_size)
    j = e % self.shard_size
    a, b = int(z["offsets"][j]), int(z["offsets"][j + 1])
    logp = z["logp"][a:b]
    if logp.dtype == np.uint16:  # bfloat16 stored as its bits
      logp = (logp.astype(np.uint32) << 16).view(np.float32)
    return z["targets"][a:b], z["ids"][a:b], logp.astype(np.float32), z["tail"][a:b]

  def rows(self, example_ids, targets_BxT):
    """Cache rows for a batch: ``teacher_ids [B, T, k]`` int32, ``teacher_logp``,
    ``teacher_tail`` float32; rows -1 (padding) and positions past an example's targets get
    a harmless filler (masked by the loss). The cached targets must equal the batch's."""
    b, t = targets_BxT.shape
    ids = np.broadcast_to(np.arange(self.k, dtype=np.int32), (b, t, self.k)).copy()
    logp = np.full((b, t, self.k), -np.log(self.k + 1.0), np.float32)
    tail = np.full((b, t), -np.log(self.k + 1.0), np.float32)
    for r, e in enumerate(np.asarray(example_ids)):
      if e < 0:
        continue
      tg, i, lp, tl = self.example(int(e))
      n = len(tg)
      if n > t or not np.array_equal(tg, targets_BxT[r, :n]):
        raise ValueError(
          f"teacher cache {self.path}: example {int(e)}'s targets differ from the data's "
          "(the cache was written for other data)"
        )
      ids[r, :n], logp[r, :n], tail[r, :n] = i, lp, tl
    return {"teacher_ids": ids, "teacher_logp": logp, "teacher_tail": tail}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 bits (round to nearest even) as uint16 (npz has no bfloat16)."""
  u = x.astype(np.float32).view(np.uint32)
  return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write(
  c,
  out: str,
  *,
  k: int,
  dtype: str = "bfloat16",
  batch_size: int = 8,
  shard_size: int = 256,
  teacher_path: str | None = None,
  progress=True,
) -> dict:
  """Writes (or finishes) the cache of config ``c`` in ``out`` -> its meta."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gkd_jax import config as config_lib
  from gkd_jax import data, models, observe, sparse, steps, train
  from gkd_jax.data import batching
  from gkd_jax.models import base, students

  if dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype!r}: one of {DTYPES}")
  if not (isinstance(k, int) and k >= 1):
    raise ValueError(f"--k={k!r}: a positive int")
  os.makedirs(out, exist_ok=True)
  if teacher_path is None:
    teacher_path = train.prepare_teacher(c, out)[0] or c.teacher.path
  teacher, tok = models.load(teacher_path, dtype=c.teacher.dtype, param_dtype=c.teacher.param_dtype)
  c = config_lib.resolve_dot_dtypes(c, base.is_encoder_decoder(teacher))
  teacher = students.frozen_teacher(teacher, c.teacher)
  if tok is None:
    raise ValueError(f"teacher {teacher_path!r} has no tokenizer files")
  if k > teacher.cfg.vocab_size:
    raise ValueError(f"--k={k} exceeds the teacher's vocabulary ({teacher.cfg.vocab_size})")
  encdec = base.is_encoder_decoder(teacher)
  ex = data.load_examples(
    c.data.task, c.data.train_split, **data.config_kwargs(c.data, tok, encdec)
  )
  meta = {
    **expected_meta(c, teacher_path, tok),
    "k": k,
    "dtype": dtype,
    "shard_size": shard_size,
    "num_examples": len(ex),
  }
  meta_path = os.path.join(out, "meta.json")
  if os.path.isfile(meta_path):
    have = files.read_json(meta_path)
    check_meta(have, {kk: v for kk, v in meta.items() if kk != "shards"}, out)
  n_tokens = sum(len(e["target"]) for e in ex)
  per_token = k * (4 + (2 if dtype == "bfloat16" else 4)) + 4 + 4
  print(
    f"teacher cache {out}: {len(ex)} examples, {n_tokens} target tokens, k={k} {dtype}: "
    f"about {n_tokens * per_token / 2**20:.1f} MiB",
    flush=True,
  )
  n_shards = -(-len(ex) // shard_size)
  done = [i for i in range(n_shards) if os.path.isfile(shard_path(out, i))]
  meta["shards"], meta["complete"] = done, False
  files.write_json(meta_path, meta)
  graphdef, params = nnx.split(teacher)

  @jax.jit
  def top(params, view):
    head = steps.hidden_and_head(nnx.merge(graphdef, params), view)
    return sparse.top_k(
      steps.logits(*head), k, temperature=c.gkd.loss_temperature, always=view["targets"]
    )

  bar = observe.Progress(n_shards, start_step=len(done), enabled=progress) if n_shards else None
  for i in range(n_shards):
    if i in done:
      continue
    rows = ex[i * shard_size : (i + 1) * shard_size]
    parts = {"targets": [], "ids": [], "logp": [], "tail": []}
    for j in range(0, len(rows), batch_size):
      chunk = rows[j : j + batch_size]
      chunk = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape: one compile
      t_len = c.data.max_target_len
      maker = batching.encdec_batch if encdec else batching.decoder_batch
      b = maker(
        [e["prompt"] for e in chunk],
        [e["target"] for e in chunk],
        pad_id=tok.pad_id,
        prompt_len=c.data.max_prompt_len,
        target_len=t_len,
      )
      view = steps.batch_view({kk: jnp.asarray(v) for kk, v in b.items()}, encdec, tok.pad_id)
      ids, logp, tail = (np.asarray(x) for x in top(params, view))
      for r, e in enumerate(rows[j : j + batch_size]):
        n = len(e["target"])
        parts["targets"].append(np.asarray(e["target"], np.int32))
        parts["ids"].append(ids[r, :n])
        parts["logp"].append(logp[r, :n])
        parts["tail"].append(tail[r, :n].astype(np.float32))
    lengths = [len(t) for t in parts["targets"]]
    arrays = {kk: np.concatenate(v) for kk, v in parts.items()}
    if dtype == "bfloat16":
      arrays["logp"] = _bf16_bits(arrays["logp"])
    arrays["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tmp = shard_path(out, i) + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, shard_path(out, i))
    meta["shards"].append(i)
    files.write_json(meta_path, meta)
    if bar is not None:
      bar.update(i + 1)
  if bar is not None:
    bar.close()
  meta["complete"] = True
  files.write_json(meta_path, meta)
  return meta


def main(argv=None):
  import argparse
  import sys

  from gkd_jax import main as cli

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--k", type=int, default=64)
  ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--shard_size", type=int, default=256)
  a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
  try:
    c = cli.load_config(a.config, rest)
    meta = write(c, a.out, k=a.k, dtype=a.dtype, batch_size=a.batch_size, shard_size=a.shard_size)
  except ValueError as e:
    print(f"gkd_jax.teacher_cache: error: {cli.one_line(e)}", file=sys.stderr)
    return 1
  print(json.dumps({k: meta[k] for k in ("k", "dtype", "num_examples", "complete")}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
