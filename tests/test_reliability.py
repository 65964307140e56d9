"""Bad inputs and faults across the CLI, config, model files, data files, workdir and checkpoints.

Every case asserts the exit status (through `main.execute`, the command line's own outcome, or
the command line itself), that the one-line message names the culprit, how soon it fails (before
any model loads wherever that is possible) and that nothing on disk was lost. One tiny model
(conftest.tiny_dirs) serves every case; the runs that train share one interrupted workdir.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from gkd_jax import config as config_lib
from gkd_jax import main, models, train

from test_train import ROOT, _params, tiny_config

SMOLLM = models.alias_path("smollm2-135m-instruct")


def execute(c, workdir, **kw):
  """-> (exit status, summary or None, error line, seconds)."""
  t0 = time.time()
  code, summary, error = main.execute(c, str(workdir), **kw)
  return code, summary, error, time.time() - t0


@pytest.fixture
def no_model_load(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"a model was loaded ({args}) before the bad input was reported")
  monkeypatch.setattr(models, "load", refuse)


def tree(root) -> dict:
  """{relative path: (size, mtime_ns)} of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      st = os.stat(p)
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
  return out


# ------------------------------------------------------------------ config and data, before any model
def _missing_keys(c, tmp, dirs):
  d = config_lib.defaults()
  del d["train"]
  return d


def _plain_dict(c, tmp, dirs):
  return c.to_dict()


def _jsonl(tmp, name, data: bytes):
  path = tmp / name
  path.write_bytes(data)
  return str(path)


GOOD_ROW = b'{"document": "a b c", "summary": "a"}\n'

