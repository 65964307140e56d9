"""Benchmark: unfused (full [N, V] logits) vs fused chunked head + divergence.

For each token count N it times ``jax.value_and_grad`` w.r.t. the student hidden
states and head, and reports XLA's compiled memory (temp + arguments + outputs)
and the process peak RSS. Each (N, path, loss) runs in its own subprocess so
peak RSS is that configuration's alone.

  python benchmarks/divergences.py                      # N in 1024 4096 16384, SmolLM2 shapes
  python benchmarks/divergences.py --sizes 1024 --losses fkl jsd atkd --chunk 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def run_one(n, d, v, path, loss, chunk, repeats):
  import resource

  import jax
  import jax.numpy as jnp
  import psutil

  from gkd_jax import losses
  from gkd_jax.fused import fused_loss

  k = jax.random.split(jax.random.PRNGKey(0), 5)
  hs = jax.random.normal(k[0], (n, d), jnp.float32)
  ws = jax.random.normal(k[1], (d, v), jnp.float32) * d**-0.5
  ht = jax.random.normal(k[2], (n, d), jnp.float32)
  wt = jax.random.normal(k[3], (d, v), jnp.float32) * d**-0.5
  tgt = jax.random.randint(k[4], (n,), 0, v)
  mask = jnp.ones((n,), jnp.float32)
  params = {"jsd": {"beta": 0.5}}.get(loss, {})
  if loss == "atkd":
    params = {"split": "batch"}

  obj = losses.get(loss, **params)

  def unfused(hs, ws):
    total, count, _ = losses.loss_sum(obj, (hs @ ws)[None], (ht @ wt)[None], tgt[None], mask[None])
    return total / jnp.maximum(count, 1.0)

  def fused(hs, ws):
    return fused_loss(hs, ws, ht, wt, mask, tgt, loss=obj, chunk_size=chunk)[0]

  fn = jax.jit(jax.value_and_grad(fused if path == "fused" else unfused, argnums=(0, 1)))
  t0 = time.perf_counter()
  compiled = fn.lower(hs, ws).compile()
  compile_s = time.perf_counter() - t0
  ma = compiled.memory_analysis()
  xla_mb = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes) / 2**20
  row = {"N": n, "path": path, "loss": loss, "compile_s": compile_s, "xla_mb": xla_mb}
  if ma.temp_size_in_bytes > 0.85 * psutil.virtual_memory().available:
    row.update(time_s=float("nan"), rss_mb=float("nan"), note="skipped: does not fit in RAM")
    return row
  jax.block_until_ready(compiled(hs, ws))  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(hs, ws))
    times.append(time.perf_counter() - t0)
  row.update(time_s=sorted(times)[len(times) // 2],
             rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, note="")
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
  ap.add_argument("--d", type=int, default=576)
  ap.add_argument("--v", type=int, default=49152)
  ap.add_argument("--losses", nargs="+", default=["fkl"])
  ap.add_argument("--chunk", type=int, default=1024)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
  a = ap.parse_args()
  if a.one:
    n, path, loss = a.one.split(",")
    print(json.dumps(run_one(int(n), a.d, a.v, path, loss, a.chunk, a.repeats)))
    return
  from gkd_jax.losses import names
  for loss in a.losses:
    if loss not in names():
      sys.exit(f"--losses: unknown loss {loss!r}; allowed: {', '.join(names())}")
  print(f"value_and_grad wrt student hidden+head; D={a.d} V={a.v} chunk={a.chunk} float32, "
        f"{os.cpu_count()} CPU cores, median of {a.repeats}")
  head = (f"{'N':>6} {'loss':>5} {'path':>8} {'time s':>8} {'compile s':>9} {'XLA MB':>9} "
          f"{'peak RSS MB':>11}  {'fused/unfused':>22}")
  print(head)
  print("-" * len(head))
  for n in a.sizes:
    for loss in a.losses:
      rows = {}
      for path in ("unfused", "fused"):
        cmd = [sys.executable, __file__, "--one", f"{n},{path},{loss}", "--d", str(a.d),
               "--v", str(a.v), "--chunk", str(a.chunk), "--repeats", str(a.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
          print(f"{n:>6} {loss:>5} {path:>8}  failed: {out.stderr.strip().splitlines()[-1:]}")
          continue
        r = rows[path] = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = ""
        if path == "fused" and "unfused" in rows:
          u = rows["unfused"]
          ratio = f"time x{r['time_s'] / u['time_s']:.2f}  mem 1/{u['xla_mb'] / r['xla_mb']:.1f}"
        print(f"{n:>6} {loss:>5} {path:>8} {r['time_s']:>8.3f} {r['compile_s']:>9.2f} "
              f"{r['xla_mb']:>9.0f} {r['rss_mb']:>11.0f}  {ratio:>22} {r['note']}", flush=True)


if __name__ == "__main__":
  main()
