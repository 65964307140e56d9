"""Workdirs on gs://: every writer and reader of the workdir (JSON, text, moves, metrics.jsonl with
its resume truncation, TensorBoard events, the plot, the HF export) on a local path and on a fake
GCS, then a whole run (teacher-SFT stage, eval samples, export, a resume) into gs://bucket/run.

The fake is an in-memory fsspec filesystem behind etils.epath's own fsspec backend (the one epath
uses for gs:// when TensorFlow is absent; with gcsfs that is a real bucket). Like GCS it has no
directories (mkdir does nothing; a "directory" exists while objects are under it), no appends, and
an object appears when its write is closed. Orbax checkpoints (tensorstore) cannot be faked: the
run's ckpt/ is redirected to a local directory.
"""

import json
import os
import struct

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from gkd_jax import files, models, observe, train
from test_train import tiny_config


class FakeGCS(MemoryFileSystem):
  """gs:// objects in memory, with GCS's limits."""

  protocol = ("gs", "gcs")
  root_marker = ""

  def __init__(self, **kwargs):
    kwargs.pop("finalize_on_close", None)  # what epath passes to gcsfs
    super().__init__(global_store=False, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.strip("/")

  def mkdir(self, path, create_parents=True, **kwargs):
    pass  # GCS has no directories

  def makedirs(self, path, exist_ok=False):
    pass

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"gs://{path}: GCS objects cannot be appended to")
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def gcs(monkeypatch):
  """The fake GCS behind every gs:// epath.Path (TensorFlow's gfile backend switched off)."""
  fs = FakeGCS(skip_instance_cache=True)  # an empty bucket for each test
  assert fs.store == {}
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem",
                      lambda name: fs if name == "gcs" else pytest.fail(f"fsspec {name!r}"))
  return fs


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  """A workdir: a local directory, or gs://bucket/run on the fake GCS."""
  if request.param == "local":
    (tmp_path / "run").mkdir()
    yield str(tmp_path / "run")
    return
  fs = request.getfixturevalue("gcs")
  yield "gs://bucket/run"
  assert all(k.startswith("bucket/run/") for k in fs.store) and fs.store, sorted(fs.store)


def put(p, text: str = "") -> None:
  files.path(p).parent.mkdir(parents=True, exist_ok=True)
  files.write_text(p, text)


def names(d) -> list[str]:
  p = files.path(d)
  return sorted(x.name for x in p.iterdir()) if p.is_dir() else []


def test_url_paths_are_kept_and_local_ones_made_absolute(gcs):
  assert files.absolute("gs://bucket/a/b") == "gs://bucket/a/b"
  assert files.absolute("rel/x") == os.path.join(os.getcwd(), "rel/x")
  assert not files.is_local("gs://bucket/x") and files.is_local("/tmp/x")
  assert train.check_workdir("gs://bucket/w") == "gs://bucket/w"
  assert gcs.store == {}  # the write probe is gone


def test_json_text_and_move(root):
  files.write_json(f"{root}/a.json", {"x": [1, 2], "t": 1.5}, default=str)
  assert files.read_json(f"{root}/a.json") == {"x": [1, 2], "t": 1.5}
  assert files.read_text(f"{root}/a.json") == json.dumps({"x": [1, 2], "t": 1.5}, indent=2)
  files.write_text(f"{root}/a.json", '{"y": 1}')  # replaced whole
  assert files.read_json(f"{root}/a.json") == {"y": 1}
  files.write_text(f"{root}/bad.json", '{"y": 1,}')
  with pytest.raises(ValueError, match=r"run/bad\.json: invalid JSON at line 1 column 9"):
    files.read_json(f"{root}/bad.json")
  assert names(root) == ["a.json", "bad.json"]  # no .tmp left behind
  put(f"{root}/ckpt/3/state/x", "weights")
  put(f"{root}/ckpt/3/meta", "{}")
  files.move(f"{root}/ckpt/3", f"{root}/ckpt_broken/3.17")  # into a "directory" not there yet
  assert names(f"{root}/ckpt/") == [] and names(f"{root}/ckpt_broken/3.17") == ["meta", "state"]
  assert files.read_text(f"{root}/ckpt_broken/3.17/state/x") == "weights"


def test_checkpoint_steps_resume_check_and_config_backup(root):
  c = tiny_config("/nowhere")
  assert train.check_workdir(root) == (root if root.startswith("gs:") else os.path.abspath(root))
  files.write_text(f"{root}/config.json", c.to_json_best_effort(indent=2))
  for step in ("2", "4", "5.orbax-checkpoint-tmp-1"):
    put(f"{root}/ckpt/{step}/x")
  assert train.checkpoint_steps(root) == [2, 4]
  train.write_summary(root, {"status": "preempted", "step": 4, "when": object})
  c.train.log_every = 7  # a result-free change: the old config is kept as config.step4.json
  earlier = train.check_resume(c, root)
  assert earlier["status"] == "preempted" and earlier["when"] == str(object)
  assert files.read_json(f"{root}/config.step4.json")["train"]["log_every"] == 1


def read_events(path) -> list:
  """(step, tag, value) of each scalar in a TFRecord-framed events file."""
  from tensorboard.compat.proto import event_pb2

  data, out, i = files.path(path).read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i : i + 8])
    event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
    out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    i += 12 + n + 4
  return out