# name -> (changes: {dotted key: value} or fn(config, tmp_path, tiny_dirs) -> config | None,
#          regex that the one-line error must match)
EARLY = {
    "seed_negative": ({"seed": -1}, r"config\.seed = -1: must be an int in \[0, 2\*\*32\)"),
    "seed_too_big": ({"seed": 2**32}, r"config\.seed = 4294967296"),
    "grad_accum_not_dividing": ({"optim.grad_accum": 3}, r"config\.data\.batch_size = 8: must be "
                                r"divisible by optim\.grad_accum=3"),
    "sample_temperature_inf": ({"gkd.sample_temperature": float("inf")},
                               r"config\.gkd\.sample_temperature = inf: must be finite"),
    "b1_one": ({"optim.b1": 1.0}, r"config\.optim\.b1 = 1\.0: must be a number in \[0, 1\)"),
    "b2_negative": ({"optim.b2": -0.1}, r"config\.optim\.b2 = -0\.1"),
    "warmup_takes_every_step": ({"train.sft_warmup_steps": 3},
                                r"config\.train\.sft_warmup_steps = 3: must be < train\.steps=3"),
    "lmbda_out_of_range": ({"gkd.lmbda": 1.5}, r"config\.gkd\.lmbda = 1\.5"),
    "unknown_key": (lambda c, t, d: c.gkd.__setattr__("lambda_", 0.5) or c,
                    r"unknown config key\(s\): gkd\.lambda_"),
    "config_missing_keys": (_missing_keys, r"the config lacks key\(s\) train\.ckpt_every, .*"
                            r"defaults\(\)"),
    "config_not_a_configdict": (_plain_dict, r"is a dict, not an ml_collections\.ConfigDict"),
    "unknown_task": ({"data.task": "xsumm"}, r"config\.data\.task = 'xsumm': unknown task"),
    "unknown_prompt_format": ({"data.prompt_format": "alpaca"},
                              r"config\.data\.prompt_format = 'alpaca'"),
    "unknown_source": ({"data.source": "hf"}, r"config\.data\.source = 'hf': unknown source"),
    "tfds_for_a_local_only_task": ({"data.task": "asdiv", "data.source": "tfds"},
                                   r"config\.data\.source = 'tfds': task 'asdiv' has no TFDS"),
    "unknown_overlong": ({"data.overlong": "crop"}, r"config\.data\.overlong = 'crop'"),
    "unknown_split": ({"data.train_split": "dev"}, r"xsum: no local file for split 'dev'"),
    "keep_layers_out_of_range": ({"student.keep_layers": (0, 7)},
                                 r"keep_layers = \(0, 7\): the teacher has 4 layers"),
    "keep_layers_duplicate": ({"student.keep_layers": (1, 1)}, r"keep_layers = \(1, 1\): must be"),
    "keep_layers_empty": ({"student.keep_layers": ()}, r"keep_layers = \(\): must be distinct"),
    "remat_policy_unknown": ({"student.remat": True, "student.remat_policy": "dot"},
                             r"config\.student\.remat_policy = 'dot': must be 'full' or 'dots'"),
    "remat_policy_without_remat": ({"student.remat_policy": "dots"},
                                   r"config\.student\.remat_policy = 'dots': .*student\.remat=True"),
    "teacher_path_missing": ({"teacher.path": "/nope/model"},
                             r"config\.teacher\.path = '/nope/model': no such file"),
    "student_path_missing": ({"student.init": "path", "student.path": "/nope/student"},
                             r"config\.student\.path = '/nope/student'"),
    "mesh_does_not_fit": ({"mesh.data": 3}, r"config\.mesh \(data=3, fsdp=1, model=2\) does not "
                          r"fit the 8"),
    "xsum_data_dir_without_file": (lambda c, t, d: (t / "data").mkdir() or c.data.__setattr__(
        "data_dir", str(t / "data")) or c, r"xsum: data file not found: .*data/xsum/train\.jsonl"),
    "train_file_missing": (lambda c, t, d: c.data.paths.__setattr__("train", str(t / "no.jsonl"))
                           or c, r"data file not found: .*no\.jsonl"),
    "eval_file_missing": (lambda c, t, d: [c.data.paths.__setattr__("validation", str(t / "v.jsonl")),
                                           c.eval.__setattr__("num_examples", 4)] and c,
                          r"data file not found: .*v\.jsonl"),
    "jsonl_not_utf8": (lambda c, t, d: c.data.paths.__setattr__("train", _jsonl(
        t, "a.jsonl", GOOD_ROW + b'{"document": "caf\xe9", "summary": "x"}\n')) or c,
                       r"a\.jsonl:2: not valid UTF-8"),
    "jsonl_malformed_line": (lambda c, t, d: c.data.paths.__setattr__("train", _jsonl(
        t, "b.jsonl", GOOD_ROW * 3 + b'{"document": "x",\n')) or c,
                             r"b\.jsonl:4: malformed JSON line"),
    "jsonl_missing_key": (lambda c, t, d: c.data.paths.__setattr__("train", _jsonl(
        t, "c.jsonl", GOOD_ROW + b'{"text": "x", "summary": "y"}\n')) or c,
                          r"c\.jsonl:2: missing key 'document'"),
    "jsonl_empty": (lambda c, t, d: c.data.paths.__setattr__("train", _jsonl(t, "e.jsonl", b"\n"))
                    or c, r"split 'train' of task 'xsum' has no examples"),
    "workdir_is_under_a_file": ("WORKDIR_UNDER_FILE", r"workdir .* is not writable"),
}


@pytest.mark.parametrize("name", list(EARLY))
def test_fails_before_any_model_loads(tiny_dirs, tmp_path, no_model_load, name):
  change, match = EARLY[name]
  c, workdir = tiny_config(tiny_dirs / "teacher"), tmp_path / "run"
  if change == "WORKDIR_UNDER_FILE":
    (tmp_path / "file").write_text("x")
    workdir = tmp_path / "file" / "run"
  elif callable(change):
    c = change(c, tmp_path, tiny_dirs) or c
  else:
    c = config_lib.set_keys(c, change.items())
  before = tree(tmp_path)
  code, summary, error, seconds = execute(c, workdir)
  assert code == 1 and summary is None
  assert re.search(match, error), error
  assert "\n" not in error and seconds < 20
  assert tree(tmp_path) == before  # nothing written, nothing lost (no workdir either)


# ------------------------------------------------------------------ command line
def _cli(args, cwd=ROOT):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  t0 = time.time()
  p = subprocess.run([sys.executable, "-m", "gkd_jax.main", *args], cwd=cwd, env=env,
                     capture_output=True, text=True, timeout=600)
  return p.returncode, p.stdout, p.stderr, time.time() - t0


