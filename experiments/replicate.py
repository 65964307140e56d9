"""Mini-replication of GKD (lambda x divergence) and ATKD (vs its base KD) on one teacher/student.

  python experiments/replicate.py [--grid=configs/replication.py[:accelerator]] [--out=DIR]
  python experiments/replicate.py --cell=jsd0.9-l1 --seed=0     # one cell alone; prints its row
  python experiments/replicate.py --list                         # the cells and their state
  python experiments/replicate.py --report                       # rewrite results/ only

Stages, each cached under --out (default runs/replication-<scale>) and reused by every cell:
  teacher_sft/   the teacher fine-tuned on the task (the trainer's teacher-SFT stage)
  student_sft/   the pruned student after SFT (its hf/ export starts every cell)
  cells/NAME/seedS/   one trainer run per cell and seed (resumable; summary.json when done)
A finished cell drops its checkpoints (its summary and row remain).
Every cell trains the same number of steps on the same batch size from the same SFT'd student;
the seed changes the data order and the sampling keys. A finished cell is skipped on re-runs.
Results (--results, default results/): replication.csv (one row per cell and seed),
replication.md (mean and 95% t-interval per cell, wall time, the papers' claims checked) and
replication.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FIELDS = ("cell", "lmbda", "loss", "seed", "metric", "value", "teacher_kl", "steps", "wall_s")


def _copy(c):
  import ml_collections
  return ml_collections.ConfigDict(c.to_dict())


def stage_configs(grid, out):
  """(student-SFT config, its workdir): the pruned student's SFT on top of the teacher stage."""
  c = _copy(grid.base)
  c.teacher.sft.dir = os.path.join(out, "teacher_sft")
  c.mode = "sft"
  c.train.steps = grid.student_sft_steps
  c.train.export_hf = True
  c.eval.at_start = True  # the pruned student before SFT
  return c, os.path.join(out, "student_sft")


def cell_config(grid, out, name, seed):
  overrides = dict(grid.cells)[name]
  c = _copy(grid.base)
  c.teacher.sft.dir = os.path.join(out, "teacher_sft")
  c.student.init, c.student.path = "path", os.path.join(out, "student_sft", "hf")
  c.seed = seed
  from gkd_jax import config as config_lib
  return config_lib.set_keys(c, overrides, source=f"grid cell {name!r}")


def cell_dir(out, name, seed):
  return os.path.join(out, "cells", name, f"seed{seed}")


def _summary(workdir):
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    s = json.load(f)
  return s if s.get("status") == "done" and "after" in s.get("eval", {}) else None


def ensure_stages(grid, out):
  from gkd_jax import train
  c, sdir = stage_configs(grid, out)
  if _summary(sdir) is None:
    train.run(c, sdir)
  return _summary(sdir)


def row(name, seed, c, summary):
  metric = summary["primary_metric"]
  after = summary["eval"]["after"]
  return {"cell": name, "lmbda": c.gkd.lmbda if c.mode == "gkd" else "", "seed": seed,
          "loss": c.gkd.loss if c.mode == "gkd" else "sft", "metric": metric,
          "value": round(after[metric], 4), "teacher_kl": round(after.get("teacher_kl", float("nan")), 4),
          "steps": summary["step"], "wall_s": round(summary.get("wall_s", float("nan")), 1),
          "machine": summary.get("machine", "")}


def machine() -> str:
  """The CPU (or accelerator) a cell ran on: results are exact only on the same kind."""
  import platform
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
  except (OSError, StopIteration):
    pass
  import jax
  return f"{model}, {os.cpu_count()} cores, {jax.devices()[0].platform}"


def run_cell(grid, out, name, seed, workdir=None):
  """Trains and scores one cell (skipped when its summary exists) -> its result row."""
  from gkd_jax import train
  c = cell_config(grid, out, name, seed)
  workdir = workdir or cell_dir(out, name, seed)
  summary = _summary(workdir)
  if summary is None:
    summary = train.run(c, workdir)
    if summary["status"] != "done":
      raise RuntimeError(f"cell {name} seed {seed} stopped: {summary['status']}")
    summary["machine"] = machine()
    train.write_summary(workdir, summary)
  drop_checkpoints(workdir)
  return row(name, seed, c, summary)


