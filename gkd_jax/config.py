"""The trainer's config schema: defaults (every key that exists) and validation.

Experiment files in ``configs/`` start from ``defaults()`` and override fields;
``validate(config)`` runs before any model is loaded or anything compiles, and
rejects unknown keys and out-of-range values with the dotted key in the message.
"""

from __future__ import annotations

import json
import math

import ml_collections

from gkd_jax import atkd
from gkd_jax import divergences as dv
from gkd_jax import losses

MODES = ("gkd", "sft")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine")
STUDENT_INITS = ("path", "prune", "fresh")
DOT_DTYPE_KEYS = ("gkd.sample_dot_dtype", "teacher.dot_dtype", "student.dot_dtype")


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "gkd"  # "gkd" (distil) or "sft" (cross-entropy on dataset targets)
  c.seed = 0

  c.teacher = ml_collections.ConfigDict()
  c.teacher.path = "smollm2-135m-instruct"  # HF dir, .gguf file or alias
  c.teacher.dtype = "float32"  # compute dtype
  c.teacher.param_dtype = "float32"
  # "" = the teacher's own numerics; "bfloat16": its weight matmuls take bfloat16 inputs with
  # float32 accumulation (a TPU's default precision) and, as it is frozen, its matrices are
  # stored in bfloat16 (half the bytes; the same numbers its matmuls read). Decoder-only.
  # "auto": "bfloat16" where the backend multiplies bfloat16 natively (TPU, GPU, a CPU with
  # AMX-BF16 or AVX512-BF16; ``numerics.native_bf16_dots``), else "". Likewise for
  # student.dot_dtype and gkd.sample_dot_dtype; encoder-decoder models resolve it to "".
  c.teacher.dot_dtype = ""
  c.teacher.rules = ()  # extra logical-axis rules for the teacher only (after mesh.rules)
  # Llama family: the frozen teacher's layers as one scanned block in its forward passes (one
  # layer compiled, not n: faster compiles for deep teachers, less host memory on CPU); the same
  # numbers up to float32 round-off. Sampling (SeqKD) runs them unrolled over per-layer caches.
  c.teacher.scan_layers = False
  # A teacher-logit cache (python -m gkd_jax.teacher_cache): dataset (off-policy) steps read
  # the teacher's top-k log-probs from it instead of running the teacher; on-policy and SeqKD
  # steps still score with the live teacher, unless live=False, which refuses them.
  c.teacher.cache = ""
  c.teacher.live = True
  # Teacher SFT stage: with steps > 0 the run first fine-tunes the teacher on the task's train
  # split (cross-entropy, batch data.batch_size, optim.* except lr) in `dir` and distils from
  # that. `dir` ("" = WORKDIR/teacher_sft) is a cache: re-runs and every run of a sweep that
  # point at it reuse the finished stage; a different stage config there is an error.
  c.teacher.sft = ml_collections.ConfigDict()
  c.teacher.sft.steps = 0
  c.teacher.sft.lr = 5e-5
  c.teacher.sft.dir = ""
  c.teacher.sft.top_layers = 0  # > 0: fine-tune only the teacher's top n layers (cheaper)
  c.teacher.sft.seed = 0  # the stage's data order (independent of the distillation's seed)
  c.teacher.sft.zero_shot_eval = True  # also score the teacher before its fine-tuning

  c.student = ml_collections.ConfigDict()
  c.student.init = "prune"  # "path" (load student.path), "prune" (teacher layers), "fresh"
  c.student.path = ""
  c.student.keep_layers = (0, 3, 6, 9, 12, 15, 18, 21, 24, 29)
  c.student.overrides = ml_collections.ConfigDict()  # for "fresh": e.g. n_layers, d_model
  c.student.dtype = "float32"
  c.student.param_dtype = "float32"
  # "" = its own numerics; "bfloat16": the student's weight matmuls (forward and backward,
  # training and sampling) take bfloat16 inputs with float32 accumulation, a TPU's default
  # precision; parameters, gradients and Adam stay in param_dtype. Decoder-only.
  c.student.dot_dtype = ""
  c.student.remat = False
  # with remat, what each layer saves for its backward pass (Llama family): "full" nothing
  # (least memory), "dots" its weight matmuls' outputs (the backward recomputes only attention
  # and elementwise ops: faster, more memory)
  c.student.remat_policy = "full"
  # Llama family: the layers as one scanned block (one layer compiled, not n: faster compiles
  # for deep students); not with train.top_layers.
  c.student.scan_layers = False

  c.data = ml_collections.ConfigDict()
  c.data.task = "xsum"
  c.data.source = ""  # "" = the task's default (local files when present), "tfds", "local"
  c.data.data_dir = ""
  c.data.paths = ml_collections.ConfigDict()  # split -> file path overrides
  # Tokenized examples, read with NumPy alone when this directory holds the file of the run's
  # data settings, else written there (gkd_jax.data.tokenized): TF-free hosts read them.
  c.data.tokenized_dir = ""
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.prompt_format = "chat"  # "chat" (instruct decoder) or "t5" (prefixes)
  c.data.max_prompt_len = 256
  c.data.max_target_len = 64
  c.data.overlong = "truncate"
  # prompt and target lengths pad to one of num_buckets sizes (max_len / bucket_ratio**i,
  # multiples of 8): fewer pad tokens, at most num_buckets**2 compiled step shapes
  c.data.num_buckets = 3
  c.data.bucket_ratio = 2.0
  c.data.batch_size = 8  # global batch (all hosts)

  c.gkd = ml_collections.ConfigDict()
  c.gkd.lmbda = 0.5  # probability of an on-policy (student-sampled) batch
  c.gkd.seq_kd = False  # off-policy batches use teacher samples instead of dataset targets
  c.gkd.sample_temperature = 1.0
  # "" = the model's own numerics; "bfloat16": bf16 matmul inputs; "auto" (see teacher.dot_dtype)
  c.gkd.sample_dot_dtype = ""
  c.gkd.max_new_tokens = 64
  c.gkd.sample_stop_at_eos = True  # False: every row samples max_new_tokens (EOS is a token)
  c.gkd.top_k = 0
  c.gkd.top_p = 1.0
  c.gkd.loss = "jsd"  # a gkd_jax.losses name: fkl | rkl | jsd | tvd | skl | srkl | atkd
  # The loss's parameters (the fields of its gkd_jax.losses class), e.g. {"beta": 0.9}; they
  # win over the flat aliases below (gkd.beta, gkd.alpha, gkd.easy_weight, gkd.atkd_*).
  c.gkd.loss_kw = ml_collections.ConfigDict()
  c.gkd.beta = 0.5  # jsd
  c.gkd.alpha = 0.1  # skl / srkl
  c.gkd.loss_temperature = 1.0
  c.gkd.reduction = "token"  # token | sequence
  c.gkd.ce_weight = 0.0  # + ce_weight * cross-entropy on dataset targets
  c.gkd.fused = False  # chunked head + loss (never holds [N, V] logits)
  c.gkd.chunk_size = 1024
  c.gkd.easy_weight = 0.2  # atkd
  c.gkd.hard_fraction = 0.5  # atkd
  c.gkd.atkd_split = "batch"  # atkd: one u threshold per batch (official) | sequence
  c.gkd.atkd_base = "fkl"  # atkd

  c.rl = ml_collections.ConfigDict()
  c.rl.alpha = 1.0  # loss = (1-alpha)*policy-gradient + alpha*divergence; 1 = no RL
  c.rl.reward = "gsm8k_correct"  # a rewards.py name, "module:function", or "token_rkl"
  c.rl.samples_per_prompt = 1  # > 1: per-prompt group-mean baseline
  c.rl.baseline = "mean"  # mean | none

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-4
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = 10
  c.optim.end_lr_fraction = 0.1
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.clip_norm = 1.0  # 0 = off
  c.optim.grad_accum = 1  # micro-batches per optimizer step (batch_size divisible by it)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.sft_warmup_steps = 0  # the first steps train with cross-entropy (a warm start)
  c.train.top_layers = 0  # > 0: train only the top n decoder layers + final norm (rest frozen)
  c.train.log_every = 10
  c.train.eval_every = 0  # 0 = only at the end
  c.train.ckpt_every = 50  # 0 = only at the end
  c.train.keep_ckpts = 2
  c.train.export_hf = True  # export the final student to workdir/hf

  c.eval = ml_collections.ConfigDict()
  c.eval.num_examples = 32
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 64
  c.eval.temperature = 0.0
  c.eval.beam_size = 0  # > 0: beam search (translation)
  c.eval.num_samples_logged = 3
  c.eval.teacher = True  # evaluate the teacher once
  c.eval.at_start = True  # evaluate the student before training (fresh runs)
  c.eval.teacher_kl = True  # student rows also report the teacher-student token KL

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices left after fsdp and model
  c.mesh.fsdp = 1
  c.mesh.model = 1
  c.mesh.rules = ()  # overrides of gkd_jax.sharding's logical axis rules: ((name, axes), ...)
  return c