def _cfg_file(tmp_path, teacher, **overrides):
  path = tmp_path / "cfg.py"
  path.write_text(
      "import sys; sys.path.insert(0, %r)\n" % os.path.join(ROOT, "tests") +
      "from test_train import tiny_config\n"
      "def get_config():\n"
      f"  return tiny_config({str(teacher)!r}, **{overrides!r})\n")
  return path


def test_cli_bad_inputs_name_the_culprit_in_one_line(tiny_dirs, tmp_path):
  """Missing config file; unknown --config key; a gin reference; a missing --gin_file; a bad value
  (one line, no traceback; the traceback with --verbose); a new data.paths entry on the command line
  (reaches the trainer: its missing file is named)."""
  cfg = _cfg_file(tmp_path, tiny_dirs / "teacher")
  w = f"--workdir={tmp_path / 'w'}"
  cases = [
      ([f"--config={tmp_path / 'nope.py'}", w], r"nope\.py"),
      ([f"--config={cfg}", w, "--config.gkd.nope=1"], r"unknown config key 'gkd\.nope'"),
      ([f"--config={cfg}", w, "--config.gkd.lmbda=high"], r"config key 'gkd\.lmbda'.*high"),
      ([f"--config={cfg}", w, "--gin_bindings=gkd.loss = @fkl"], r"references \(@fkl\)"),
      ([f"--config={cfg}", w, f"--gin_file={tmp_path / 'x.gin'}"], r"x\.gin.* does not exist"),
      ([f"--config={cfg}", w, "--config.seed=-1"], r"^gkd_jax: error: config\.seed = -1"),
      ([f"--config={cfg}", w, f"--config.data.paths.train={tmp_path / 'mine.jsonl'}"],
       r"^gkd_jax: error: data file not found: .*mine\.jsonl"),
  ]
  for args, match in cases:
    code, out, err, seconds = _cli(args)
    assert code != 0 and re.search(match, err, re.M), (args, err)
    assert "Traceback" not in err and seconds < 60, (args, err)
  assert not (tmp_path / "w").exists()
  code, _, err, _ = _cli([f"--config={cfg}", w, "--config.seed=-1", "--verbose"])
  assert code != 0 and "Traceback" in err and "config.seed = -1" in err


def test_free_dict_overrides_are_taken_from_argv():
  argv, pairs = main.take_overrides(
      ["prog", "--config.data.paths.dolly=/d/dolly.jsonl", "--config.student.overrides.n_layers=2",
       "--config.gkd.lmbda=0.5", "--workdir=w", "--config.data.eval_split=2",
       "--config.student.keep_layers=(0, 3)", "--config.gkd.fused=true"])
  assert argv == ["prog", "--workdir=w"]
  c = config_lib.defaults()
  pairs = main.typed(c, pairs)
  assert pairs == [("data.paths.dolly", "/d/dolly.jsonl"), ("student.overrides.n_layers", 2),
                   ("gkd.lmbda", 0.5), ("data.eval_split", "2"), ("student.keep_layers", (0, 3)),
                   ("gkd.fused", "true")]
  c = config_lib.set_keys(c, pairs)
  assert c.data.paths.dolly == "/d/dolly.jsonl" and c.student.overrides.n_layers == 2
  assert c.gkd.fused is True and c.student.keep_layers == (0, 3) and c.data.eval_split == "2"
  with pytest.raises(ValueError, match="unknown config key 'data.nope.x'"):
    config_lib.set_keys(config_lib.defaults(), [("data.nope.x", 1)])


# ------------------------------------------------------------------ model files
def _teacher_copy(tiny_dirs, tmp_path, corrupt):
  d = tmp_path / "teacher"
  shutil.copytree(tiny_dirs / "teacher", d)
  corrupt(d)
  return d


def _truncate(path, keep=0.5):
  blob = path.read_bytes()
  path.write_bytes(blob[:int(len(blob) * keep)])


