"""The trainer end to end on a tiny random teacher (SmolLM2's tokenizer) on 8 fake devices."""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from gkd_jax import config as config_lib
from gkd_jax import models, train
from gkd_jax.models import students

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(teacher_dir, **overrides):
  c = config_lib.defaults()
  c.teacher.path = str(teacher_dir)
  c.student.keep_layers = (0, 2)
  c.data.source = "local"
  c.data.max_prompt_len, c.data.max_target_len, c.data.batch_size = 48, 12, 8
  c.gkd.max_new_tokens = 12
  c.train.steps, c.train.log_every, c.train.ckpt_every = 3, 1, 0
  c.train.export_hf = False
  c.eval.num_examples = 0
  c.mesh.data, c.mesh.model = 4, 2
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


MODES = {
    "lmbda0": ({"gkd.lmbda": 0.0}, {"dataset"}),
    "lmbda_half": ({"gkd.lmbda": 0.5, "train.steps": 4}, {"dataset", "on_policy"}),
    "lmbda1_atkd_fused_bf16_sampling": ({"gkd.lmbda": 1.0, "gkd.loss": "atkd", "gkd.fused": True,
                                         "gkd.sample_dot_dtype": "bfloat16"}, {"on_policy"}),
    "lmbda_half_bf16_dots": ({"gkd.lmbda": 0.5, "train.steps": 4, "teacher.dot_dtype": "bfloat16",
                              "student.dot_dtype": "bfloat16"}, {"dataset", "on_policy"}),
    "seq_kd_rkl": ({"gkd.lmbda": 0.0, "gkd.seq_kd": True, "gkd.loss": "rkl"}, {"teacher"}),
    "rl_rouge_groups": ({"gkd.lmbda": 1.0, "rl.alpha": 0.5, "rl.reward": "rouge",
                         "rl.samples_per_prompt": 2}, {"on_policy"}),
    "rl_token_rkl": ({"gkd.lmbda": 1.0, "rl.alpha": 0.0, "rl.reward": "token_rkl"},
                     {"on_policy"}),
    "sft_accum": ({"mode": "sft", "optim.grad_accum": 2}, {"sft"}),
}


@pytest.mark.parametrize("name", list(MODES))
def test_mode_runs_end_to_end(tiny_dirs, tmp_path, name):
  overrides, sources = MODES[name]
  summary = train.run(tiny_config(tiny_dirs / "teacher", **overrides), str(tmp_path))
  assert summary["status"] == "done" and summary["step"] == overrides.get("train.steps", 3)
  assert set(summary["sources"]) == sources
  lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
  train_lines = [x for x in lines if "train/loss" in x]
  assert len(train_lines) == summary["step"] and all(np.isfinite(x["train/loss"])
                                                     for x in train_lines)
  if name.startswith("rl_rouge"):
    assert "train/reward" in train_lines[-1] and "train/pg" in train_lines[-1]
  assert os.path.isdir(tmp_path / "ckpt" / str(summary["step"]))


