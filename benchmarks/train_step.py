"""Benchmark: one full on-policy GKD step for the demo's teacher/student pair.

Teacher SmolLM2-135M-Instruct (30 layers), student its pruned copy (the demo's keep_layers), batch 8
ChatML prompts, 128 new tokens sampled by the student at temperature 1, JSD(0.5).
Times (median of --repeats after a warm-up) are split into sampling, the teacher
forward, and the student forward+backward+update (the jitted train step minus its
teacher forward). tokens/s counts sampled tokens per second of the whole step.

  python benchmarks/train_step.py [--batch 8] [--new 128] [--fused] [--sample-dot-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _median(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--fused", action="store_true", help="use the fused chunked head + loss")
  ap.add_argument("--sample-dot-dtype", default="", help="gkd.sample_dot_dtype ('' or bfloat16)")
  a = ap.parse_args()

  import jax
  import numpy as np
  from flax import nnx

  from benchmarks.sampling import QUESTIONS
  from configs import demo
  from gkd_jax import sampling, steps
  from gkd_jax.models import load
  from gkd_jax.models.convert_llama import prune_layers

  c = demo.get_config()
  c.gkd.fused = a.fused
  teacher, tok = load(c.teacher.path)
  student = prune_layers(teacher, list(c.student.keep_layers))
  ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8]}]))
         for i in range(a.batch)]
  p = max(map(len, ids))
  prompts = np.array([x + [tok.pad_id] * (p - len(x)) for x in ids], np.int32)
  lengths = np.array([len(x) for x in ids], np.int32)
  spec = steps.LossSpec.from_config(c)
  opt = steps.make_optimizer(c)
  gd, params = nnx.split(student)
  tg, tp = nnx.split(teacher)
  opt_state = opt.init(params)
  key = jax.random.PRNGKey(0)

  def do_sample():
    out = sampling.sample(student, prompts, lengths, rng=key, max_new_tokens=a.new,
                          eos_ids=None, pad_id=tok.pad_id, dot_dtype=a.sample_dot_dtype or None)
    return jax.block_until_ready(out)

  out = do_sample()
  view = steps.samples_view(prompts, lengths, out.tokens, out.mask, False, tok.pad_id)
  teacher_fwd = jax.jit(lambda g, tp, v: steps.hidden_and_head(nnx.merge(g, tp), v)[0],
                        static_argnums=0)
  step = jax.jit(steps.train_step, static_argnames=("graphdef", "teacher_graphdef", "spec",
                                                    "optimizer", "grad_accum"))
  run_step = lambda: jax.block_until_ready(step(gd, params, opt_state, tg, tp, view, view,
                                                jax.numpy.zeros(a.batch), spec=spec,
                                                optimizer=opt, grad_accum=1))
  t_sample = _median(do_sample, a.repeats)
  t_teacher = _median(lambda: jax.block_until_ready(teacher_fwd(tg, tp, view)), a.repeats)
  t_step = _median(run_step, a.repeats)
  total = t_sample + t_step
  n_tok = a.batch * a.new
  print(f"on-policy GKD step: teacher 30 layers, student {len(c.student.keep_layers)} layers, "
        f"batch {a.batch}, {a.new} new tokens, sequence {view['tokens'].shape[1]}, "
        f"loss {c.gkd.loss}{' fused' if a.fused else ''}, {os.cpu_count()} CPU cores")
  how = f", {a.sample_dot_dtype} matmuls" if a.sample_dot_dtype else ""
  rows = [(f"sampling (student, lax.scan + KV cache{how})", t_sample),
          ("teacher forward", t_teacher),
          ("student forward + backward + update", t_step - t_teacher),
          ("whole step", total)]
  print(f"{'part':<58} {'seconds':>8} {'share':>7}")
  print("-" * 75)
  for name, t in rows:
    print(f"{name:<58} {t:>8.2f} {100 * t / total:>6.0f}%")
  print(f"sampled tokens/s over the whole step: {n_tok / total:.1f}")


if __name__ == "__main__":
  main()