def drop_checkpoints(workdir):
  """A finished cell keeps its summary, metrics and samples, not its checkpoints (~1.8 GB each
  at the CPU scale): its row is final and a re-run skips it by its summary."""
  import shutil
  shutil.rmtree(os.path.join(workdir, "ckpt"), ignore_errors=True)


def order(grid):
  """Seed-major: every cell once before any second seed, so partial results cover the grid."""
  return [(name, seed) for seed in grid.seeds for name, _ in grid.cells]


# Config keys added after the CPU grid's first results, with the value that changes nothing:
# left out of the fingerprint at that value, so committed results stay valid.
NEUTRAL = {
  ("gkd", "loss_kw"): {},
  ("student", "scan_layers"): False,
  ("teacher", "cache"): "",
  ("teacher", "live"): True,
  ("data", "tokenized_dir"): "",
}


def fingerprint(grid) -> str:
  """A hash of everything that decides a cell's result (the base config, stages, cells)."""
  import hashlib
  base = grid.base.to_dict()
  for (section, key), value in NEUTRAL.items():
    if base.get(section, {}).get(key, value) == value:
      base.get(section, {}).pop(key, None)
  doc = json.dumps({"base": base, "student_sft_steps": grid.student_sft_steps,
                    "cells": [[n, list(map(list, kw))] for n, kw in grid.cells]},
                   sort_keys=True, default=str)
  return hashlib.sha256(doc.encode()).hexdigest()[:16]


def committed_rows(grid, results):
  """Rows of an earlier sitting's results/replication.csv (a fresh clone has no runs/), after
  checking that the same grid made them; {} when there is none."""
  path, meta = os.path.join(results, "replication.csv"), os.path.join(results, "replication.json")
  if not os.path.isfile(path):
    return {}
  made_by = None
  if os.path.isfile(meta):
    with open(meta) as f:
      made_by = json.load(f).get("fingerprint")
  if made_by != fingerprint(grid):
    raise SystemExit(f"{path} was written by another grid config (fingerprint {made_by} != "
                     f"{fingerprint(grid)}); pass another --results directory or move it away")
  with open(meta) as f:
    machines = json.load(f).get("machines", {})
  with open(path, newline="") as f:
    return {(r["cell"], int(r["seed"])): {**r, "seed": int(r["seed"]),
                                          "machine": machines.get(f"{r['cell']}/seed{r['seed']}", "")}
            for r in csv.DictReader(f)}


def collect(grid, out, earlier=None):
  """Result rows in grid order: finished cells under ``out``, else rows of an earlier sitting."""
  rows = []
  for name, seed in order(grid):
    s = _summary(cell_dir(out, name, seed))
    if s is not None:
      rows.append(row(name, seed, cell_config(grid, out, name, seed), s))
    elif earlier and (name, seed) in earlier:
      rows.append(earlier[(name, seed)])
  return rows


# ------------------------------------------------------------------------------ reports
def interval(values):
  """(mean, half-width of the 95% t-interval); half-width nan for a single value."""
  from scipy import stats
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, float("nan")
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def by_cell(rows, key="value"):
  out = {}
  for r in rows:
    out.setdefault(r["cell"], {})[r["seed"]] = float(r[key])
  return out


def paired(values, a, b):
  """Mean and 95% interval of (a - b) over the seeds both cells have."""
  seeds = sorted(set(values.get(a, {})) & set(values.get(b, {})))
  if not seeds:
    return None
  return interval([values[a][s] - values[b][s] for s in seeds]) + (len(seeds),)


def _fmt(mi):
  m, h = mi[0], mi[1]
  return f"{m:.2f}" if math.isnan(h) else f"{m:.2f} ± {h:.2f}"


def verdict(diff):
  """'agrees' / 'disagrees' / 'inconclusive' for a claimed positive difference."""
  if diff is None:
    return "not run yet"
  m, h, n = diff
  if n < 2:
    return f"n={n} seed: {'leans yes' if m > 0 else 'leans no'}"
  if m - h > 0:
    return "agrees"
  if m + h < 0:
    return "disagrees"
  return "inconclusive (interval spans 0)"


