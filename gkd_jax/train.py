"""The distillation trainer: GKD (on/off/mixed policy), ATKD, RL+GKD and SFT.

Data flows one way each step: dataset batch -> (student or teacher) samples ->
teacher/student forward -> loss -> optax update -> metrics / checkpoint.

Determinism: the step's data source (on-policy with probability ``gkd.lmbda``) and
its sampling key are functions of (seed, step), and the data stream is a function
of (seed, step), so every host agrees and a resumed run repeats an uninterrupted
one exactly.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from gkd_jax import config as config_lib
from gkd_jax import evaluation, files, models, sampling, sharding, steps

log = logging.getLogger("gkd_jax")


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions, ...)."""


# Config keys that do not change the trained weights: a run may resume with other values (logged),
# and a teacher-SFT stage is shared across them. mesh.* changes only the layout.
RESULT_FREE = (
  "eval.",
  "data.eval_split",
  "data.data_dir",
  "data.paths",
  "teacher.sft.dir",
  "teacher.sft.zero_shot_eval",
  "train.log_every",
  "train.ckpt_every",
  "train.keep_ckpts",
  "train.eval_every",
  "train.export_hf",
  "mesh.",
)


# ------------------------------------------------------------------------ setup
def check_workdir(workdir: str) -> str:
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    # one probe per process: several processes may check a shared workdir at once
    probe = os.path.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e
  return workdir


def _model_path_exists(path: str) -> bool:
  return path in models.ALIASES or os.path.exists(path)


def preflight(c) -> None:
  """The checks that need no model: mesh, data task, format, source and files (read and parsed),
  model paths, pruning. Runs before any model loads or anything compiles; errors name the config
  key, or the file (and line).
  """
  from gkd_jax.data import batching, tasks

  make_mesh(c)
  d = c.data
  try:
    spec = tasks.get_spec(d.task)
  except ValueError as e:
    raise ValueError(f"config.data.task = {d.task!r}: {e}") from None
  try:
    source = tasks.choose_source(spec, d.source or None, d.data_dir, dict(d.paths))
  except ValueError as e:
    raise ValueError(f"config.data.source = {d.source!r}: {e}") from None
  if d.prompt_format not in tasks.PROMPT_FORMATS:
    raise ValueError(
      f"config.data.prompt_format = {d.prompt_format!r}: must be one of {tasks.PROMPT_FORMATS}"
    )
  if d.overlong not in batching.OVERLONG:
    raise ValueError(
      f"config.data.overlong = {d.overlong!r}: must be one of {tuple(batching.OVERLONG)}"
    )
  if source == "local":  # the files are read (and parsed) now; the pipeline reads them again
    for split in dict.fromkeys([d.train_split] + ([d.eval_split] if c.eval.num_examples else [])):
      if not spec.read_local(split, d.data_dir or None, dict(d.paths) or None):
        raise ValueError(f"config.data: split {split!r} of task {d.task!r} has no examples")
  for key in ("teacher.path",) + (("student.path",) if c.student.init == "path" else ()):
    path = config_lib.get(c, key)
    if not _model_path_exists(path):
      raise ValueError(
        f"config.{key} = {path!r}: no such file, directory or model alias "
        f"({sorted(models.ALIASES)})"
      )
  if c.student.init == "prune":
    keep = list(c.student.keep_layers)
    bad = [i for i in keep if not isinstance(i, int) or isinstance(i, bool) or i < 0]
    if not keep or bad or len(set(keep)) != len(keep):
      raise ValueError(
        f"config.student.keep_layers = {tuple(keep)}: must be distinct layer indices >= 0"
      )
    n = models.layer_count(c.teacher.path)
    if n is not None and max(keep) >= n:
      raise ValueError(
        f"config.student.keep_layers = {tuple(keep)}: the teacher has {n} "
        f"layers (indices 0..{n - 1})"
      )


def make_mesh(c):
  n = jax.device_count()
  fsdp, model = c.mesh.fsdp, c.mesh.model
  data = c.mesh.data if c.mesh.data != -1 else n // (fsdp * model)
  if data < 1 or data * fsdp * model != n:
    raise ValueError(
      f"config.mesh (data={c.mesh.data}, fsdp={fsdp}, model={model}) does not "
      f"fit the {n} available devices"
    )
  return sharding.make_mesh({"data": data, "fsdp": fsdp, "model": model})