MODEL_FILES = {
    "safetensors_truncated": (lambda d: _truncate(d / "model.safetensors", 0.5),
                              r"model\.safetensors is corrupt or truncated"),
    "safetensors_garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
                            r"model\.safetensors is corrupt or truncated"),
    "config_json_invalid": (lambda d: (d / "config.json").write_text('{"vocab_size": 3,'),
                            r"config\.json: invalid JSON at line 1"),
    "tokenizer_config_invalid": (lambda d: (d / "tokenizer_config.json").write_text("{oops"),
                                 r"tokenizer_config\.json: invalid JSON"),
    "no_tokenizer_files": (lambda d: [os.remove(d / f) for f in os.listdir(d)
                                      if f.startswith(("tokenizer", "special", "vocab", "merges"))],
                           r"has no tokenizer files"),
    "no_weights": (lambda d: os.remove(d / "model.safetensors"),
                   r"has neither model\.safetensors nor model\.safetensors\.index\.json"),
    "gguf_truncated": ("GGUF", r"\.gguf is not a valid GGUF file or is truncated"),
}


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_corrupt_model_files_are_named(tiny_dirs, tmp_path, name):
  corrupt, match = MODEL_FILES[name]
  if corrupt == "GGUF":
    teacher = tmp_path / "cut.gguf"
    with open(SMOLLM, "rb") as f:
      teacher.write_bytes(f.read(1 << 20))  # the header and part of the tensor table
  else:
    teacher = _teacher_copy(tiny_dirs, tmp_path, corrupt)
  before = tree(teacher) if teacher.is_dir() else None
  code, _, error, seconds = execute(tiny_config(teacher), tmp_path / "run")
  assert code == 1 and re.search(match, error), error
  assert "\n" not in error and seconds < 60
  assert before is None or tree(teacher) == before


def test_other_vocabulary_student(tiny_dirs, tmp_path):
  c = tiny_config(tiny_dirs / "teacher", **{"student.init": "path",
                                            "student.path": str(tiny_dirs / "other_vocab")})
  code, _, error, _ = execute(c, tmp_path / "run")
  assert code == 1 and "vocabularies differ (49152 vs 256)" in error


# ------------------------------------------------------------------ workdir and checkpoints
STEPS = 4
RUN = {"train.steps": STEPS, "train.ckpt_every": 1, "train.keep_ckpts": 3, "gkd.lmbda": 0.5,
       "seed": 3, "train.export_hf": True}


def run_config(tiny_dirs, **extra):
  return tiny_config(tiny_dirs / "teacher", **{**RUN, **extra})


class Killed(BaseException):
  """Stands for the process dying at that point (not caught as a run failure)."""


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
  """An uninterrupted run: (workdir, final params)."""
  w = tmp_path_factory.mktemp("reference")
  code, s, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 0 and s["status"] == "done", error
  return w, _params(w, STEPS)


@pytest.fixture(scope="module")
def preempted(tiny_dirs, tmp_path_factory):
  """A run stopped by SIGTERM that lands on checkpoint step 3 (saved by the periodic save just
  before): checkpoints 1, 2, 3 and status "preempted" (exit 0)."""
  w = tmp_path_factory.mktemp("preempted")
  real = train.Trainer.train_step

  def step_then_sigterm(self, state, batch):
    out = real(self, state, batch)
    if state.step + 1 == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  mp = pytest.MonkeyPatch()
  mp.setattr(train.Trainer, "train_step", step_then_sigterm)
  try:
    code, s, error, _ = execute(run_config(tiny_dirs), w)
  finally:
    mp.undo()
  assert code == 0 and s["status"] == "preempted" and s["step"] == 3, error
  assert train.checkpoint_steps(w) == [1, 2, 3]
  return w


def copy_of(src, tmp_path):
  dst = tmp_path / "run"
  shutil.copytree(src, dst)
  return dst


def assert_same_params(workdir, reference):
  got = _params(workdir, STEPS)
  assert got.keys() == reference[1].keys()
  for k, v in reference[1].items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def train_rows(workdir):
  rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl")) if x.strip()]
  return [r["step"] for r in rows if "train/loss" in r]


