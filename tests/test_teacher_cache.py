"""The teacher-logit cache: written, read back, resumed after a kill, checked against the
config that reads it, and a trainer whose dataset steps read a k = V cache trains like one
that runs the live teacher."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from gkd_jax import config as config_lib
from gkd_jax import data, models, sparse, steps, teacher_cache, train
from gkd_jax.data import batching
from test_train import tiny_config

DOCS = [("The council approved a new budget for the city's parks on Monday evening.",
         "Council approves parks budget."),
        ("Heavy rain flooded several roads in the north of the region overnight.",
         "Rain floods northern roads."),
        ("A local bakery won a national prize for its sourdough bread this week.",
         "Bakery wins bread prize."),
        ("The museum will open a new wing dedicated to modern art next spring.",
         "Museum to open modern art wing."),
        ("Scientists found a new species of frog in the rainforest after a long search.",
         "New frog species found."),
        ("The football club signed a young striker from a rival team for a record fee.",
         "Club signs striker for record fee.")]


@pytest.fixture(scope="module")
def small(tiny_dirs, tmp_path_factory):
  """(config factory, teacher path): the tiny teacher on six training pairs."""
  d = tmp_path_factory.mktemp("cache_data")
  path = d / "train.jsonl"
  path.write_text("".join(json.dumps({"document": a, "summary": b}) + "\n" for a, b in DOCS))

  def make(**overrides):
    c = tiny_config(tiny_dirs / "teacher", **{"gkd.lmbda": 0.0, "gkd.loss": "fkl",
                                              "data.batch_size": 4, **overrides})
    c.data.paths.train = str(path)
    return c

  return make, str(tiny_dirs / "teacher")


def _direct(c, teacher_path, k):
  """Each example's (ids, logp, tail) computed here from the teacher's logits."""
  teacher, tok = models.load(teacher_path)
  ex = data.load_examples(c.data.task, c.data.train_split,
                          **data.config_kwargs(c.data, tok, False))
  out = []
  for e in ex:
    b = batching.decoder_batch([e["prompt"]], [e["target"]], pad_id=tok.pad_id,
                               prompt_len=c.data.max_prompt_len, target_len=c.data.max_target_len)
    view = steps.batch_view({key: jnp.asarray(v) for key, v in b.items()}, False, tok.pad_id)
    t = steps.logits(*steps.hidden_and_head(teacher, view))
    ids, logp, tail = sparse.top_k(t, k, temperature=c.gkd.loss_temperature,
                                   always=view["targets"])
    n = len(e["target"])
    out.append((e["target"], np.asarray(ids)[0, :n], np.asarray(logp)[0, :n],
                np.asarray(tail)[0, :n]))
  return out


def test_round_trip_and_resume_after_a_kill(small, tmp_path, monkeypatch):
  make, teacher_path = small
  c = config_lib.validate(make())
  full = str(tmp_path / "full")
  meta = teacher_cache.write(c, full, k=8, dtype="float32", batch_size=4, shard_size=4,
                             progress=False)
  assert meta["complete"] and meta["num_examples"] == 6 and meta["shards"] == [0, 1]
  cache = teacher_cache.Cache(full)
  for e, (tg, ids, logp, tail) in enumerate(_direct(c, teacher_path, 8)):
    got = cache.example(e)
    np.testing.assert_array_equal(got[0], tg)
    np.testing.assert_array_equal(got[1], ids)
    np.testing.assert_allclose(got[2], logp, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[3], tail, rtol=1e-5, atol=1e-6)
    assert np.all(np.any(ids == np.asarray(tg)[:, None], -1))  # the target is kept

  # a writer killed after its first shard resumes at the second; same bytes as uninterrupted
  real = np.savez
  calls = {"n": 0}

  def dying(*a, **kw):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt  # the process dies while writing shard 1
    return real(*a, **kw)

  part = str(tmp_path / "part")
  monkeypatch.setattr(np, "savez", dying)
  with pytest.raises(KeyboardInterrupt):
    teacher_cache.write(c, part, k=8, dtype="float32", batch_size=4, shard_size=4, progress=False)
  monkeypatch.setattr(np, "savez", real)
  assert not json.load(open(os.path.join(part, "meta.json")))["complete"]
  with pytest.raises(ValueError, match="incomplete"):
    teacher_cache.Cache(part)
  teacher_cache.write(c, part, k=8, dtype="float32", batch_size=4, shard_size=4, progress=False)
  for i in (0, 1):
    a, b = np.load(teacher_cache.shard_path(full, i)), np.load(teacher_cache.shard_path(part, i))
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"shard {i} {key}")
  with pytest.raises(ValueError, match="k is 8 in the cache but 4"):
    teacher_cache.write(c, part, k=4, dtype="float32", batch_size=4, shard_size=4,
                        progress=False)

  # bfloat16 log-probs: within bf16 rounding of the float32 ones
  bf = str(tmp_path / "bf16")
  teacher_cache.write(c, bf, k=8, dtype="bfloat16", batch_size=4, shard_size=4, progress=False)
  np.testing.assert_allclose(teacher_cache.Cache(bf).example(3)[2], cache.example(3)[2],
                             rtol=1e-2)


def test_trainer_with_a_full_cache_trains_like_the_live_teacher(small, tmp_path, monkeypatch):
  make, _ = small
  traced = []
  real = steps.cached_divergence_sum
  monkeypatch.setattr(steps, "cached_divergence_sum", lambda *a: traced.append(1) or real(*a))
  overrides = {"train.steps": 2, "optim.warmup_steps": 0}
  cdir = str(tmp_path / "cache")
  teacher_cache.write(config_lib.validate(make(**overrides)), cdir, k=49152, dtype="float32",
                      batch_size=4, shard_size=8, progress=False)
  live = train.run(make(**overrides), str(tmp_path / "live"))
  assert not traced
  cached = train.run(make(**overrides, **{"teacher.cache": cdir, "teacher.live": False}),
                     str(tmp_path / "cached"))
  assert live["status"] == cached["status"] == "done" and traced  # the cached path ran
  lines = lambda w: [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))
                     if "train/loss" in x]
  for i, (a, b) in enumerate(zip(lines(tmp_path / "live"), lines(tmp_path / "cached"),
                                 strict=True)):
    # step 1 (the same parameters): float32 round-off, ~2e-8 at a loss of ~1e-4. Later steps
    # also carry the first update's: Adam divides each gradient entry by its own RMS, so
    # round-off in near-zero entries moves their parameters by up to lr, either way (8.4e-4
    # relative at step 2 on an AVX2 EPYC, below 7e-4 on AVX-512 Xeons)
    rtol, atol = (1e-4, 1e-7) if i == 0 else (3e-3, 0.0)
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=rtol, atol=atol)
    np.testing.assert_allclose(b["train/divergence"], a["train/divergence"], rtol=rtol, atol=atol)
  # the fused chunked head + loss reads the cache too
  fused = train.run(make(**overrides, **{"teacher.cache": cdir, "gkd.fused": True,
                                         "gkd.chunk_size": 16}), str(tmp_path / "fused"))
  assert fused["status"] == "done"
  for a, b in zip(lines(tmp_path / "live"), lines(tmp_path / "fused"), strict=True):
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-3, atol=1e-6)


def test_a_cache_for_another_setting_is_refused_naming_it(small, tmp_path, tiny_dirs):
  make, _ = small
  cdir = str(tmp_path / "cache")
  teacher_cache.write(config_lib.validate(make()), cdir, k=4, dtype="float32", batch_size=4,
                      progress=False)
  other = tmp_path / "other_teacher"  # the same model files but for its config.json
  import shutil
  shutil.copytree(tiny_dirs / "teacher", other)
  cfg = json.loads((other / "config.json").read_text())
  (other / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "another"}))
  for overrides, field in (({"gkd.loss_temperature": 2.0}, "temperature"),
                           ({"data.max_target_len": 10}, "data"),
                           ({"teacher.path": str(other)}, "teacher")):
    c = make(**{"teacher.cache": cdir, **overrides})
    tr = train.Trainer(config_lib.validate(c), str(tmp_path / field))
    with pytest.raises(ValueError, match=f"teacher cache {cdir}: {field} is"):
      tr.setup()
  with pytest.raises(ValueError, match="teacher.live"):  # on-policy steps need the teacher
    config_lib.validate(make(**{"teacher.cache": cdir, "teacher.live": False, "gkd.lmbda": 0.5}))
  with pytest.raises(ValueError, match="config.teacher.cache = .*no meta.json"):
    train.preflight(config_lib.validate(make(**{"teacher.cache": str(tmp_path)})))


def test_cli_names_a_bad_config_in_one_line(tmp_path, capsys):
  assert teacher_cache.main(["--config=no/such.py", f"--out={tmp_path}"]) == 1
  assert "gkd_jax.teacher_cache: error: --config 'no/such.py' does not exist" in capsys.readouterr().err
  cfg = tmp_path / "c.py"
  cfg.write_text("from gkd_jax import config\ndef get_config():\n  return config.defaults()\n")
  assert teacher_cache.main([f"--config={cfg}", f"--out={tmp_path}", "--config.gkd.nope=1"]) == 1
  assert "unknown config key 'gkd.nope'" in capsys.readouterr().err
