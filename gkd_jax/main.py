"""Command line: ``python -m gkd_jax.main --config=configs/NAME.py[:arg] --workdir=DIR``.

Overrides: ``--config.gkd.lmbda=0.5`` (ml_collections), or gin syntax on the same
keys: ``--gin_bindings='gkd.lmbda = 0.5'`` / ``--gin_file=overrides.gin``. Gin
overrides apply after the ``--config.*`` ones.
"""

from __future__ import annotations

import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (data only) stays quiet

from absl import app, flags
from ml_collections import config_flags

from gkd_jax import config as config_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=False)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples, export.")
flags.DEFINE_multi_string("gin_file", [], "Gin files of 'section.key = value' overrides.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings 'section.key = value'.")
FLAGS = flags.FLAGS


def gin_overrides(texts):
  """[(dotted_key, value)] from gin-syntax texts (no references, macros or imports)."""
  from gin import config_parser as cp

  class Delegate(cp.ParserDelegate):
    def configurable_reference(self, scoped_name, evaluate):
      raise ValueError(f"gin override: references (@{scoped_name}) are not supported")

    def macro(self, macro_name):
      raise ValueError(f"gin override: macros (%{macro_name}) are not supported")

  out = []
  for text in texts:
    for st in cp.ConfigParser(text, Delegate()):
      if not isinstance(st, cp.BindingStatement) or st.scope:
        raise ValueError(f"gin override {text!r}: only plain 'section.key = value' bindings")
      out.append((f"{st.selector}.{st.arg_name}", st.value))
  return out


def apply_overrides(config, pairs):
  return config_lib.set_keys(config, pairs, source="gin override")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter
  texts = list(FLAGS.gin_bindings)
  for path in FLAGS.gin_file:
    if not os.path.isfile(path):
      raise app.UsageError(f"--gin_file {path!r} does not exist")
    with open(path) as f:
      texts.append(f.read())
  try:
    config = apply_overrides(FLAGS.config, gin_overrides(texts))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  from gkd_jax import train
  summary = train.run(config, FLAGS.workdir)
  print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2, default=str))
  print(report(summary))
  return 0 if summary["status"] in ("done", "preempted") else 1


def report(summary) -> str:
  """A small before/after table of the eval metrics and a few samples."""
  ev = dict(summary.get("eval", {}))
  if (summary.get("teacher_sft") or {}).get("zero_shot"):
    ev["teacher_zero_shot"] = summary["teacher_sft"]["zero_shot"]
  rows = [(name, ev[key]) for key, name in (
      ("teacher_zero_shot", "teacher before its SFT"), ("teacher", "teacher"),
      ("before", "student before"), ("after_sft_warmup", "student after SFT warm-up"),
      ("after", "student after")) if key in ev]
  if not rows:
    return ""
  keys = [k for k in rows[-1][1] if k != "decode_s"]
  primary = summary.get("primary_metric")
  lines = [f"{'':<28}" + "".join(f"{(k + '*') if k == primary else k:>12}" for k in keys)]
  for name, m in rows:
    lines.append(f"{name:<28}" + "".join(f"{m[k]:>12.3f}" if k in m else f"{'-':>12}"
                                         for k in keys))
  if primary:
    lines.append(f"(* the task's primary metric; summary: {summary['workdir']}/summary.json)")
  for s in summary.get("samples", [])[:3]:
    lines += ["", "reference: " + s["reference"].strip(), "student:   " + s["student"].strip()]
  return "\n".join(lines)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