def test_sigterm_on_a_checkpoint_step_then_resume_is_exact(tiny_dirs, preempted, reference, tmp_path):
  w = copy_of(preempted, tmp_path)
  code, s, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 0 and s["status"] == "done" and s["start_step"] == 3, error
  assert_same_params(w, reference)
  assert train_rows(w) == list(range(1, STEPS + 1))  # each step logged once
  assert s["sources"] == json.load(open(reference[0] / "summary.json"))["sources"]


def _cut_largest_file(step_dir):
  files = [os.path.join(d, n) for d, _, ns in os.walk(step_dir) for n in ns]
  big = max(files, key=os.path.getsize)
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def _drop_metadata(step_dir):
  for d, _, ns in os.walk(step_dir):
    for n in ns:
      if n == "_METADATA":
        os.remove(os.path.join(d, n))


CORRUPT_LATEST = {
    "truncated": (_cut_largest_file, 2),
    "metadata_missing": (_drop_metadata, 2),
}


@pytest.mark.parametrize("name", list(CORRUPT_LATEST))
def test_corrupt_latest_checkpoint_falls_back_and_keeps_it(tiny_dirs, preempted, reference, tmp_path, caplog,
                                                           name):
  corrupt, fallback = CORRUPT_LATEST[name]
  w = copy_of(preempted, tmp_path)
  corrupt(w / "ckpt" / "3")
  broken = tree(w / "ckpt" / "3")
  with caplog.at_level(logging.WARNING, logger="gkd_jax"):
    code, s, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 0 and s["start_step"] == fallback, error
  assert any("checkpoint step 3" in r.getMessage() and "cannot be read" in r.getMessage()
             for r in caplog.records)
  kept = [d for d in os.listdir(w / "ckpt_broken") if d.startswith("3.")]
  assert len(kept) == 1 and tree(w / "ckpt_broken" / kept[0]) == broken  # moved, not deleted
  assert_same_params(w, reference)
  assert train_rows(w) == list(range(1, STEPS + 1))  # step 3, logged before, is not repeated


def test_every_checkpoint_broken_starts_over(tiny_dirs, preempted, reference, tmp_path):
  w = copy_of(preempted, tmp_path)
  for step in (1, 2, 3):
    _drop_metadata(w / "ckpt" / str(step))
  code, s, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 0 and s["start_step"] == 0, error
  assert len(os.listdir(w / "ckpt_broken")) == 3
  assert_same_params(w, reference)
  assert train_rows(w) == list(range(1, STEPS + 1))


def test_kill_during_a_save_leaves_a_tmp_dir_that_is_ignored(tiny_dirs, preempted, reference, tmp_path):
  """orbax writes a step under a tmp name and renames it when complete: a SIGKILL during the save
  leaves the tmp dir, which the resumed run ignores (it resumes from the last complete step)."""
  w = copy_of(preempted, tmp_path)
  part = w / "ckpt" / "4.orbax-checkpoint-tmp-1234567"
  shutil.copytree(w / "ckpt" / "3", part)
  _cut_largest_file(part)
  code, s, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 0 and s["start_step"] == 3, error
  assert_same_params(w, reference)


def test_resume_with_changed_result_settings_fails_and_keeps_the_record(tiny_dirs, preempted, tmp_path,
                                                                        no_model_load):
  w = copy_of(preempted, tmp_path)
  before = tree(w)
  c = run_config(tiny_dirs, **{"optim.lr": 1e-3, "gkd.loss": "rkl", "train.steps": 6})
  code, _, error, seconds = execute(c, w)
  assert code == 1 and seconds < 20
  for piece in ("holds checkpoints (up to step 3)", "gkd.loss 'jsd' -> 'rkl'",
                "optim.lr 0.0001 -> 0.001", "train.steps 4 -> 6", "--allow_config_change",
                "new --workdir"):
    assert piece in error, error
  assert tree(w) == before  # config.json, checkpoints, metrics untouched