def set_keys(config, pairs, source="override"):
  """Sets ``[(dotted_key, value)]`` on ``config`` in place; an unknown key raises ValueError.

  New keys may be added under the free-form dicts (``data.paths.NAME``, ``student.overrides.NAME``).
  """
  for key, value in pairs:
    node, parts = config, key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ValueError(f"{source}: unknown config key {key!r}")
      node = node[p]
    if parts[-1] not in node and not (len(parts) > 1 and parts[-2] in _FREE):
      raise ValueError(f"{source}: unknown config key {key!r}")
    if isinstance(node.get(parts[-1]), bool) and value in ("true", "false"):
      value = value == "true"
    if isinstance(node.get(parts[-1]), tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: config key {key!r}: {e}") from None
  return config


def flatten(d, prefix="") -> dict:
  """{dotted key: value} of a nested config dict (tuples as lists, as in JSON)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = list(v) if isinstance(v, tuple) else v
  return out


def from_file(spec: str):
  """``path/NAME.py[:ARG]`` -> the file's ``get_config(ARG)`` (``get_config()`` without ARG);
  ValueError when the file does not exist."""
  import importlib.util
  import os

  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ValueError(f"--config {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_gkd_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def with_defaults(recorded: dict) -> dict:
  """A recorded config (a run's config.json) with the keys it lacks, those added to the schema
  after it was written, at their defaults: a new key's default keeps the old behaviour."""

  def merge(base, over):
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out

  return merge(json.loads(defaults().to_json_best_effort()), recorded)


def config_diff(a: dict, b: dict, ignore=()) -> list[str]:
  """Dotted keys whose values differ between two config dicts (keys starting with ``ignore``)."""
  fa, fb = flatten(a), flatten(b)
  keys = sorted(set(fa) | set(fb))
  return [k for k in keys if fa.get(k) != fb.get(k) and not k.startswith(tuple(ignore))]


def _keys(c, prefix=""):
  out = set()
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict) and k not in _FREE:
      out |= _keys(v, prefix + k + ".")
    else:
      out.add(prefix + k)
  return out


_FREE = ("overrides", "paths", "loss_kw")  # free-form sub-dicts


def get(c, dotted):
  """config[a][b] for dotted="a.b"."""
  for part in dotted.split("."):
    c = c[part]
  return c


def resolve_dot_dtypes(config, encoder_decoder: bool) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each "auto" in ``DOT_DTYPE_KEYS`` resolved for this backend
  (``numerics.resolve_dot_dtype``); encoder-decoder models (no dot_dtype policy) get ""."""
  from gkd_jax.models import numerics

  c = config.copy_and_resolve_references()
  for k in DOT_DTYPE_KEYS:
    section, name = k.split(".")
    if c[section][name] == "auto":
      c[section][name] = "" if encoder_decoder else numerics.resolve_dot_dtype("auto")
  return c


def dot_dtypes(config) -> dict:
  """``DOT_DTYPE_KEYS`` -> their values ("" shown as "own"), e.g. what "auto" became."""
  return {k: get(config, k) or "own" for k in DOT_DTYPE_KEYS}


def validate(config) -> ml_collections.ConfigDict:
  """Raises ValueError naming the first bad key; returns the config for chaining."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(
      f"the config is a {type(config).__name__}, not an ml_collections.ConfigDict: "
      "get_config() should return gkd_jax.config.defaults() with changes"
    )
  have, want = _keys(config), _keys(defaults())
  unknown = sorted(have - want)
  if unknown:
    raise ValueError(f"unknown config key(s): {', '.join(unknown)} (see gkd_jax/config.py)")
  missing = sorted(want - have)
  if missing:
    shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    raise ValueError(
      f"the config lacks key(s) {shown}: start it from gkd_jax.config.defaults() and change fields"
    )
  value = lambda k: get(config, k)

  def need(key, ok, what):
    if not ok:
      raise ValueError(f"config.{key} = {value(key)!r}: must be {what}")

  def unit(key):
    v = value(key)
    need(key, isinstance(v, (int, float)) and 0.0 <= v <= 1.0, "a number in [0, 1]")

  def positive(key, integer=True, zero=False):
    v = value(key)
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    ok = ok and not isinstance(v, bool) and (v >= 0 if zero else v > 0)
    need(key, ok, ("an int" if integer else "a number") + (" >= 0" if zero else " > 0"))

  need("mode", config.mode in MODES, f"one of {MODES}")
  need(
    "seed",
    isinstance(config.seed, int) and not isinstance(config.seed, bool) and 0 <= config.seed < 2**32,
    "an int in [0, 2**32)",
  )
  need("student.init", config.student.init in STUDENT_INITS, f"one of {STUDENT_INITS}")
  if config.student.init == "path":
    need("student.path", bool(config.student.path), "a model path when student.init='path'")
  for k in (
    "gkd.lmbda",
    "gkd.beta",
    "gkd.alpha",
    "gkd.easy_weight",
    "gkd.hard_fraction",
    "rl.alpha",
    "gkd.top_p",
  ):
    unit(k)
  need("gkd.top_p", config.gkd.top_p > 0, "in (0, 1]")
  need("gkd.loss", config.gkd.loss in losses.names(), f"one of {losses.names()}")
  need("gkd.reduction", config.gkd.reduction in dv.REDUCTIONS, f"one of {dv.REDUCTIONS}")
  need("gkd.atkd_split", config.gkd.atkd_split in atkd.SPLITS, f"one of {atkd.SPLITS}")
  need("gkd.atkd_base", config.gkd.atkd_base in atkd.BASES, f"one of {atkd.BASES}")
  losses.from_config(config.gkd)  # the loss's own checks, naming gkd.loss_kw
  for k in ("gkd.loss_temperature", "optim.lr", "teacher.sft.lr"):
    positive(k, integer=False)
    need(k, math.isfinite(value(k)), "finite")
  positive("gkd.sample_temperature", integer=False)
  need("gkd.sample_temperature", math.isfinite(config.gkd.sample_temperature), "finite")
  for k in ("optim.b1", "optim.b2"):
    v = value(k)
    need(
      k,
      isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
      "a number in [0, 1)",
    )
  for k in DOT_DTYPE_KEYS:
    need(
      k,
      value(k) in ("", "float32", "bfloat16", "float16", "auto"),
      "'' (the model's own numerics), 'float32', 'bfloat16', 'float16' or 'auto'",
    )
  v = value("data.bucket_ratio")
  need(
    "data.bucket_ratio",
    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1,
    "a number > 1",
  )
  positive("eval.temperature", integer=False, zero=True)
  positive("gkd.ce_weight", integer=False, zero=True)
  positive("optim.weight_decay", integer=False, zero=True)
  positive("optim.clip_norm", integer=False, zero=True)
  positive("gkd.top_k", zero=True)
  for k in (
    "gkd.max_new_tokens",
    "gkd.chunk_size",
    "data.max_prompt_len",
    "data.max_target_len",
    "data.num_buckets",
    "data.batch_size",
    "train.steps",
    "train.log_every",
    "train.keep_ckpts",
    "eval.batch_size",
    "eval.max_new_tokens",
    "optim.grad_accum",
    "rl.samples_per_prompt",
  ):
    positive(k)
  for k in (
    "teacher.sft.steps",
    "train.eval_every",
    "train.ckpt_every",
    "train.sft_warmup_steps",
    "train.top_layers",
    "teacher.sft.top_layers",
    "teacher.sft.seed",
    "optim.warmup_steps",
    "eval.num_examples",
    "eval.beam_size",
    "eval.num_samples_logged",
  ):
    positive(k, zero=True)
  if config.teacher.cache:
    need("mode", config.mode == "gkd", "'gkd' with teacher.cache")
  if not config.teacher.live:
    need("teacher.cache", bool(config.teacher.cache), "a cache directory when teacher.live=False")
    need(
      "gkd.lmbda",
      config.gkd.lmbda == 0.0 and not config.gkd.seq_kd,
      "0 and gkd.seq_kd False when teacher.live=False (on-policy and SeqKD steps need the "
      "live teacher to score the samples)",
    )
  need("teacher.scan_layers", isinstance(config.teacher.scan_layers, bool), "True or False")
  need(
    "student.scan_layers",
    isinstance(config.student.scan_layers, bool)
    and not (config.student.scan_layers and config.train.top_layers),
    "True or False, and False when train.top_layers > 0 (freezing needs per-layer parameters)",
  )
  need(
    "student.remat_policy",
    config.student.remat_policy in ("full", "dots")
    and (config.student.remat or config.student.remat_policy == "full"),
    "'full' or 'dots', and 'full' unless student.remat=True (it is what a rematerialised "
    "layer saves)",
  )
  if config.mode == "gkd":
    need(
      "train.sft_warmup_steps",
      config.train.sft_warmup_steps < config.train.steps,
      f"< train.steps={config.train.steps} (it would leave no distillation step; "
      "for cross-entropy only use mode='sft')",
    )
  need("optim.name", config.optim.name in OPTIMIZERS, f"one of {OPTIMIZERS}")
  need("optim.schedule", config.optim.schedule in SCHEDULES, f"one of {SCHEDULES}")
  unit("optim.end_lr_fraction")
  need(
    "data.batch_size",
    config.data.batch_size % config.optim.grad_accum == 0,
    f"divisible by optim.grad_accum={config.optim.grad_accum}",
  )
  spp = config.rl.samples_per_prompt
  need(
    "data.batch_size",
    config.data.batch_size % spp == 0,
    f"divisible by rl.samples_per_prompt={spp}",
  )
  need("rl.baseline", config.rl.baseline in ("mean", "none"), "mean or none")
  if config.rl.alpha < 1.0:
    need(
      "gkd.lmbda",
      config.gkd.lmbda == 1.0,
      "1.0 when rl.alpha < 1 (the policy gradient needs student samples every step)",
    )
    need("mode", config.mode == "gkd", "'gkd' when rl.alpha < 1")
  for axis in ("data", "fsdp", "model"):
    v = value(f"mesh.{axis}")
    need(
      f"mesh.{axis}",
      isinstance(v, int) and (v >= 1 or (axis == "data" and v == -1)),
      "a positive int (data may be -1: all remaining devices)",
    )
  return config