def test_bucket_keys_and_eos_stop_reach_the_data_and_the_sampler_and_warm_up_compiles(
    tiny_dirs, tmp_path, monkeypatch):
  from gkd_jax import sampling
  from gkd_jax.data import batching

  seen, real = [], sampling.sample
  monkeypatch.setattr(sampling, "sample", lambda *a, **k: seen.append(k["eos_ids"]) or real(*a, **k))
  widths = {}
  for buckets, ratio, stop in ((1, 2.0, False), (3, 2.0, True), (4, 1.5, False)):
    c = tiny_config(tiny_dirs / "teacher", **{"gkd.lmbda": 1.0, "data.num_buckets": buckets,
                                              "data.bucket_ratio": ratio,
                                              "gkd.sample_stop_at_eos": stop,
                                              "data.max_target_len": 96})
    tr = train.Trainer(c, str(tmp_path / str(buckets)))
    state = tr.setup()
    batches = tr.train_batches(0)
    sizes = batching.bucket_lengths(96, buckets, ratio=ratio)
    for _ in range(6):
      b = next(batches)
      widths.setdefault(buckets, set()).add(b["target_tokens"].shape[1])
      longest = int(b["target_lengths"].max())
      assert b["target_tokens"].shape[1] == min(x for x in sizes if x >= longest)
    batch = next(batches)
    if buckets == 4:  # warm_up compiles the step for this batch, updating nothing
      before = jax.tree.map(np.asarray, state.params)
      assert tr.warm_up(state, batch) is True and tr.warm_up(state, batch) is False
      n = len(tr._step_fn._executables)
      # each donated buffer takes its own leaf's new value (output k <-> input offset + k),
      # not the next leaf of its shape's (new params in the old moments' buffers: XLA copies)
      hlo = next(iter(tr._step_fn._executables.values())).as_text()
      alias = hlo[: hlo.index("entry_computation_layout")]
      pairs = [(int(o), int(i)) for o, i in re.findall(r"\{(\d+)\}: \((\d+),", alias)]
      assert len(pairs) == len(jax.tree.leaves((state.params, state.opt_state)))
      assert {i - o for o, i in pairs} == {pairs[0][1] - pairs[0][0]}, pairs
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    state, _, _ = tr.train_step(state, batch)
    if buckets == 4:
      assert len(tr._step_fn._executables) == n == 1  # the step ran what warm_up compiled
      layout = jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state))
      state, _, _ = tr.train_step(state, batch)  # the new state, laid out as the old one:
      assert len(tr._step_fn._executables) == 1  # no second compile
      assert jax.tree.map(lambda x: x.sharding, (state.params, state.opt_state)) == layout
    tr.ckpt.close()
  assert widths[1] == {96}  # one bucket: always the configured max (XSum summaries are short)
  assert min(widths[3]) < 96  # three (24, 48, 96): short targets pad less
  assert widths[4] <= {32, 48, 64, 96}  # ratio 1.5: 96, 64, 48 (42.7 rounded up), 32
  assert seen == [None, [tr.tokenizer.eos_id]] + [None] * 4  # each warm_up samples too


def test_eval_samples_plot_and_hf_export(tiny_dirs, tmp_path):
  c = tiny_config(tiny_dirs / "teacher", **{"train.steps": 2, "train.sft_warmup_steps": 1,
                                            "eval.num_examples": 8, "eval.max_new_tokens": 6,
                                            "train.export_hf": True})
  s = train.run(c, str(tmp_path))
  assert {"before", "teacher", "after_sft_warmup", "after"} <= set(s["eval"])
  for k in ("rouge2", "teacher_kl"):
    assert np.isfinite(s["eval"]["after"][k])
  assert (tmp_path / "samples_step2.jsonl").exists() and (tmp_path / "curves.png").exists()
  back, tok = models.load(str(tmp_path / "hf"))
  assert back.cfg.n_layers == 2 and tok.vocab_size == 49152


def _cli(cfg_path, workdir, *extra):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  return subprocess.Popen([sys.executable, "-m", "gkd_jax.main", f"--config={cfg_path}",
                           f"--workdir={workdir}", *extra], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _params(workdir, step):
  import orbax.checkpoint as ocp
  d = os.path.join(workdir, "ckpt", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(d)
  return {k: np.asarray(v) for k, v in _flatten(tree["params"]).items()}


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + str(k)] = v
  return out


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tiny_dirs, tmp_path):
  c = tiny_config(tiny_dirs / "teacher", **{"train.steps": 6, "train.ckpt_every": 1,
                                            "optim.lr": 1e30, "optim.warmup_steps": 0,
                                            "optim.clip_norm": 0.0, "gkd.lmbda": 0.0})
  with pytest.raises(FloatingPointError, match=r"or parameters at step (\d+).*last good") as e:
    train.run(c, str(tmp_path))
  bad = int(e.value.args[0].split("at step ")[1].split(";")[0])
  steps_saved = sorted(int(d) for d in os.listdir(tmp_path / "ckpt") if d.isdigit())
  assert steps_saved and max(steps_saved) == bad  # the bad step's update was not saved
  params = _params(tmp_path, max(steps_saved))
  assert all(np.all(np.isfinite(v)) for v in params.values())