def test_resume_with_changed_free_settings_warns(tiny_dirs, preempted, reference, tmp_path, caplog):
  w = copy_of(preempted, tmp_path)
  old = (w / "config.json").read_text()
  with caplog.at_level(logging.WARNING, logger="gkd_jax"):
    code, s, error, _ = execute(run_config(tiny_dirs, **{"train.log_every": 2, "train.keep_ckpts": 5}), w)
  assert code == 0 and s["status"] == "done", error
  assert any("changed settings: train.keep_ckpts 3 -> 5, train.log_every 1 -> 2" in r.getMessage()
             for r in caplog.records)
  assert (w / "config.step3.json").read_text() == old
  assert_same_params(w, reference)


def test_a_config_recorded_before_a_key_existed_resumes(tmp_path):
  """Keys added to the schema later (gkd.loss_kw, student.scan_layers) take their defaults in
  an older workdir's config.json: no spurious 'changed settings'."""
  c = config_lib.defaults()
  recorded = json.loads(c.to_json_best_effort())
  del recorded["student"]["scan_layers"], recorded["gkd"]["loss_kw"]
  (tmp_path / "ckpt" / "2").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  assert train.check_resume(c, str(tmp_path)) == {}
  c.student.scan_layers = True
  with pytest.raises(ValueError, match="student.scan_layers False -> True"):
    train.check_resume(c, str(tmp_path))


def test_allow_config_change_goes_on_and_keeps_the_old_config(tiny_dirs, preempted, tmp_path):
  w = copy_of(preempted, tmp_path)
  old = (w / "config.json").read_text()
  code, s, error, _ = execute(run_config(tiny_dirs, **{"optim.lr": 1e-3}), w, allow_config_change=True)
  assert code == 0 and s["status"] == "done" and s["start_step"] == 3, error
  assert (w / "config.step3.json").read_text() == old
  assert json.load(open(w / "config.json"))["optim"]["lr"] == 1e-3


def test_finished_run_rerun_reports_its_summary_and_changes_nothing(tiny_dirs, reference, tmp_path,
                                                                    no_model_load):
  w = copy_of(reference[0], tmp_path)
  before, saved = tree(w), json.load(open(w / "summary.json"))
  code, s, error, seconds = execute(run_config(tiny_dirs), w)
  assert code == 0 and s == saved and seconds < 20, error
  assert tree(w) == before


def test_killed_after_the_final_checkpoint_finishes_without_training(tiny_dirs, reference,
                                                                     tmp_path, monkeypatch):
  """A run dies during its HF export (after the final checkpoint): the re-run redoes only the
  export (no training step is run or logged again) and reports done."""
  w = tmp_path / "run"

  def die(*args, **kwargs):
    raise Killed()

  monkeypatch.setattr(models, "save_hf", die)
  with pytest.raises(Killed):
    execute(run_config(tiny_dirs), w)
  assert train.checkpoint_steps(w)[-1] == STEPS and not (w / "hf").exists()
  assert json.load(open(w / "summary.json"))["status"] == "running"
  monkeypatch.undo()
  rows = train_rows(w)
  code, s, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 0 and s["status"] == "done" and s["start_step"] == STEPS, error
  assert train_rows(w) == rows == list(range(1, STEPS + 1))
  assert (w / "hf" / "model.safetensors").exists()
  assert_same_params(w, reference)


def test_nan_stop_before_any_checkpoint_says_so(tiny_dirs, tmp_path):
  c = tiny_config(tiny_dirs / "teacher", **{"train.steps": 3, "train.ckpt_every": 0,
                                            "optim.lr": 1e30, "optim.warmup_steps": 0,
                                            "optim.clip_norm": 0.0, "gkd.lmbda": 0.0})
  code, _, error, _ = execute(c, tmp_path / "run")
  assert code == 1 and "non-finite loss" in error
  assert "no checkpoint had been written yet" in error and "intact" not in error
  assert train.checkpoint_steps(tmp_path / "run") == []


def test_corrupt_workdir_records_are_named(tiny_dirs, preempted, tmp_path, no_model_load):
  w = copy_of(preempted, tmp_path)
  (w / "config.json").write_text('{"seed": 3,')
  code, _, error, _ = execute(run_config(tiny_dirs), w)
  assert code == 1 and "config.json: invalid JSON" in error
  w2 = copy_of(preempted, tmp_path / "b")
  (w2 / "summary.json").write_bytes(b"\xff\xfe")
  code, _, error, _ = execute(run_config(tiny_dirs), w2)
  assert code == 1 and "summary.json: not valid UTF-8" in error


