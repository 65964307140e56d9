"""Command line: ``python -m gkd_jax.main --config=configs/NAME.py[:arg] --workdir=DIR``.

Overrides: ``--config.gkd.lmbda=0.5`` (ml_collections), or gin syntax on the same
keys: ``--gin_bindings='gkd.lmbda = 0.5'`` / ``--gin_file=overrides.gin``. Gin
overrides apply after the ``--config.*`` ones. ``--config.KEY=VALUE`` values are Python
literals (else strings); new entries of the free-form dicts work too:
``--config.data.paths.train=/data/train.jsonl``.

A bad config, data file, model file or workdir ends the run with one line naming the
culprit (exit status 1; the traceback with ``--verbose``).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow (data only) stays quiet

from absl import app, flags
from ml_collections import config_flags

from gkd_jax import config as config_lib

config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py).", lock_config=False
)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples, export.")
flags.DEFINE_multi_string("gin_file", [], "Gin files of 'section.key = value' overrides.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings 'section.key = value'.")
flags.DEFINE_bool(
  "allow_config_change",
  False,
  "Resume although settings that change the result "
  "differ from the ones that made the workdir's checkpoints.",
)
flags.DEFINE_bool("verbose", False, "Show the traceback of a failed run.")
FLAGS = flags.FLAGS
# --config.KEY=VALUE flags are taken out of argv and set after the config file loads, so that
# an unknown key is one line naming it and new entries of the free-form dicts can be added.
_OVERRIDES: list = []  # (dotted key, value)


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


def take_overrides(argv):
  """argv without its ``--config.KEY=VALUE`` flags -> (argv, [(KEY, VALUE text)])."""
  rest, pairs = [], []
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      pairs.append(tuple(arg[len("--config.") :].split("=", 1)))
    else:
      rest.append(arg)
  return rest, pairs


def typed(config, pairs):
  """[(key, text)] -> [(key, value)]: the text itself for a string key, else a Python literal
  (a string when it is none)."""
  out = []
  for key, text in pairs:
    try:
      current = config_lib.get(config, key)
    except (KeyError, AttributeError):
      current = None
    if not isinstance(current, str):
      try:
        text = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        pass
    out.append((key, text))
  return out


def load_config(spec: str, args=()):
  """``configs/NAME.py[:ARG]`` -> its ``get_config([ARG])`` with ``--config.KEY=VALUE`` args
  applied (for tools other than the trainer's CLI); ValueError naming a bad file or key."""
  config = config_lib.from_file(spec)
  rest, pairs = take_overrides(list(args))
  if rest:
    raise ValueError(f"unexpected arguments: {rest}")
  return config_lib.validate(config_lib.set_keys(config, typed(config, pairs), source="--config"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  if not FLAGS.verbose:  # a failed asynchronous checkpoint write is reported by the main thread
    logging.getLogger("absl").addFilter(
      lambda r: r.levelno < logging.ERROR or "orbax" not in r.pathname
    )
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # orbax's own event loops only
    threading.excepthook = lambda a: logging.debug(
      "background thread %s failed", a.thread, exc_info=(a.exc_type, a.exc_value, a.exc_traceback)
    )
    sys.excepthook = _quiet_closed_loop(sys.excepthook)
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: (
      None
      if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
      else previous(u)
    )
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save INFO chatter
  texts = list(FLAGS.gin_bindings)
  for path in FLAGS.gin_file:
    if not os.path.isfile(path):
      raise app.UsageError(f"--gin_file {path!r} does not exist")
    with open(path) as f:
      texts.append(f.read())
  try:
    FLAGS.config.to_dict  # a config file that failed to load raises its error here
  except Exception as e:  # noqa: BLE001 - ml_collections re-raises the loader's error
    raise app.UsageError(f"--config: {one_line(e)}") from e
  try:
    config = config_lib.set_keys(FLAGS.config, typed(FLAGS.config, _OVERRIDES), source="--config")
    config = apply_overrides(config, gin_overrides(texts))
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  code, summary, error = execute(config, FLAGS.workdir, FLAGS.allow_config_change, FLAGS.verbose)
  if error:
    print(f"gkd_jax: error: {error}", file=sys.stderr)
    return code
  print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=2, default=str))
  print(report(summary))
  return code


def execute(config, workdir, allow_config_change=False, verbose=False):
  """train.run with the command line's outcome -> (exit status, summary or None, error line).

  A bad input or a failed write is one line (exit 1); verbose re-raises it with its traceback.
  """
  from gkd_jax import train

  try:
    summary = train.run(config, workdir, allow_config_change=allow_config_change)
  except (ValueError, OSError, FloatingPointError, train.CheckpointError) as e:
    if verbose:
      raise
    return 1, None, one_line(e)
  return (0 if summary["status"] in ("done", "preempted") else 1), summary, ""


def _quiet_closed_loop(hook):
  """After a failed checkpoint write, tensorstore's native callbacks may still post to orbax's
  closed event loop, and the errors are printed through sys.excepthook: log those at debug."""

  def quiet(kind, value, tb):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      logging.debug("callback after the checkpoint event loop closed", exc_info=(kind, value, tb))
    else:
      hook(kind, value, tb)

  return quiet


def one_line(e) -> str:
  """An exception as one line: its message (a system error's also its type)."""
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text}" if isinstance(e, OSError) and e.errno else text


def report(summary) -> str:
  """A small before/after table of the eval metrics and a few samples."""
  ev = dict(summary.get("eval", {}))
  if (summary.get("teacher_sft") or {}).get("zero_shot"):
    ev["teacher_zero_shot"] = summary["teacher_sft"]["zero_shot"]
  rows = [
    (name, ev[key])
    for key, name in (
      ("teacher_zero_shot", "teacher before its SFT"),
      ("teacher", "teacher"),
      ("before", "student before"),
      ("after_sft_warmup", "student after SFT warm-up"),
      ("after", "student after"),
    )
    if key in ev
  ]
  if not rows:
    return ""
  keys = [k for k in rows[-1][1] if k != "decode_s"]
  primary = summary.get("primary_metric")
  lines = [f"{'':<28}" + "".join(f"{(k + '*') if k == primary else k:>12}" for k in keys)]
  for name, m in rows:
    lines.append(
      f"{name:<28}" + "".join(f"{m[k]:>12.3f}" if k in m else f"{'-':>12}" for k in keys)
    )
  if primary:
    lines.append(f"(* the task's primary metric; summary: {summary['workdir']}/summary.json)")
  for s in summary.get("samples", [])[:3]:
    lines += ["", "reference: " + s["reference"].strip(), "student:   " + s["student"].strip()]
  return "\n".join(lines)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  sys.argv, _OVERRIDES[:] = take_overrides(sys.argv)
  app.run(main)