@pytest.mark.parametrize("overrides,match", [
    ({"gkd.lmbda": 1.5}, r"config.gkd.lmbda = 1.5: must be a number in \[0, 1\]"),
    ({"gkd.beta": -0.1}, "config.gkd.beta"),
    ({"gkd.loss_temperature": 0.0}, "config.gkd.loss_temperature"),
    ({"gkd.loss": "kl"}, "config.gkd.loss = 'kl'"),
    ({"gkd.sample_dot_dtype": "int8"}, "config.gkd.sample_dot_dtype = 'int8'"),
    ({"teacher.dot_dtype": "int8"}, "config.teacher.dot_dtype = 'int8'"),
    ({"student.dot_dtype": "bf16"}, "config.student.dot_dtype = 'bf16'"),
    ({"data.max_prompt_len": 0}, "config.data.max_prompt_len"),
    ({"data.num_buckets": 0}, "config.data.num_buckets"),
    ({"data.bucket_ratio": 1.0}, r"config.data.bucket_ratio = 1.0: must be a number > 1"),
    ({"rl.alpha": 0.5, "gkd.lmbda": 0.5}, "config.gkd.lmbda.*rl.alpha < 1"),
    ({"mesh.data": 3}, r"config.mesh \(data=3, fsdp=1, model=2\) does not fit the 8"),
    ({"student.init": "path", "student.path": "/nonexistent/ckpt"}, "/nonexistent/ckpt"),
    ({"student.init": "path", "student.path": "OTHER"}, "vocabularies differ"),
])
def test_bad_input_fails_fast(tiny_dirs, tmp_path, overrides, match):
  if overrides.get("student.path") == "OTHER":
    overrides = {**overrides, "student.path": str(tiny_dirs / "other_vocab")}
  t0 = time.time()
  with pytest.raises(ValueError, match=match):
    train.run(tiny_config(tiny_dirs / "teacher", **overrides), str(tmp_path / "w"))
  assert time.time() - t0 < 30  # before any compile or data work


def test_unknown_key_and_unwritable_workdir(tiny_dirs, tmp_path):
  c = tiny_config(tiny_dirs / "teacher")
  c.gkd.lambda_ = 0.5
  with pytest.raises(ValueError, match="unknown config key.*gkd.lambda_"):
    train.run(c, str(tmp_path))
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ValueError, match="workdir .* is not writable"):
    train.run(tiny_config(tiny_dirs / "teacher"), str(blocker / "sub"))


def test_cli_rejects_bad_overrides(tmp_path):
  from gkd_jax import main
  with pytest.raises(ValueError, match="unknown config key 'gkd.nope'"):
    main.apply_overrides(config_lib.defaults(), main.gin_overrides(["gkd.nope = 1"]))
  c = main.apply_overrides(config_lib.defaults(),
                           main.gin_overrides(["gkd.lmbda = 0.25\nstudent.keep_layers = (1, 2)"]))
  assert c.gkd.lmbda == 0.25 and tuple(c.student.keep_layers) == (1, 2)
  proc = _cli(tmp_path / "missing.py", tmp_path / "w")
  out = proc.communicate()[0]
  assert proc.returncode != 0 and "missing.py" in out


def test_teacher_has_its_own_dtype_and_sharding_rules(tiny_dirs, tmp_path):
  c = tiny_config(tiny_dirs / "teacher", **{"teacher.param_dtype": "bfloat16",
                                            "teacher.rules": (("vocab", None),)})
  tr = train.Trainer(config_lib.validate(c), str(tmp_path))
  state = tr.setup()
  t_embed, s_embed = tr.teacher[1]["embed"][...], state.params["embed"][...]
  assert t_embed.dtype == np.dtype("bfloat16") and s_embed.dtype == np.float32
  assert t_embed.sharding.spec[0] is None  # the teacher's rule: vocab replicated
  assert s_embed.sharding.spec[0] == "model"  # the student keeps the default rule