def build_student(c, teacher):
  s = c.student
  if s.init == "path":
    student, _ = models.load(s.path, dtype=s.dtype, param_dtype=s.param_dtype)
  elif steps.is_encoder_decoder(teacher):
    raise ValueError(
      f"config.student.init must be 'path' for encoder-decoder teachers (got {s.init!r})"
    )
  else:
    from gkd_jax.models import convert_llama

    if s.init == "prune":
      student = convert_llama.prune_layers(teacher, list(s.keep_layers))
    else:
      cfg = convert_llama.smaller_config(teacher.cfg, **dict(s.overrides))
      from gkd_jax.models.llama import Llama

      student = Llama(cfg, rngs=nnx.Rngs(c.seed))
  if hasattr(student.cfg, "remat") and not steps.is_encoder_decoder(student):
    cfg = dataclasses.replace(student.cfg, dtype=s.dtype, param_dtype=s.param_dtype, remat=s.remat)
    if cfg != student.cfg:
      from gkd_jax.models import convert_llama

      student = convert_llama.model_from_flat(cfg, convert_llama.flat_params(student))
  return student


def check_pair(teacher, student, tokenizer, sample_dot_dtype=""):
  tv, sv = teacher.cfg.vocab_size, student.cfg.vocab_size
  if tv != sv:
    raise ValueError(
      f"teacher and student vocabularies differ ({tv} vs {sv}): token-level "
      "distillation needs a shared vocabulary"
    )
  if steps.is_encoder_decoder(teacher) != steps.is_encoder_decoder(student):
    raise ValueError("teacher and student must both be decoder-only or both encoder-decoder")
  if tokenizer is not None and tokenizer.vocab_size > tv:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the models only {tv} logits"
    )
  if sample_dot_dtype and steps.is_encoder_decoder(student):
    raise ValueError(
      f"gkd.sample_dot_dtype={sample_dot_dtype!r} is for decoder-only models; "
      "set it to '' for encoder-decoder (T5) runs"
    )


def step_source(seed: int, step: int, lmbda: float, seq_kd: bool) -> str:
  """ "on_policy" with probability lmbda, else "teacher" (SeqKD) or "dataset"; same on every host."""
  if np.random.default_rng([seed, step, 0x6B64]).random() < lmbda:
    return "on_policy"
  return "teacher" if seq_kd else "dataset"


def to_host(x):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


class Batches:
  """Places host-local numpy batches on the mesh as global arrays (batch axis sharded).

  With several processes, a numpy array holds this process's rows of the global batch,
  or (global_data=True) the whole global batch, the same on every process; a jax.Array
  is already global and is only resharded.
  """

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __call__(self, batch, global_data=False):
    if jax.process_count() == 1:
      return sharding.shard_batch(batch, self.mesh, self.rules)

    def put(x):
      if isinstance(x, jax.Array):
        shape = x.shape
      else:
        x = np.asarray(x)
        shape = x.shape if global_data else (x.shape[0] * jax.process_count(),) + x.shape[1:]
      spec = sharding.logical_to_sharding(
        ("batch",) + (None,) * (x.ndim - 1), self.mesh, self.rules, shape
      )
      if isinstance(x, jax.Array):
        return jax.device_put(x, spec)
      return jax.make_array_from_process_local_data(spec, x, shape)

    return jax.tree.map(put, batch)

  def replicated(self, batch):
    """Global arrays held whole by every process (host-side code can read them), from
    numpy arrays that are the same on every process or from global jax.Arrays."""
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def put(x):
      if isinstance(x, jax.Array):
        return jax.device_put(x, rep)
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(rep, x, x.shape)

    return jax.tree.map(put, batch)