def test_metrics_resume_truncation_and_events(root):
  pytest.importorskip("tensorboard")
  with observe.MetricsLogger(root) as log:
    for step in (1, 2, 3):
      log.write(step, {"loss": 4.0 - step})
      # each row is in the file as soon as it is written (on gs://: the whole object again)
      assert observe.read_metrics(root)[-1] == {"step": step, "train/loss": 4.0 - step}
  (events,) = names(f"{root}/tb")
  assert read_events(f"{root}/tb/{events}") == [(1, "train/loss", 3.0), (2, "train/loss", 2.0),
                                                (3, "train/loss", 1.0)]
  with observe.MetricsLogger(root, tensorboard=False, keep_until=2) as log:  # resumed at step 2
    assert observe.read_metrics(root) == [{"step": 1, "train/loss": 3.0},
                                          {"step": 2, "train/loss": 2.0}]
    log.write(3, {"loss": 0.5})
  assert files.read_text(f"{root}/metrics.jsonl") == (
    '{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.0}\n'
    '{"step": 3, "train/loss": 0.5}\n')
  files.write_text(f"{root}/metrics.jsonl", '{"step": 1, "train/loss": 3.0}\n{"step": 2, "tr')
  with observe.MetricsLogger(root, tensorboard=False) as log:  # a killed run's cut-short line
    log.write(2, {"loss": 2.0})
  with pytest.warns(UserWarning, match=r"skipped unparseable lines \[2\]"):
    assert observe.read_metrics(root) == [{"step": 1, "train/loss": 3.0},
                                          {"step": 2, "train/loss": 2.0}]
  with pytest.warns(UserWarning), observe.MetricsLogger(root, tensorboard=False, keep_until=-1):
    pass  # starting over
  assert files.read_text(f"{root}/metrics.jsonl") == ""


def test_plot(root):
  with observe.MetricsLogger(root, tensorboard=False) as log:
    log.write(1, {"loss": 2.0})
    log.write(2, {"loss": 1.0})
  assert observe.plot(root) == f"{root}/curves.png"
  assert files.path(root, "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HF_FILES = ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
            "tokenizer_config.json"]


def test_hf_export_is_the_local_one_byte_for_byte(tiny_dirs, root):
  model, tok = models.load(str(tiny_dirs / "teacher"))  # conftest wrote it with save_hf
  assert models.save_hf(model, tok, f"{root}/hf") == f"{root}/hf"
  assert names(f"{root}/hf") == HF_FILES
  for name in HF_FILES:
    assert files.path(root, "hf", name).read_bytes() == (tiny_dirs / "teacher" / name).read_bytes()
  back, tok2 = models.load(f"{root}/hf")
  assert np.array_equal(np.asarray(back.embed[...]), np.asarray(model.embed[...]))
  assert tok2.encode("The quick brown fox") == tok.encode("The quick brown fox")


def test_a_whole_run_and_its_resume_in_a_gs_workdir(tiny_dirs, tmp_path, gcs, monkeypatch):
  """Teacher-SFT stage (reused and loaded from gs://), eval samples, curves, HF export, summary;
  then a resume to more steps: metrics truncated and continued, the old config kept."""
  local_ckpt = tmp_path / "ckpt"
  monkeypatch.setattr(train, "ckpt_dir", lambda w: str(local_ckpt / w.replace("gs://", "") / "ckpt"))
  w = "gs://bucket/run"
  over = {"teacher.sft.steps": 1, "teacher.sft.top_layers": 1, "train.steps": 2,
          "eval.num_examples": 4, "eval.max_new_tokens": 4, "train.export_hf": True}
  s = train.run(tiny_config(tiny_dirs / "teacher", **over), w)
  assert s["status"] == "done" and s["workdir"] == w
  assert s["teacher_sft"]["dir"] == f"{w}/teacher_sft"
  have = set(names(w))
  assert {"config.json", "summary.json", "metrics.jsonl", "curves.png", "samples_step2.jsonl",
          "tb", "hf", "teacher_sft"} <= have and "ckpt" not in have, have
  assert names(f"{w}/teacher_sft/hf") == HF_FILES
  assert files.read_json(f"{w}/summary.json")["status"] == "done"
  assert files.read_json(f"{w}/config.json")["train"]["steps"] == 2
  samples = [json.loads(x) for x in files.read_text(f"{w}/samples_step2.jsonl").splitlines()]
  assert samples and samples == json.loads(json.dumps(s["samples"]))
  train_rows = lambda: [r["step"] for r in observe.read_metrics(w) if "train/loss" in r]
  assert train_rows() == [1, 2]
  assert models.load(f"{w}/hf")[0].cfg.n_layers == 2
  stage = files.path(w, "teacher_sft", "summary.json").read_bytes()

  s = train.run(tiny_config(tiny_dirs / "teacher", **{**over, "train.steps": 3}), w,
                allow_config_change=True)
  assert s["status"] == "done" and s["start_step"] == 2 and s["step"] == 3
  assert train_rows() == [1, 2, 3]  # step 3 once, rows up to the resumed step kept
  assert files.read_json(f"{w}/config.step2.json")["train"]["steps"] == 2
  assert files.read_json(f"{w}/config.json")["train"]["steps"] == 3
  assert files.path(w, "teacher_sft", "summary.json").read_bytes() == stage  # reused
  assert "samples_step3.jsonl" in names(w)