def test_auto_dot_dtype_is_resolved_before_the_models_are_built(tiny_dirs, tmp_path, monkeypatch):
  from gkd_jax.models import numerics
  monkeypatch.setattr(numerics, "native_bf16_dots", lambda platform=None: True)
  c = tiny_config(tiny_dirs / "teacher", **{"teacher.dot_dtype": "auto",
                                            "student.dot_dtype": "auto"})
  tr = train.Trainer(config_lib.validate(c), str(tmp_path))
  state = tr.setup()
  assert tr.config.teacher.dot_dtype == tr.config.student.dot_dtype == "bfloat16"
  assert nnx.merge(*tr.teacher).cfg.dot_dtype == "bfloat16"
  assert tr.teacher[1]["embed"][...].dtype == np.dtype("bfloat16")  # stored in its dot dtype
  assert nnx.merge(*tr.student(state)).cfg.dot_dtype == "bfloat16"
  assert c.student.dot_dtype == "auto"  # the user's config is not changed


def test_student_scan_layers_is_the_same_student_scanned(tiny_dirs):
  from gkd_jax.models import convert_llama
  c = tiny_config(tiny_dirs / "teacher")
  teacher, _ = models.load(str(tiny_dirs / "teacher"))
  plain = students.build_student(c.student, teacher, c.seed)
  c.student.scan_layers = True
  scanned = students.build_student(config_lib.validate(c).student, teacher, c.seed)
  assert scanned.cfg.scan_layers and not plain.cfg.scan_layers
  assert not isinstance(scanned.layers, nnx.List) and isinstance(plain.layers, nnx.List)
  want = convert_llama.flat_params(plain)
  got = convert_llama.flat_params(scanned)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  tokens = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
  np.testing.assert_allclose(scanned(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
  c.train.top_layers = 1
  with pytest.raises(ValueError, match="student.scan_layers"):
    config_lib.validate(c)


def test_teacher_scan_layers_is_the_same_teacher_scanned(tiny_dirs):
  import ml_collections
  from gkd_jax.models import convert_llama
  teacher, _ = models.load(str(tiny_dirs / "teacher"))
  t = ml_collections.ConfigDict({"scan_layers": True, "dot_dtype": ""})
  scanned = students.frozen_teacher(teacher, t)
  assert scanned.cfg.scan_layers and not teacher.cfg.scan_layers
  assert not isinstance(scanned.layers, nnx.List)
  want, got = convert_llama.flat_params(teacher), convert_llama.flat_params(scanned)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  tokens = np.arange(1, 25, dtype=np.int32).reshape(2, 12)
  np.testing.assert_allclose(scanned(tokens), teacher(tokens), rtol=1e-5, atol=1e-5)
  t.dot_dtype = "bfloat16"  # both: scanned, and its matrices stored in bfloat16
  both = students.frozen_teacher(teacher, t)
  assert both.cfg.scan_layers and both.cfg.dot_dtype == "bfloat16"
  assert both.layers.w_up[...].dtype == np.dtype("bfloat16")
  t.scan_layers = False
  np.testing.assert_array_equal(both(tokens), students.frozen_teacher(teacher, t)(tokens))


def test_trainer_with_a_scanned_teacher_trains_like_the_unrolled_one(tiny_dirs, tmp_path):
  """On-policy, dataset and SeqKD steps (the teacher samples through its per-layer caches)."""
  losses = {}
  for scan in (False, True):
    c = tiny_config(tiny_dirs / "teacher", **{"gkd.lmbda": 0.5, "gkd.seq_kd": True,
                                              "train.steps": 4, "teacher.scan_layers": scan})
    tr = train.Trainer(config_lib.validate(c), str(tmp_path / f"setup{scan}"))
    tr.setup()
    assert nnx.merge(*tr.teacher).cfg.scan_layers == scan
    tr.ckpt.close()
    summary = train.run(c, str(tmp_path / str(scan)))
    assert summary["status"] == "done" and set(summary["sources"]) == {"on_policy", "teacher"}
    lines = [json.loads(x) for x in open(tmp_path / str(scan) / "metrics.jsonl")]
    losses[scan] = [x["train/loss"] for x in lines if "train/loss" in x]
  assert len(losses[True]) == 4
  # step 1: the same parameters, so the same loss up to float32 round-off; later steps within
  # Adam's amplification of it (see test_teacher_cache)
  np.testing.assert_allclose(losses[True][0], losses[False][0], rtol=1e-5)
  np.testing.assert_allclose(losses[True], losses[False], rtol=3e-3)


def test_teacher_scan_layers_is_checked():
  import ml_collections
  from gkd_jax.models.t5 import T5, T5Config
  c = config_lib.defaults()
  with pytest.raises(ValueError, match="config key 'teacher.scan_layers'"):
    config_lib.set_keys(c, [("teacher.scan_layers", "yes")], source="--set")
  t5 = T5(T5Config(vocab_size=32, d_model=16, d_kv=4, n_heads=2, d_ff=24, n_encoder_layers=1,
                   n_decoder_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="teacher.scan_layers=True is for decoder-only"):
    students.frozen_teacher(t5, ml_collections.ConfigDict({"scan_layers": True, "dot_dtype": ""}))


def test_sample_dot_dtype_is_refused_for_encoder_decoder_before_training():
  from gkd_jax.models.t5 import T5, T5Config
  t5 = T5(T5Config(vocab_size=32, d_model=16, d_kv=4, n_heads=2, d_ff=32, n_encoder_layers=1,
                   n_decoder_layers=1, rel_buckets=8, rel_max_distance=16), rngs=nnx.Rngs(0))
  students.check_pair(t5, t5, None)  # fine without it
  with pytest.raises(ValueError, match="gkd.sample_dot_dtype='bfloat16' is for decoder-only"):
    students.check_pair(t5, t5, None, "bfloat16")


def test_teacher_sft_stage_is_cached_reused_and_checked(tiny_dirs, tmp_path):
  """teacher.sft.steps > 0: the run fine-tunes the teacher in teacher.sft.dir, distils from its
  export, writes summary.json with the primary metric; a second run with another seed and loss
  reuses the stage untouched; a changed stage setting there fails naming the key."""
  stage = tmp_path / "stage"
  c = tiny_config(tiny_dirs / "teacher", **{
      "teacher.sft.steps": 2, "teacher.sft.top_layers": 1, "teacher.sft.dir": str(stage),
      "train.steps": 1, "eval.num_examples": 4, "eval.max_new_tokens": 4})
  s = train.run(c, str(tmp_path / "a"))
  saved = json.load(open(tmp_path / "a" / "summary.json"))
  assert saved["primary_metric"] == s["primary_metric"] == "rouge2"
  assert saved["teacher_sft"]["dir"] == str(stage) and saved["teacher_sft"]["steps"] == 2
  assert {"before", "teacher", "after"} <= set(saved["eval"])
  assert saved["eval"]["teacher"] == saved["teacher_sft"]["after_sft"]  # scored once, reused
  tuned, _ = models.load(str(stage / "hf"))
  base, _ = models.load(str(tiny_dirs / "teacher"))
  moved = lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b))
  assert moved(tuned.layers[3].wq[...], base.layers[3].wq[...])  # top layer trained
  assert not moved(tuned.layers[0].wq[...], base.layers[0].wq[...])  # frozen below
  assert not moved(tuned.embed[...], base.embed[...])
  stamp = os.stat(stage / "summary.json").st_mtime_ns
  c2 = tiny_config(tiny_dirs / "teacher", **{
      "teacher.sft.steps": 2, "teacher.sft.top_layers": 1, "teacher.sft.dir": str(stage),
      "train.steps": 1, "seed": 3, "gkd.loss": "rkl"})
  assert train.run(c2, str(tmp_path / "b"))["status"] == "done"
  assert os.stat(stage / "summary.json").st_mtime_ns == stamp
  c3 = tiny_config(tiny_dirs / "teacher", **{
      "teacher.sft.steps": 2, "teacher.sft.lr": 1e-3, "teacher.sft.dir": str(stage)})
  with pytest.raises(ValueError, match=r"teacher.sft.dir .* other settings \(optim.lr"):
    train.run(c3, str(tmp_path / "c"))