def claims(grid, rows, metric):
  v = by_cell(rows)
  lines = [f"Differences in {metric} (higher is better), paired by seed, mean ± 95% t-interval.", "",
           "| claim | difference | verdict |", "| --- | --- | --- |"]
  for div in ("fkl", "rkl", "jsd0.1", "jsd0.9"):
    for a, b, what in ((f"{div}-l1", f"{div}-l0.5", "on-policy > mixed"),
                       (f"{div}-l0.5", f"{div}-l0", "mixed > off-policy"),
                       (f"{div}-l1", f"{div}-l0", "on-policy > off-policy (supervised KD)")):
      d = paired(v, a, b)
      lines.append(f"| {div}: {what} | {_fmt(d) if d else '-'} | {verdict(d)} |")
  for lm in ("0", "1"):
    d = paired(v, f"atkd-l{lm}", f"fkl-l{lm}")
    lines.append(f"| ATKD > its base KD (FKL), lambda {lm} | {_fmt(d) if d else '-'} | {verdict(d)} |")
  for name in [n for n, _ in grid.cells if n != "sft"]:
    d = paired(v, name, "sft")
    lines.append(f"| {name} > SFT alone (same steps) | {_fmt(d) if d else '-'} | {verdict(d)} |")
  best = {}
  for lm in ("0", "0.5", "1"):
    means = {div: interval(list(v[f"{div}-l{lm}"].values()))[0]
             for div in ("fkl", "rkl", "jsd0.1", "jsd0.9") if v.get(f"{div}-l{lm}")}
    if means:
      best[lm] = max(means, key=means.get)
  lines += ["", "Best divergence by mean, per lambda: " +
            (", ".join(f"lambda {k}: {b}" for k, b in best.items()) or "-") +
            ". The papers' claim that the best divergence depends on the task and the sampling "
            "temperature cannot be tested by this grid: it has one task (XSum) and one sampling "
            "temperature (1.0); the ranking above is the finding for this task."]
  return lines


