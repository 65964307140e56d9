"""Tokenized examples written once through seqio give, read back in a process where TensorFlow
and seqio cannot be imported, the same batches bit for bit."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np

from gkd_jax import models
from gkd_jax.data import pipeline
from gkd_jax.tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = {"model_kind": "decoder", "prompt_format": "chat", "source": "local", "max_prompt_len": 64,
      "max_target_len": 16, "max_examples": 40}
NO_TF = """
import sys, json
for name in ("tensorflow", "seqio", "tensorflow_datasets"):
  sys.modules[name] = None  # any import of them fails
import gguf, numpy as np
from gkd_jax import models
from gkd_jax.data import pipeline
from gkd_jax.tokenizers import Tokenizer
tok = Tokenizer.from_gguf_metadata(gguf.GGUFReader(models.alias_path("smollm2-135m-instruct")))
kw = json.loads(sys.argv[1])
try:
  it = pipeline.get_dataset("xsum", "train", tokenizer=tok, batch_size=8, seed=3, num_epochs=1, **kw)
  batches = list(it)
except ValueError as e:
  print("ERROR", e)
  sys.exit(3)
np.savez(sys.argv[2], **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
assert "tensorflow" not in [m for m in sys.modules if sys.modules[m] is not None]
"""


def _tokenizer():
  return Tokenizer.from_gguf_metadata(gguf.GGUFReader(models.alias_path("smollm2-135m-instruct")))


def _no_tf(tmp_path, kw):
  out = tmp_path / "batches.npz"
  p = subprocess.run([sys.executable, "-c", NO_TF, json.dumps(kw), str(out)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return p, out


def test_numpy_only_batches_equal_the_seqio_ones(tmp_path):
  d = str(tmp_path / "tok")
  tok = _tokenizer()
  want = list(pipeline.get_dataset("xsum", "train", tokenizer=tok, batch_size=8, seed=3,
                                   num_epochs=1, tokenized_dir=d, **KW))
  files = os.listdir(d)
  assert len(files) == 1 and files[0].startswith("xsum-train-") and files[0].endswith(".npz")
  p, out = _no_tf(tmp_path, {**KW, "tokenized_dir": d})
  assert p.returncode == 0, p.stdout + p.stderr
  got = np.load(out)
  assert len({k.split("/")[0] for k in got.files}) == len(want) == 5
  for i, b in enumerate(want):
    for k, v in b.items():
      np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} {k}")
      assert got[f"{i}/{k}"].dtype == v.dtype
  # the examples' texts too, in this process (the file is read, seqio is not asked)
  a = pipeline.load_examples("xsum", "train", tokenizer=tok, **KW)
  b = pipeline.load_examples("xsum", "train", tokenizer=tok, tokenized_dir=d, **KW)
  assert [(e["prompt_text"], e["references"]) for e in a] == \
      [(e["prompt_text"], e["references"]) for e in b]


def test_missing_tokenized_file_without_seqio_names_it(tmp_path):
  d = str(tmp_path / "empty")
  p, _ = _no_tf(tmp_path, {**KW, "tokenized_dir": d})
  assert p.returncode == 3 and "no tokenized examples for these settings at" in p.stdout, \
      p.stdout + p.stderr
  assert d in p.stdout and "seqio" in p.stdout
