"""experiments/replicate.py on a tiny two-cell grid: stages, cells, skip/resume, results, rerun."""

import csv
import importlib.util
import os

import gguf
import ml_collections
import pytest
from flax import nnx

from gkd_jax import config as config_lib
from gkd_jax import models
from gkd_jax.models.llama import Llama, LlamaConfig
from gkd_jax.tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = LlamaConfig(vocab_size=49152, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                   mlp_dim=64, max_seq_len=128, tie_embeddings=True, rms_eps=1e-5)


def _replicate():
  spec = importlib.util.spec_from_file_location("replicate", os.path.join(ROOT, "experiments",
                                                                          "replicate.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_grid(teacher_dir):
  c = config_lib.defaults()
  c.teacher.path = str(teacher_dir)
  c.teacher.sft.steps = 0  # the stage cache has its own test (test_train.py)
  c.student.keep_layers = (0, 2)
  c.data.source, c.data.eval_split = "local", "test"
  c.data.max_prompt_len, c.data.max_target_len, c.data.batch_size = 32, 8, 4
  c.gkd.max_new_tokens = 8
  c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.export_hf = 2, 1, 0, False
  c.eval.num_examples, c.eval.batch_size, c.eval.max_new_tokens = 4, 4, 4
  c.eval.at_start, c.eval.teacher = False, False
  c.mesh.data, c.mesh.model = 4, 2
  g = ml_collections.ConfigDict()
  g.scale, g.base, g.student_sft_steps, g.seeds = "tiny", c, 1, (0,)
  g.cells = (("sft", (("mode", "sft"),)), ("fkl-l0", (("gkd.loss", "fkl"), ("gkd.lmbda", 0.0))))
  return g


def test_two_cell_grid_with_resume(tmp_path):
  tok = Tokenizer.from_gguf_metadata(gguf.GGUFReader(models.alias_path("smollm2-135m-instruct")))
  models.save_hf(Llama(TINY, rngs=nnx.Rngs(0)), tok, str(tmp_path / "teacher"))
  rep, grid = _replicate(), tiny_grid(tmp_path / "teacher")
  out, results = str(tmp_path / "out"), str(tmp_path / "results")

  rep.ensure_stages(grid, out)
  first = rep.run_cell(grid, out, "sft", 0)  # a partial run: one cell of two
  assert first["cell"] == "sft" and first["steps"] == 2 and first["loss"] == "sft"
  done = os.path.join(rep.cell_dir(out, "sft", 0), "summary.json")
  assert not os.path.exists(os.path.join(rep.cell_dir(out, "sft", 0), "ckpt"))  # disk: dropped
  assert os.path.isdir(os.path.join(out, "student_sft", "hf"))  # the stage every cell starts from
  stamp = os.stat(done).st_mtime_ns
  stage_stamp = os.stat(os.path.join(out, "student_sft", "summary.json")).st_mtime_ns

  rows = rep.run_grid(grid, out, results)  # resumes: the finished cell and stages are reused
  assert os.stat(done).st_mtime_ns == stamp
  assert os.stat(os.path.join(out, "student_sft", "summary.json")).st_mtime_ns == stage_stamp
  assert [r["cell"] for r in rows] == ["sft", "fkl-l0"]
  with open(os.path.join(results, "replication.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["cell"] for r in table] == ["sft", "fkl-l0"] and set(table[0]) == set(rep.FIELDS)
  assert table[1]["lmbda"] == "0.0" and table[1]["loss"] == "fkl"
  assert all(float(r["teacher_kl"]) > 0 and r["metric"] == "rouge2" for r in table)
  md = open(os.path.join(results, "replication.md")).read()
  assert "| fkl-l0 | 0.0 | fkl | 1 |" in md and "fkl-l0 > SFT alone" in md
  assert os.path.getsize(os.path.join(results, "replication.png")) > 1000

  # a later sitting on a fresh clone (no runs/): the committed csv's rows are kept, not re-run
  import shutil
  shutil.rmtree(rep.cell_dir(out, "fkl-l0", 0))
  key = lambda rs: [(r["cell"], int(r["seed"]), float(r["value"]), float(r["teacher_kl"])) for r in rs]
  assert key(rep.run_grid(grid, out, results)) == key(rows)
  assert not os.path.exists(rep.cell_dir(out, "fkl-l0", 0))
  other = tiny_grid(tmp_path / "teacher")
  same = rep.fingerprint(other)
  other.base.gkd.loss_kw = {}  # a key at its neutral value changes nothing
  assert rep.fingerprint(other) == same
  other.base.gkd.loss_kw = {"beta": 0.9}
  assert rep.fingerprint(other) != same
  other.base.optim.lr = 1e-3
  with pytest.raises(SystemExit, match="another grid config"):
    rep.run_grid(other, out, results)

  # one cell alone, re-trained from scratch, reproduces its committed row exactly
  again = rep.run_cell(grid, out, "fkl-l0", 0, workdir=str(tmp_path / "again"))
  assert again["value"] == rows[1]["value"] and again["teacher_kl"] == rows[1]["teacher_kl"]


def test_grid_config_and_cli_errors(capsys):
  rep = _replicate()
  grid = rep.load_grid(os.path.join(ROOT, "configs", "replication.py"))
  names = [n for n, _ in grid.cells]
  assert len(names) == 15 and names[0] == "sft" and {"atkd-l0", "atkd-l1", "jsd0.9-l0.5"} <= set(names)
  for name in names:  # every cell is a valid trainer config
    config_lib.validate(rep.cell_config(grid, "/tmp/x", name, 0))
  assert rep.cell_config(grid, "/tmp/x", "jsd0.1-l1", 2).gkd.beta == 0.1
  with pytest.raises(SystemExit, match="not in the grid"):
    rep.main(["--cell", "nope", "--seed", "0"])
  with pytest.raises(SystemExit, match="go together"):
    rep.main(["--cell", "sft"])
  with pytest.raises(ValueError, match="unknown scale"):
    rep.load_grid(os.path.join(ROOT, "configs", "replication.py") + ":huge")