def test_batch_that_the_devices_do_not_divide_is_logged(tiny_dirs, tmp_path, caplog):
  c = tiny_config(tiny_dirs / "teacher", **{"data.batch_size": 6, "train.steps": 1})
  with caplog.at_level(logging.WARNING, logger="gkd_jax"):
    tr = train.Trainer(config_lib.validate(c), str(tmp_path))
    tr.setup()
  assert any("batch of 6 rows does not divide over the 4 batch shards" in r.getMessage()
             for r in caplog.records)


# ------------------------------------------------------------------ real processes (slow)
def _tmpfs_prefix(tmp_path):
  """A command prefix that runs in a private mount namespace with a 30 MB tmpfs at
  tmp_path/full, or None when this machine does not allow it."""
  mnt = tmp_path / "full"
  mnt.mkdir()
  probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
           f"mount -t tmpfs -o size=30m tmpfs {mnt} && touch {mnt}/ok"]
  try:
    ok = subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.TimeoutExpired):
    ok = False
  return mnt if ok else None


@pytest.mark.slow
def test_full_disk_stops_at_that_step_with_one_line(tiny_dirs, tmp_path):
  mnt = _tmpfs_prefix(tmp_path)
  if mnt is None:
    reason = "cannot mount a tmpfs here (unshare --user --mount refused)"
    if os.environ.get("CI") == "true":
      warnings.warn(f"CI: full-disk test skipped: {reason}")
    pytest.skip(reason)
  cfg = _cfg_file(tmp_path, tiny_dirs / "teacher", **{"train.steps": 4, "train.ckpt_every": 1,
                                                        "train.keep_ckpts": 4})
  w = mnt / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  script = (f"mount -t tmpfs -o size=30m tmpfs {mnt} && {sys.executable} -m gkd_jax.main "
            f"--config={cfg} --workdir={w}; echo EXIT=$?; ls {w}/ckpt; {sys.executable} -c "
            f"\"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
            f"from test_train import _params; p = _params({str(w)!r}, 1); "
            f"import numpy as np; print('STEP1_OK', all(np.isfinite(v).all() for v in p.values()))\"")
  p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  err_lines = [x for x in p.stderr.splitlines() if x.startswith("gkd_jax: error:")]
  assert "EXIT=1" in p.stdout, (p.stdout, p.stderr[-3000:])
  assert len(err_lines) == 1 and "No space left on device" in err_lines[0], p.stderr[-3000:]
  assert "could not write checkpoint step" in err_lines[0] and str(w) in err_lines[0]
  # The error is the last line and no Python traceback of the run's own is printed. Native
  # (tensorstore) callbacks may still print a few "Event loop is closed" traces after the
  # failed write; the old failure was ~1,300 lines ending in "sys.meta_path is None".
  lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
  assert lines[-1] == err_lines[0] and "sys.meta_path" not in p.stderr, p.stderr[-3000:]
  assert os.path.join(ROOT, "gkd_jax") + os.sep not in p.stderr, p.stderr[-3000:]
  noise = [x for x in lines if "Traceback" in x]
  assert len(noise) <= 12, p.stderr[-3000:]
  assert "STEP1_OK True" in p.stdout, p.stdout  # the earlier checkpoint is intact


@pytest.mark.slow
def test_sigkill_during_a_save_then_resume_is_exact(tiny_dirs, reference, tmp_path):
  cfg = _cfg_file(tmp_path, tiny_dirs / "teacher", **{**RUN, "train.export_hf": False})
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  args = [sys.executable, "-m", "gkd_jax.main", f"--config={cfg}", f"--workdir={tmp_path / 'k'}"]
  proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt, t0 = tmp_path / "k" / "ckpt", time.time()
  while proc.poll() is None and time.time() - t0 < 300:  # kill once a step is being written
    if ckpt.is_dir() and any("tmp" in d for d in os.listdir(ckpt)) and os.listdir(ckpt):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.002)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before a save could be interrupted"
  done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_params(tmp_path / "k", reference)  # the export does not touch the params