# ------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class Trainer:
  config: object
  workdir: str
  teacher_path: str = ""  # "" = config.teacher.path (the teacher-SFT stage sets its export)

  def setup(self):
    c = self.config
    self.is_main = jax.process_index() == 0
    self.mesh = make_mesh(c)
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    micro = c.data.batch_size // c.optim.grad_accum
    if micro % shards:
      log.warning(
        "the (micro-)batch of %d rows does not divide over the %d batch shards (mesh "
        "data x fsdp): every device computes the whole batch; use a multiple of %d",
        micro,
        shards,
        shards,
      )
    self.rules = sharding.make_rules(c.mesh.rules)
    self.place = Batches(self.mesh, self.rules)
    self.teacher, self.tokenizer = models.load(
      self.teacher_path or c.teacher.path, dtype=c.teacher.dtype, param_dtype=c.teacher.param_dtype
    )
    if self.tokenizer is None:
      raise ValueError(f"teacher {c.teacher.path!r} has no tokenizer files; the trainer needs one")
    self.student = build_student(c, self.teacher)
    check_pair(self.teacher, self.student, self.tokenizer, c.gkd.sample_dot_dtype)
    self.encdec = steps.is_encoder_decoder(self.student)
    teacher_rules = sharding.make_rules(list(c.mesh.rules) + list(c.teacher.rules))
    sharding.shard_model(self.teacher, self.mesh, teacher_rules)
    sharding.shard_model(self.student, self.mesh, self.rules)
    self.eos = [self.tokenizer.eos_id]
    self.pad = self.tokenizer.pad_id
    self.spec = steps.LossSpec.from_config(c)
    self.optimizer = steps.make_optimizer(c)
    self.graphdef, self.params = nnx.split(self.student)
    self.t_graphdef, self.t_params = nnx.split(self.teacher)
    self.opt_state = self.on_mesh(jax.jit(self.optimizer.init)(self.params))
    self._step_fn = jax.jit(
      steps.train_step,
      static_argnames=("graphdef", "teacher_graphdef", "spec", "optimizer", "grad_accum"),
      donate_argnums=(1, 2),
    )
    self.ckpt = ocp.CheckpointManager(
      os.path.join(self.workdir, "ckpt"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=c.train.keep_ckpts, enable_async_checkpointing=True
      ),
    )
    self.saved_step = None  # the newest step on disk (restored or saved by this process)
    self.reward_fn = None
    if self.spec.rl_alpha < 1 and not self.spec.token_rkl_reward:
      from gkd_jax import rewards

      self.reward_fn = rewards.get_reward(c.rl.reward)

  def on_mesh(self, tree):
    """Leaves not laid out on the mesh (e.g. optimizer step counts) become replicated on it."""
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    fix = lambda x: (
      x
      if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
      else jax.device_put(x, rep)
    )
    return jax.tree.map(fix, tree)

  # -- data ---------------------------------------------------------------------------
  def data_kwargs(self, split):
    c = self.config.data
    return dict(
      tokenizer=self.tokenizer,
      model_kind="encdec" if self.encdec else "decoder",
      prompt_format=c.prompt_format,
      source=c.source or None,
      data_dir=c.data_dir or None,
      paths=dict(c.paths) or None,
      max_prompt_len=c.max_prompt_len,
      max_target_len=c.max_target_len,
      overlong=c.overlong,
    )

  def train_batches(self, start_step):
    from gkd_jax import data

    c = self.config
    per_host = c.data.batch_size // jax.process_count()
    return data.get_dataset(
      c.data.task,
      c.data.train_split,
      batch_size=per_host,
      seed=c.seed,
      shard_index=jax.process_index(),
      num_shards=jax.process_count(),
      start_step=start_step,
      **self.data_kwargs(c.data.train_split),
    )

  # -- checkpoints --------------------------------------------------------------------
  def save(self, step, wait=False):
    """Saves step (asynchronously unless wait); a step already on disk is not written again.
    A failed write (this one's or an earlier asynchronous one's) raises CheckpointError."""
    try:  # an earlier asynchronous save's failure is reported with its own step
      self.ckpt.wait_until_finished()
      self.ckpt.check_for_errors()
    except Exception as e:
      raise checkpoint_error(e, self.ckpt.directory, self.saved_step) from e
    try:
      if step != self.saved_step:
        state = {"params": self.params, "opt_state": self.opt_state}
        self.ckpt.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"step": step})
          ),
          force=True,
        )
      if wait:
        self.ckpt.wait_until_finished()
        self.ckpt.check_for_errors()
    except Exception as e:
      raise checkpoint_error(e, self.ckpt.directory, step) from e
    self.saved_step = step

  def check_saves(self):
    """Raises CheckpointError if an asynchronous save has failed (cheap, non-blocking)."""
    try:
      self.ckpt.check_for_errors()
    except Exception as e:
      raise checkpoint_error(e, self.ckpt.directory, self.saved_step) from e

  def restore(self) -> int:
    """Restores the newest intact checkpoint -> its step (0: none). A step that cannot be read
    is moved to workdir/ckpt_broken/ (never deleted) with a warning, and the one before is tried."""
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {"params": self.params, "opt_state": self.opt_state},
    )
    for step in sorted(self.ckpt.all_steps(), reverse=True):
      try:
        r = self.ckpt.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # truncated files, missing metadata, wrong structure, ...
        where = self.set_aside(step)
        log.warning(
          "checkpoint step %d in %s cannot be read (%s: %s); moved it to %s and "
          "trying the previous one",
          step,
          self.ckpt.directory,
          type(e).__name__,
          _first_line(e),
          where,
        )
        continue
      self.params, self.opt_state = r.state["params"], r.state["opt_state"]
      self.saved_step = step
      log.info("resumed from %s at step %d", self.ckpt.directory, step)
      return int(r.meta["step"])
    return 0

  def set_aside(self, step) -> str:
    """Moves checkpoint step out of the manager's directory (so that it can be written again)."""
    src = os.path.join(os.fspath(self.ckpt.directory), str(step))
    dst = os.path.join(self.workdir, "ckpt_broken", f"{step}.{int(time.time())}")
    if self.is_main:
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"ckpt_set_aside_{step}")
    self.ckpt.reload()
    return dst

  # -- one step -----------------------------------------------------------------------
  def make_views(self, batch, step, sft=False):
    """-> (view, ce_view or None (= the view's sequences), advantages, source)."""
    c, g = self.config, self.config.gkd
    data_view = steps.batch_view(batch, self.encdec, self.pad)
    if c.mode == "sft" or sft:
      return data_view, None, jnp.zeros(c.data.batch_size), "sft"
    source = step_source(c.seed, step, g.lmbda, g.seq_kd)
    if source == "dataset":  # ce_view None: the CE term reuses the view's forward
      return data_view, None, jnp.zeros(c.data.batch_size), source
    prompts, lengths = batch["prompt_tokens"], batch["prompt_lengths"]
    spp = c.rl.samples_per_prompt
    if spp > 1:
      n = prompts.shape[0] // spp
      prompts = self.place({"p": jnp.repeat(prompts[:n], spp, axis=0)})["p"]
      lengths = self.place({"l": jnp.repeat(lengths[:n], spp, axis=0)})["l"]
    if jax.process_count() > 1:  # sampling.sample checks the lengths on the host
      lengths = self.place.replicated(lengths)
    model = self.student if source == "on_policy" else self.teacher
    if source == "on_policy":
      nnx.update(self.student, self.params)
    out = sampling.sample(
      model,
      prompts,
      lengths,
      rng=jax.random.fold_in(self.key, step),
      max_new_tokens=g.max_new_tokens,
      temperature=g.sample_temperature,
      top_k=g.top_k,
      top_p=g.top_p,
      eos_ids=self.eos,
      pad_id=self.pad,
      dot_dtype=g.sample_dot_dtype or None,
    )
    view = steps.samples_view(prompts, lengths, out.tokens, out.mask, self.encdec, self.pad)
    adv = jnp.zeros(prompts.shape[0])
    if self.reward_fn is not None:
      adv = self.advantages(out, batch, spp)
    return view, data_view, adv, source

  def advantages(self, out, batch, spp):
    from gkd_jax import rewards

    toks, lens = to_host(out.tokens), to_host(out.lengths)
    preds = [self.tokenizer.decode(t[:n].tolist()) for t, n in zip(toks, lens)]
    ref_t = to_host(batch["decoder_targets"] if self.encdec else batch["target_tokens"])
    ref_n = to_host(batch["target_lengths"])
    refs = [self.tokenizer.decode(t[:n].tolist()) for t, n in zip(ref_t, ref_n)]
    if spp > 1:
      refs = [r for r in refs[: len(refs) // spp] for _ in range(spp)]
    r = self.reward_fn(preds, refs)
    self._last_reward = float(np.mean(r))
    adv = rewards.baseline_advantages(r, group_size=spp, baseline=self.config.rl.baseline)
    return self.place({"a": np.asarray(adv, np.float32)}, global_data=True)["a"]

  def train_step(self, batch, step):
    warm = step < self.config.train.sft_warmup_steps
    view, ce_view, adv, source = self.make_views(batch, step, warm)
    spec = dataclasses.replace(self.spec, mode="sft") if warm else self.spec
    self.params, self.opt_state, metrics = self._step_fn(
      self.graphdef,
      self.params,
      self.opt_state,
      self.t_graphdef,
      self.t_params,
      view,
      ce_view,
      adv,
      spec=spec,
      optimizer=self.optimizer,
      grad_accum=self.config.optim.grad_accum,
    )
    return metrics, source

  # -- evaluation -----------------------------------------------------------------------
  def eval_data(self):
    from gkd_jax import data

    c = self.config
    if not hasattr(self, "_eval"):
      ex = data.get_eval_examples(
        c.data.task,
        c.data.eval_split,
        max_examples=c.eval.num_examples,
        **self.data_kwargs(c.data.eval_split),
      )
      batches = data.get_dataset(
        c.data.task,
        c.data.eval_split,
        batch_size=c.eval.batch_size,
        shuffle=False,
        num_epochs=1,
        shard_index=0,
        num_shards=1,
        max_examples=c.eval.num_examples,
        **self.data_kwargs(c.data.eval_split),
      )
      views = [
        steps.batch_view(self.place(b, global_data=True), self.encdec, self.pad) for b in batches
      ]
      self._eval = (ex, views)
    return self._eval

  def eval_place(self, batch):
    """Eval prompts are the same on every process. With several processes they are
    replicated, so that the decoder can read its outputs on the host."""
    if jax.process_count() > 1:
      return self.place.replicated(batch)
    return self.place(batch, global_data=True)

  def evaluate(self, model, name):
    from gkd_jax import data

    c = self.config
    ex, views = self.eval_data()
    t0 = time.time()
    preds_ids = evaluation.decode(
      model,
      [e["prompt_tokens"] for e in ex],
      batch_size=c.eval.batch_size,
      max_new_tokens=c.eval.max_new_tokens,
      eos_ids=self.eos,
      pad_id=self.pad,
      temperature=c.eval.temperature,
      beam_size=c.eval.beam_size,
      place=self.eval_place,
    )
    preds = [self.tokenizer.decode(p) for p in preds_ids]
    refs = [e["references"] for e in ex]
    metrics = data.evaluate(c.data.task, refs, preds)
    if model is not self.teacher and c.eval.teacher_kl:
      if not hasattr(self, "_eval_teacher_hidden"):
        self._eval_teacher_hidden = evaluation.teacher_hidden(self.teacher, views)
      metrics["teacher_kl"] = evaluation.token_kl(
        model, self.teacher, views, self._eval_teacher_hidden
      )
    metrics["decode_s"] = time.time() - t0
    samples = [
      {"prompt": e["prompt_text"], "reference": e["reference"], name: p}
      for e, p in zip(ex[: c.eval.num_samples_logged], preds)
    ]
    return metrics, samples

  def eval_student(self, step, logger):
    nnx.update(self.student, self.params)
    metrics, samples = self.evaluate(self.student, "student")
    logger.write(step, metrics, prefix="eval")
    if self.is_main:
      with open(os.path.join(self.workdir, f"samples_step{step}.jsonl"), "w") as f:
        for s in samples:
          f.write(json.dumps(s) + "\n")
    return metrics, samples


# ------------------------------------------------------------------------ teacher SFT stage


def teacher_sft_config(c) -> ml_collections.ConfigDict:
  """The teacher-SFT stage of ``c``: cross-entropy training of a copy of ``c.teacher``.

  What only the distillation uses (gkd.*, rl.*, the student's shape, seed) is reset to the
  defaults, so every run of a sweep over those shares one stage.
  """
  d = config_lib.defaults()
  s = ml_collections.ConfigDict(c.to_dict())
  s.gkd, s.rl = d.gkd, d.rl
  s.student.keep_layers, s.student.overrides = d.student.keep_layers, d.student.overrides
  s.student.remat = d.student.remat
  s.seed = c.teacher.sft.seed
  s.mode = "sft"
  s.student.init, s.student.path = "path", c.teacher.path
  s.student.dtype, s.student.param_dtype = c.teacher.dtype, c.teacher.param_dtype
  s.teacher.sft.steps, s.teacher.sft.dir = 0, ""
  s.optim.lr = c.teacher.sft.lr
  s.train.steps, s.train.sft_warmup_steps, s.train.eval_every = c.teacher.sft.steps, 0, 0
  s.train.export_hf = True
  s.train.top_layers = c.teacher.sft.top_layers
  s.eval.teacher, s.eval.teacher_kl = False, False
  s.eval.at_start = c.teacher.sft.zero_shot_eval
  return s


def prepare_teacher(c, workdir) -> tuple[str, dict]:
  """Runs (or reuses) the teacher-SFT stage -> (teacher path, stage summary); ("", {}) if off."""
  if not c.teacher.sft.steps:
    return "", {}
  stage = teacher_sft_config(c)
  sdir = os.path.abspath(c.teacher.sft.dir or os.path.join(workdir, "teacher_sft"))
  want = json.loads(stage.to_json_best_effort())
  recorded = os.path.join(sdir, "config.json")
  if os.path.isfile(recorded):
    have = files.read_json(recorded)
    diff = config_lib.config_diff(have, want, ignore=RESULT_FREE)
    if diff:
      raise ValueError(
        f"teacher.sft.dir {sdir!r} holds a teacher-SFT stage made with other "
        f"settings ({', '.join(diff)}); point teacher.sft.dir elsewhere or remove it"
      )
  done = os.path.join(sdir, "summary.json")
  if os.path.isfile(done):
    summary = files.read_json(done)
    if summary.get("status") == "done" and os.path.isdir(os.path.join(sdir, "hf")):
      log.info("teacher-SFT stage: reusing %s", sdir)
      return os.path.join(sdir, "hf"), summary
  log.info(
    "teacher-SFT stage: fine-tuning %s for %d steps in %s",
    c.teacher.path,
    c.teacher.sft.steps,
    sdir,
  )
  summary = run(stage, sdir)
  if summary["status"] != "done":
    raise RuntimeError(
      f"teacher-SFT stage in {sdir} stopped ({summary['status']}); re-run to resume"
    )
  return os.path.join(sdir, "hf"), summary


def primary_metric(task: str) -> str:
  from gkd_jax.data import tasks

  return tasks.get_spec(task).primary_metric


def write_summary(workdir, summary):
  path = os.path.join(workdir, "summary.json")
  with open(path + ".tmp", "w") as f:
    json.dump({k: v for k, v in summary.items()}, f, indent=2, default=str)
  os.replace(path + ".tmp", path)


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the committed checkpoints in workdir/ckpt (orbax's unfinished tmp dirs excluded)."""
  d = os.path.join(workdir, "ckpt")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def check_resume(c, workdir, allow_change=False) -> dict:
  """Checks ``c`` against the config that made workdir's checkpoints -> the summary of the
  earlier sitting ({} when there is nothing to resume).

  A different value of a key that changes the result raises ValueError naming the keys, unless
  allow_change; other keys (RESULT_FREE) may change with a warning. The config being replaced
  is kept as config.step{N}.json.
  """
  steps = checkpoint_steps(workdir)
  recorded = os.path.join(workdir, "config.json")
  if not steps:
    return {}
  if os.path.isfile(recorded):
    have, want = files.read_json(recorded), json.loads(c.to_json_best_effort())
    diff = config_lib.config_diff(have, want)
    hard = [k for k in diff if not k.startswith(RESULT_FREE)]
    fa, fb = config_lib.flatten(have), config_lib.flatten(want)
    show = lambda keys: (
      ", ".join(f"{k} {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys[:6])
      + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    )
    if hard and not allow_change:
      raise ValueError(
        f"workdir {workdir} holds checkpoints (up to step {steps[-1]}) made with another "
        f"config: {show(hard)}. Resume with the same settings, use a new --workdir, or pass "
        "--allow_config_change to go on with the new ones"
      )
    if diff:
      log.warning(
        "resuming %s at step %d with changed settings: %s", workdir, steps[-1], show(diff)
      )
      backup = os.path.join(workdir, f"config.step{steps[-1]}.json")
      if jax.process_index() == 0 and not os.path.exists(backup):
        shutil.copyfile(recorded, backup)
  path = os.path.join(workdir, "summary.json")
  return files.read_json(path) if os.path.isfile(path) else {}


def _eval_settings(c) -> dict:
  return {"config_eval": c.eval.to_dict(), "eval_split": c.data.eval_split}


def is_finished(c, workdir, summary) -> bool:
  """The earlier sitting finished everything this config asks (checkpoint, eval, export)."""
  return (
    summary.get("status") == "done"
    and summary.get("step") == c.train.steps
    and c.train.steps in checkpoint_steps(workdir)
    and (not c.train.export_hf or os.path.isfile(os.path.join(workdir, "hf", "config.json")))
    and (
      not c.eval.num_examples
      or (
        "after" in summary.get("eval", {})
        and summary.get("config_eval") == c.eval.to_dict()
        and summary.get("eval_split") == c.data.eval_split
      )
    )
  )


def planned_sources(c) -> dict[str, int]:
  """How many steps draw each data source (a pure function of the config; see step_source)."""
  out = {}
  for step in range(c.train.steps):
    if c.mode == "sft" or step < c.train.sft_warmup_steps:
      source = "sft"
    else:
      source = step_source(c.seed, step, c.gkd.lmbda, c.gkd.seq_kd)
    out[source] = out.get(source, 0) + 1
  return out


def _first_line(e) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _os_error(e):
  """The first OSError with an errno in e's cause/context chain (or exception group)."""
  stack, seen = [e], set()
  while stack:
    x = stack.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError) and x.errno:
      return x
    stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
  return None


def checkpoint_error(e, directory, step) -> CheckpointError:
  err = _os_error(e)
  if err is not None:
    cause = err.strerror or os.strerror(err.errno)
    cause += f" ({err.filename})" if err.filename else ""
  elif "No space left" in str(e):
    cause = os.strerror(errno.ENOSPC)
  else:
    cause = f"{type(e).__name__}: {_first_line(e)}"
  return CheckpointError(f"could not write checkpoint step {step} in {directory}: {cause}")


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Trains per ``config`` in ``workdir`` (resuming from its newest intact checkpoint); returns a
  summary (also written to ``workdir/summary.json``).

  Every check that needs no model runs first. A finished run is not redone: its summary is
  returned (a missing final eval or export is redone). allow_config_change: resume although
  result-changing keys differ from the config that made the checkpoints.
  """
  t0 = time.time()
  c = config_lib.validate(config)
  preflight(c)
  workdir = check_workdir(workdir)
  earlier = check_resume(c, workdir, allow_config_change)
  if is_finished(c, workdir, earlier):
    log.info("%s: this run is finished (step %d); nothing to do", workdir, earlier["step"])
    return earlier
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(c.to_json_best_effort(indent=2))
  teacher_path, stage = prepare_teacher(c, workdir)
  summary = {
    "workdir": workdir,
    "status": "running",
    "primary_metric": primary_metric(c.data.task),
    **_eval_settings(c),
    "eval": {},
  }
  if {k: earlier.get(k) for k in ("config_eval", "eval_split")} == _eval_settings(c):
    summary["eval"] = dict(earlier.get("eval", {}))  # before / teacher / warm-up rows
  if stage:
    summary["teacher_sft"] = {
      "dir": stage["workdir"],
      "steps": c.teacher.sft.steps,
      "zero_shot": stage["eval"].get("before"),
      "after_sft": stage["eval"].get("after"),
    }
  summary = _run(c, workdir, teacher_path, summary, stage)
  summary["wall_s"] = time.time() - t0 + (earlier.get("wall_s") or 0.0)
  if jax.process_index() == 0:
    write_summary(workdir, summary)
  return summary


def _run(c, workdir, teacher_path, summary, stage) -> dict:
  from gkd_jax import observe

  tr = Trainer(c, workdir, teacher_path)
  tr.setup()
  tr.key = jax.random.PRNGKey(c.seed)
  start = tr.restore()
  logger = observe.MetricsLogger(workdir, enabled=tr.is_main, keep_until=start if start else -1)
  summary["start_step"] = start
  if start == 0 and c.eval.num_examples and c.eval.at_start:
    summary["eval"]["before"] = tr.eval_student(0, logger)[0]
    if c.eval.teacher and c.mode == "gkd":
      same_eval = (
        stage
        and stage.get("eval_split") == c.data.eval_split
        and not config_lib.config_diff(
          stage.get("config_eval", {}),
          c.eval.to_dict(),
          ignore=("teacher", "teacher_kl", "at_start"),
        )
      )
      if same_eval and stage["eval"].get("after"):  # the stage scored this teacher already
        summary["eval"]["teacher"] = dict(stage["eval"]["after"])
      else:
        summary["eval"]["teacher"], _ = tr.evaluate(tr.teacher, "teacher")
      logger.write(0, summary["eval"]["teacher"], prefix="teacher")
  if tr.is_main:  # a record of this sitting from the start (status "running")
    write_summary(workdir, summary)
  stop = {"flag": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
  progress = observe.Progress(c.train.steps, start_step=start, enabled=tr.is_main)
  acc, window, t_last = {}, {}, time.time()
  try:
    batches = tr.train_batches(start)
    for step in range(start, c.train.steps):
      batch = tr.place(next(batches))
      metrics, source = tr.train_step(batch, step)
      loss = float(metrics.pop("loss")[0])
      if not math.isfinite(loss) or not float(metrics.pop("params_finite")[0]):
        good = (
          f"the last good checkpoint (step {tr.saved_step}) in {workdir}/ckpt is intact"
          if tr.saved_step
          else "no checkpoint had been written yet"
        )
        raise FloatingPointError(
          f"non-finite loss ({loss}) or parameters at step {step}; stopping. {good}"
        )
      tr.check_saves()
      metrics["loss"] = (loss, 1.0)
      window[source] = window.get(source, 0) + 1
      for k, (s, n) in metrics.items():
        a = acc.setdefault(k, [0.0, 0.0])
        a[0] += float(s)
        a[1] += float(n)
      done = step + 1
      if done % c.train.log_every == 0 or done == c.train.steps:
        dt = time.time() - t_last
        out = {k: s / max(n, 1e-9) for k, (s, n) in acc.items() if k != "tokens"}
        out["tokens_per_s"] = acc["tokens"][0] / max(dt, 1e-9)
        out["on_policy_fraction"] = window.get("on_policy", 0) / max(sum(window.values()), 1)
        if tr.reward_fn is not None:
          out["reward"] = getattr(tr, "_last_reward", float("nan"))
        logger.write(done, out, prefix="train")
        progress.update(done, loss=out["loss"], tokens_per_s=out["tokens_per_s"])
        acc, window, t_last = {}, {}, time.time()
      if c.train.ckpt_every and done % c.train.ckpt_every == 0 and done < c.train.steps:
        tr.save(done)
      if c.train.eval_every and done % c.train.eval_every == 0 and done < c.train.steps:
        tr.eval_student(done, logger)
      if done == c.train.sft_warmup_steps and c.eval.num_examples and done < c.train.steps:
        summary["eval"]["after_sft_warmup"] = tr.eval_student(done, logger)[0]
        if tr.is_main:
          write_summary(workdir, summary)
      if stop["flag"]:
        tr.save(done, wait=True)
        summary.update(status="preempted", step=done)
        log.warning("SIGTERM: saved step %d and stopped", done)
        return summary
    tr.save(c.train.steps, wait=True)  # a no-op when a resumed run restored the final step
    summary.update(step=c.train.steps, sources=planned_sources(c))
    if c.eval.num_examples:
      summary["eval"]["after"], summary["samples"] = tr.eval_student(c.train.steps, logger)
    if c.train.export_hf:
      # every process joins the gather (params span all of them); process 0 writes
      nnx.update(
        tr.student, jax.tree.map(to_host, tr.params) if jax.process_count() > 1 else tr.params
      )
    if c.train.export_hf and tr.is_main:
      summary["export"] = models.save_hf(tr.student, tr.tokenizer, os.path.join(workdir, "hf"))
    summary["status"] = "done"
    return summary
  finally:
    signal.signal(signal.SIGTERM, previous)
    progress.close()
    logger.close()
    try:  # an earlier save failure is already being reported; don't raise it a second time
      tr.ckpt.wait_until_finished()
      tr.ckpt.close()
    except Exception as e:
      log.warning("checkpoint manager: %s", _first_line(e))
    if tr.is_main:
      try:
        observe.plot(workdir)
      except Exception as e:  # a plot must never hide the run's own outcome
        log.warning("could not plot curves: %s", e)