def write_results(grid, rows, results, stages=None, title=""):
  os.makedirs(results, exist_ok=True)
  with open(os.path.join(results, "replication.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(results, "replication.json"), "w") as f:
    json.dump({"fingerprint": fingerprint(grid), "scale": grid.scale, "runs_done": len(rows),
               "runs_total": len(order(grid)), "stages": dict(stages or []),
               "machines": {f"{r['cell']}/seed{r['seed']}": r.get("machine", "") for r in rows}},
              f, indent=2)
  metric = rows[0]["metric"] if rows else "metric"
  v, kl, wall = by_cell(rows), by_cell(rows, "teacher_kl"), by_cell(rows, "wall_s")
  lines = [f"# Replication grid{title}", "",
           f"Written by `python experiments/replicate.py --grid configs/replication.py"
           f"{'' if grid.scale == 'cpu' else ':' + grid.scale}` (seeds "
           f"{', '.join(map(str, grid.seeds))}; each seed sets the data order and the sampling "
           f"keys; one row: `--cell NAME --seed S`); "
           f"{len(rows)} of {len(order(grid))} runs done. Test split, {metric} of greedy decodes; "
           "teacher_kl = KL(teacher || student) per token on the references. "
           "Mean ± 95% t-interval over seeds. Ran on: " +
           "; ".join(sorted({r.get("machine") or "?" for r in rows})) + ".", ""]
  if stages:
    lines += ["| reference point | " + metric + " | teacher_kl |", "| --- | --- | --- |"]
    for label, m in stages:
      if m:
        skl = f"{m['teacher_kl']:.3f}" if "teacher_kl" in m else "-"
        lines.append(f"| {label} | {m.get(metric, float('nan')):.2f} | {skl} |")
    lines.append("")
  lines += [f"| cell | lambda | loss | seeds | {metric} | teacher_kl | wall s / run |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
  ordered = [n for n, _ in grid.cells if n in v]
  for name in ordered:
    r = next(x for x in rows if x["cell"] == name)
    lines.append(f"| {name} | {r['lmbda']} | {r['loss']} | {len(v[name])} | "
                 f"{_fmt(interval(list(v[name].values())))} | "
                 f"{_fmt(interval(list(kl[name].values())))} | "
                 f"{interval(list(wall[name].values()))[0]:.0f} |")
  lines += ["", "## The papers' claims at this scale", ""] + claims(grid, rows, metric)
  with open(os.path.join(results, "replication.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(grid, rows, os.path.join(results, "replication.png"), metric)


def plot(grid, rows, path, metric):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  v = by_cell(rows)
  names = [n for n, _ in grid.cells if n in v]
  fig, ax = plt.subplots(figsize=(max(4, 0.55 * len(names) + 1), 3.6))
  stats_ = [interval(list(v[n].values())) for n in names]
  ax.bar(range(len(names)), [m for m, _ in stats_],
         yerr=[0 if math.isnan(h) else h for _, h in stats_], capsize=3,
         color=["#888" if n == "sft" else "#c64" if n.startswith("atkd") else "#47a" for n in names])
  for i, n in enumerate(names):
    ax.plot([i] * len(v[n]), list(v[n].values()), "k.", ms=3)
  ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel(f"{metric} (test)")
  ax.set_title("GKD/ATKD replication: mean, 95% interval, seeds", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def load_grid(spec):
  from gkd_jax import config as config_lib
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    raise SystemExit(f"--grid {path!r} does not exist")
  return config_lib.from_file(spec)


def stage_rows(out, results=None):
  """(label, eval metrics) for the teacher and the student stages: from their runs under
  ``out``, else as an earlier sitting recorded them in ``results``/replication.json."""
  s = _summary(os.path.join(out, "student_sft"))
  if s is None:
    meta = os.path.join(results or "", "replication.json")
    if results and os.path.isfile(meta):
      with open(meta) as f:
        return list(json.load(f).get("stages", {}).items())
    return []
  t = s.get("teacher_sft") or {}
  return [("teacher, zero-shot", t.get("zero_shot")), ("teacher after SFT", t.get("after_sft")),
          ("pruned student", s["eval"].get("before")), ("student after SFT (every cell's start)",
                                                        s["eval"].get("after"))]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--grid", default=os.path.join(ROOT, "configs", "replication.py"))
  ap.add_argument("--out", default=None, help="stage/cell directory (default runs/replication-SCALE)")
  ap.add_argument("--results", default=os.path.join(ROOT, "results"))
  ap.add_argument("--cell", default=None, help="run only this cell (with --seed)")
  ap.add_argument("--seed", type=int, default=None)
  ap.add_argument("--fresh", action="store_true",
                  help="with --cell: re-train into a temporary dir, ignoring a finished result")
  ap.add_argument("--list", action="store_true")
  ap.add_argument("--report", action="store_true",
                  help="only rewrite --results from the finished cells (trains nothing)")
  a = ap.parse_args(argv)
  grid = load_grid(a.grid)
  out = os.path.abspath(a.out or os.path.join(ROOT, "runs", f"replication-{grid.scale}"))
  names = [n for n, _ in grid.cells]
  if a.cell is not None and a.cell not in names:
    raise SystemExit(f"--cell {a.cell!r} is not in the grid; cells: {', '.join(names)}")
  if (a.cell is None) != (a.seed is None):
    raise SystemExit("--cell and --seed go together")
  if a.list:
    for name, seed in order(grid):
      print(f"{name:<12} seed {seed}: {'done' if _summary(cell_dir(out, name, seed)) else '-'}")
    return 0
  if a.report:
    rows = collect(grid, out, committed_rows(grid, a.results))
    write_results(grid, rows, a.results, stage_rows(out, a.results))
    print(open(os.path.join(a.results, "replication.md")).read())
    return 0
  import logging
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  ensure_stages(grid, out)
  if a.cell is not None:
    workdir = None
    if a.fresh:
      import tempfile
      workdir = tempfile.mkdtemp(prefix=f"cell-{a.cell}-")
    try:
      r = run_cell(grid, out, a.cell, a.seed, workdir)
    finally:
      if workdir is not None:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
    print(",".join(FIELDS))
    print(",".join(str(r[k]) for k in FIELDS))
    return 0
  run_grid(grid, out, a.results)
  print(open(os.path.join(a.results, "replication.md")).read())
  return 0


def run_grid(grid, out, results):
  """Every (cell, seed) not yet done, seed-major; the results are rewritten after each run.
  Cells already in ``results``/replication.csv (an earlier sitting) are not run again."""
  earlier = committed_rows(grid, results)
  ensure_stages(grid, out)
  for name, seed in order(grid):
    if (name, seed) not in earlier:
      run_cell(grid, out, name, seed)
    write_results(grid, collect(grid, out, earlier), results, stage_rows(out, results))
  rows = collect(grid, out, earlier)
  write_results(grid, rows, results, stage_rows(out, results))
  return rows


if __name__ == "__main__":
  sys.exit(main())
