"""Benchmark: where our side of ``vs_trl.py`` holds host memory, phase by phase.

The same work and config as ``benchmarks/vs_trl.py``'s side (tokenized first, in this process;
then the training runs in a child process that imports no TensorFlow): setup, then per prompt
width the rollout (the sampler's first call: compile + run) and the train step's compile, then
``--steps`` steps, each split into rollout and update. Per phase it prints the peak RSS (the
kernel's high-water mark, reset after each phase through /proc/self/clear_refs) and the memory
still held after the phase once ``hostmem.release`` has trimmed the heap. Linux only. GiB.

  python benchmarks/host_memory.py [--steps 4] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(__file__))

import vs_trl  # noqa: E402


def _status_kb(key):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key):
        return int(line.split()[1])
  raise RuntimeError(f"no {key} in /proc/self/status")


def child(work):
  import jax

  from gkd_jax import hostmem, train

  def phase(name):
    peak, held = _status_kb("VmHWM:"), _status_kb("VmRSS:")
    hostmem.release()
    trimmed = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS
    gib = lambda kb: f"{kb / 2**20:.2f}"
    print(f"| {name} | {gib(peak)} | {gib(held)} | {gib(trimmed)} |", flush=True)

  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  c = vs_trl.our_config(work["steps"], work["data"], [tuple(kv) for kv in work["sets"]])
  tr = train.Trainer(c, tempfile.mkdtemp(dir=work["tmp"], prefix="ours_"))
  print("| phase | peak RSS | RSS after | RSS after release |\n|---|---|---|---|")
  state = tr.setup()
  phase("setup")
  it = tr.train_batches(0)
  batches = [next(it) for _ in range(work["steps"])]
  widths = []
  for b in batches:
    w = b["prompt_tokens"].shape[1]
    if w in widths:
      continue
    widths.append(w)
    rolled, kw = tr._rolled(state, b)
    jax.block_until_ready(rolled.view)
    phase(f"warm-up {w}: rollout (sampler compile + run)")
    tr._step_fn.compile(**kw)
    phase(f"warm-up {w}: step compile")
    del rolled, kw
  for i, b in enumerate(batches):
    rolled, kw = tr._rolled(state, b)
    jax.block_until_ready(rolled.view)
    phase(f"step {i} (width {b['prompt_tokens'].shape[1]}): rollout")
    opt_state, params, _ = tr._step_fn(**kw)
    jax.block_until_ready(params)
    state = state._replace(params=params, opt_state=opt_state, step=state.step + 1)
    del rolled, kw
    phase(f"step {i}: update")
  tr.ckpt.close()


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--steps", type=int, default=4, help="training steps after the warm-up")
  ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
  ap.add_argument("--child", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:
    with open(a.child) as f:
      return child(json.load(f))
  if not os.path.exists("/proc/self/clear_refs"):
    raise SystemExit("host_memory.py needs Linux's /proc/self/clear_refs")
  if a.steps < 1:
    raise SystemExit(f"--steps must be >= 1, got {a.steps}")
  from gkd_jax import models

  tmp = tempfile.mkdtemp(prefix="host_memory_")
  sets = vs_trl.parse_sets(a.sets)
  data = vs_trl.choose_data(os.path.abspath(a.data_dir), tmp)
  c = vs_trl.our_config(a.steps, data, sets)
  _, tok = models.load(c.teacher.path, dtype="float32", param_dtype="float32")
  data["tokenized_dir"] = vs_trl.pretokenize(c, tok, tmp)
  work = {"steps": a.steps, "data": data, "sets": sets, "tmp": tmp}
  path = os.path.join(tmp, "work.json")
  with open(path, "w") as f:
    json.dump(work, f)
  print(f"## Host memory of our vs_trl side, by phase (GiB; {vs_trl.cpu_model()})\n", flush=True)
  t0 = time.perf_counter()
  subprocess.run([sys.executable, __file__, "--child", path], check=True)
  print(f"\n{time.perf_counter() - t0:.0f} s; overrides: {sets or 'none'}")


if __name__ == "__main__":
  main()
