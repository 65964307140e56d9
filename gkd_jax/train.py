"""The distillation loop: GKD (on/off/mixed policy), ATKD, RL+GKD and SFT.

Data flows one way each step, the ``TrainState`` threaded through: dataset batch
(``data``) -> ``rollout.Rollout`` (the source, student or teacher samples, rewards) ->
``steps.train_step`` (teacher/student forward, loss, optax update) -> metrics / checkpoint.
This module owns the loop, its set-up and pre-flight checks, checkpoints, resume and signals.

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
import signal
import socket
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gkd_jax import config as config_lib
from gkd_jax import evaluation, files, hostmem, models, rollout, sharding, steps
from gkd_jax.models import base as models_base
from gkd_jax.models import students

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
  "data.tokenized_dir",
  "teacher.live",
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
  """The workdir made absolute (a gs:// URL as it is), created and checked writable."""
  workdir = files.absolute(workdir)
  try:
    files.path(workdir).mkdir(parents=True, exist_ok=True)
    # one probe per process: several processes may check a shared workdir at once
    probe = files.path(workdir) / f".write_test.{socket.gethostname()}.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # OSError; a gs:// client's own errors (credentials, permissions)
    raise ValueError(f"workdir {workdir!r} is not writable: {e}") from e
  return workdir


def ckpt_dir(workdir) -> str:
  """Where the orbax checkpoints of the run in ``workdir`` live (orbax handles gs:// itself)."""
  return os.path.join(workdir, "ckpt")


def _model_path_exists(path: str) -> bool:
  return path in models.ALIASES or (bool(path) and files.path(path).exists())


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
  if c.teacher.cache:  # its metadata is read now; checked against the teacher once it loads
    from gkd_jax import teacher_cache

    try:
      teacher_cache.Cache(c.teacher.cache)
    except ValueError as e:
      raise ValueError(f"config.teacher.cache = {c.teacher.cache!r}: {e}") from None
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


class TrainState(NamedTuple):
  """What the loop threads from step to step: the student's parameters (the only copy: the
  sampler and the evaluator take them as (graphdef, params)), the optimizer state, the number
  of steps done, and the run's key (step i samples with fold_in(rng, i))."""

  params: Any
  opt_state: Any
  step: int
  rng: jax.Array


# ------------------------------------------------------------------------ the loop


def _state_first_step(**kwargs):
  """``steps.train_step`` -> (opt_state, params, metrics): the new state in the order jit
  flattens the donated arguments (keyword arguments sorted by name). jit gives each output the
  first donated input buffer of its shape and dtype; returned as (params, opt_state), the new
  parameters took the old first moments' buffers, the moments the old second moments', and so
  on, and XLA copied each of those inputs first (about 45 ms a step in benchmarks/vs_trl.py)."""
  params, opt_state, metrics = steps.train_step(**kwargs)
  return opt_state, params, metrics


@dataclasses.dataclass
class Trainer:
  """A run's parts: mesh, models (as graphdefs + parameters), the jitted step, the rollout,
  the evaluator and the checkpoint manager. ``setup()`` builds them and the initial state."""

  config: object
  workdir: str
  teacher_path: str = ""  # "" = config.teacher.path (the teacher-SFT stage sets its export)

  def setup(self) -> TrainState:
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
    teacher, self.tokenizer = models.load(
      self.teacher_path or c.teacher.path, dtype=c.teacher.dtype, param_dtype=c.teacher.param_dtype
    )
    if self.tokenizer is None:
      raise ValueError(f"teacher {c.teacher.path!r} has no tokenizer files; the trainer needs one")
    hostmem.release()  # each model-building stage's host copies go back before the next
    c = self.config = config_lib.resolve_dot_dtypes(c, models_base.is_encoder_decoder(teacher))
    log.info("matmul dtypes: %s", config_lib.dot_dtypes(c))
    student = students.build_student(c.student, teacher, c.seed)
    hostmem.release()
    students.check_pair(teacher, student, self.tokenizer, c.gkd.sample_dot_dtype)
    teacher = students.frozen_teacher(teacher, c.teacher)
    hostmem.release()
    self.encdec = models_base.is_encoder_decoder(student)
    teacher_rules = sharding.make_rules(list(c.mesh.rules) + list(c.teacher.rules))
    sharding.shard_model(teacher, self.mesh, teacher_rules)
    sharding.shard_model(student, self.mesh, self.rules)
    self.spec = steps.LossSpec.from_config(c)
    self.optimizer = steps.make_optimizer(c)
    self.graphdef, params = nnx.split(student)
    self.teacher = nnx.split(teacher)  # (graphdef, params)
    opt_state = sharding.on_mesh(jax.jit(self.optimizer.init)(params), self.mesh)
    static = ("graphdef", "teacher_graphdef", "spec", "optimizer", "grad_accum")
    # the new state keeps the state's own shardings (left to XLA, they come back as other but
    # equivalent specs, e.g. P() for P('model', 'fsdp') on one device: a second compile)
    layout = jax.tree.map(lambda x: x.sharding, (opt_state, params))
    self._step_fn = hostmem.Precompiled(
      jax.jit(
        _state_first_step,
        static_argnames=static,
        donate_argnames=("params", "opt_state"),
        out_shardings=(*layout, NamedSharding(self.mesh, PartitionSpec())),
      ),
      static,
    )
    self.ckpt = ocp.CheckpointManager(
      ckpt_dir(self.workdir),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=c.train.keep_ckpts, enable_async_checkpointing=True
      ),
    )
    self.saved_step = None  # the newest step on disk (restored or saved by this process)
    reward_fn = None
    if self.spec.rl_alpha < 1 and not self.spec.token_rkl_reward:
      from gkd_jax import rewards

      reward_fn = rewards.get_reward(c.rl.reward)
    self.rollout = rollout.Rollout(c, self.mesh, self.rules, self.tokenizer, self.encdec, reward_fn)
    self.evaluator = evaluation.Evaluator(
      c, self.mesh, self.rules, self.tokenizer, self.encdec, self.teacher
    )
    self.cache = None
    if c.teacher.cache:
      from gkd_jax import teacher_cache

      self.cache = teacher_cache.Cache(c.teacher.cache)
      want = teacher_cache.expected_meta(c, self.teacher_path or c.teacher.path, self.tokenizer)
      teacher_cache.check_meta(self.cache.meta, want, c.teacher.cache)
    hostmem.release()  # the load's host copies
    return TrainState(params, opt_state, 0, jax.random.PRNGKey(c.seed))

  def student(self, state):
    """The student as a (graphdef, params) pair."""
    return self.graphdef, state.params

  # -- data ---------------------------------------------------------------------------
  def place(self, batch):
    """A host-local dataset batch as global arrays on the mesh."""
    return sharding.shard_batch(batch, self.mesh, self.rules)

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
      num_buckets=c.data.num_buckets,
      bucket_ratio=c.data.bucket_ratio,
      **data.config_kwargs(c.data, self.tokenizer, self.encdec),
    )

  # -- checkpoints --------------------------------------------------------------------
  def save(self, state, wait=False):
    """Saves ``state`` at its step (asynchronously unless wait); a step already on disk is not
    written again. A failed write (this one's or an earlier one's) raises CheckpointError."""
    step = state.step
    try:  # an earlier asynchronous save's failure is reported with its own step
      self.ckpt.wait_until_finished()
      self.ckpt.check_for_errors()
    except Exception as e:
      raise checkpoint_error(e, self.ckpt.directory, self.saved_step) from e
    try:
      if step != self.saved_step:
        tree = {"params": state.params, "opt_state": state.opt_state}
        self.ckpt.save(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"step": step})
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

  def restore(self, state) -> TrainState:
    """``state`` from the newest intact checkpoint (unchanged when there is none). A step that
    cannot be read is moved to workdir/ckpt_broken/ (never deleted) with a warning, and the
    one before is tried."""
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      {"params": state.params, "opt_state": state.opt_state},
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
      self.saved_step = step
      log.info("resumed from %s at step %d", self.ckpt.directory, step)
      return state._replace(
        params=r.state["params"], opt_state=r.state["opt_state"], step=int(r.meta["step"])
      )
    return state

  def set_aside(self, step) -> str:
    """Moves checkpoint step out of the manager's directory (so that it can be written again)."""
    src = os.path.join(os.fspath(self.ckpt.directory), str(step))
    dst = os.path.join(self.workdir, "ckpt_broken", f"{step}.{int(time.time())}")
    if self.is_main:
      files.move(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"ckpt_set_aside_{step}")
    self.ckpt.reload()
    return dst

  # -- one step -----------------------------------------------------------------------
  def train_step(self, state, batch):
    """One update on a host-local dataset batch -> (new state, metrics, the rollout). With a
    teacher cache, a dataset step's batch gets the cache's rows (host-side, before placing)."""
    r, kwargs = self._rolled(state, batch)
    opt_state, params, metrics = self._step_fn(**kwargs)
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics, r

  def warm_up(self, state, batch) -> bool:
    """Compiles what ``train_step(state, batch)`` runs, without updating: the rollout runs (a
    sampler compiles on its first call per shape), the jitted step only compiles (the state's
    buffers are not donated). -> whether the step had to compile. Use: one batch per bucket
    shape up front, so no compilation falls in later steps."""
    return self._step_fn.compile(**self._rolled(state, batch)[1])

  def _rolled(self, state, batch):
    """-> (the rollout of ``batch`` at ``state.step``, the jitted step's arguments)."""
    warm = state.step < self.config.train.sft_warmup_steps
    if self.cache is not None and self.rollout.source(state.step, warm) == "dataset":
      targets = batch["decoder_targets" if self.encdec else "target_tokens"]
      batch = {**batch, **self.cache.rows(batch["example_ids"], targets)}
    batch = self.place(batch)
    r = self.rollout(batch, state.step, self.student(state), self.teacher, state.rng, warm)
    spec = dataclasses.replace(self.spec, mode="sft") if warm else self.spec
    kwargs = dict(
      graphdef=self.graphdef,
      params=state.params,
      opt_state=state.opt_state,
      teacher_graphdef=self.teacher[0],
      teacher_params=self.teacher[1],
      view=r.view,
      ce_view=r.ce_view,
      advantages=r.advantages,
      spec=spec,
      optimizer=self.optimizer,
      grad_accum=self.config.optim.grad_accum,
    )
    return r, kwargs

  # -- evaluation -----------------------------------------------------------------------
  def eval_student(self, state, logger):
    metrics, samples = self.evaluator(self.student(state), "student")
    logger.write(state.step, metrics, prefix="eval")
    if self.is_main:
      files.write_text(
        os.path.join(self.workdir, f"samples_step{state.step}.jsonl"),
        "".join(json.dumps(s) + "\n" for s in samples),
      )
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
  s.student.remat, s.student.scan_layers = d.student.remat, d.student.scan_layers
  s.student.remat_policy = d.student.remat_policy
  s.seed = c.teacher.sft.seed
  s.mode = "sft"
  s.student.init, s.student.path = "path", c.teacher.path
  s.student.dtype, s.student.param_dtype = c.teacher.dtype, c.teacher.param_dtype
  s.teacher.sft.steps, s.teacher.sft.dir = 0, ""
  s.teacher.cache, s.teacher.live = "", True  # the stage trains the teacher itself
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
  sdir = files.absolute(c.teacher.sft.dir or os.path.join(workdir, "teacher_sft"))
  want = json.loads(stage.to_json_best_effort())
  recorded = os.path.join(sdir, "config.json")
  if files.path(recorded).is_file():
    have = config_lib.with_defaults(files.read_json(recorded))
    diff = config_lib.config_diff(have, want, ignore=RESULT_FREE)
    if diff:
      raise ValueError(
        f"teacher.sft.dir {sdir!r} holds a teacher-SFT stage made with other "
        f"settings ({', '.join(diff)}); point teacher.sft.dir elsewhere or remove it"
      )
  done = os.path.join(sdir, "summary.json")
  if files.path(done).is_file():
    summary = files.read_json(done)
    if summary.get("status") == "done" and files.path(sdir, "hf").is_dir():
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
  files.write_json(os.path.join(workdir, "summary.json"), summary, default=str)


def checkpoint_steps(workdir) -> list[int]:
  """Steps of the committed checkpoints in workdir/ckpt (orbax's unfinished tmp dirs excluded)."""
  d = files.path(ckpt_dir(workdir))
  return sorted(int(x.name) for x in d.iterdir() if x.name.isdigit()) if d.is_dir() else []


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
  if files.path(recorded).is_file():
    have = config_lib.with_defaults(files.read_json(recorded))
    want = json.loads(c.to_json_best_effort())
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
      if jax.process_index() == 0 and not files.path(backup).exists():
        files.path(recorded).copy(backup)
  path = os.path.join(workdir, "summary.json")
  return files.read_json(path) if files.path(path).is_file() else {}


def _eval_settings(c) -> dict:
  return {"config_eval": c.eval.to_dict(), "eval_split": c.data.eval_split}


def is_finished(c, workdir, summary) -> bool:
  """The earlier sitting finished everything this config asks (checkpoint, eval, export)."""
  return (
    summary.get("status") == "done"
    and summary.get("step") == c.train.steps
    and c.train.steps in checkpoint_steps(workdir)
    and (not c.train.export_hf or files.path(workdir, "hf", "config.json").is_file())
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
  """How many steps draw each data source (a pure function of the config; rollout.step_source)."""
  out = {}
  for step in range(c.train.steps):
    if c.mode == "sft" or step < c.train.sft_warmup_steps:
      source = "sft"
    else:
      source = rollout.step_source(c.seed, step, c.gkd.lmbda, c.gkd.seq_kd)
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
    files.write_text(os.path.join(workdir, "config.json"), c.to_json_best_effort(indent=2))
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
  state = tr.restore(tr.setup())
  start = state.step
  logger = observe.MetricsLogger(workdir, enabled=tr.is_main, keep_until=start if start else -1)
  summary["start_step"] = start
  if start == 0 and c.eval.num_examples and c.eval.at_start:
    summary["eval"]["before"] = tr.eval_student(state, logger)[0]
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
        summary["eval"]["teacher"], _ = tr.evaluator(tr.teacher, "teacher", is_teacher=True)
      logger.write(0, summary["eval"]["teacher"], prefix="teacher")
  if tr.is_main:  # a record of this sitting from the start (status "running")
    write_summary(workdir, summary)
  stop = {"flag": False}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
  progress = observe.Progress(c.train.steps, start_step=start, enabled=tr.is_main)
  acc, window, t_last = {}, {}, time.time()
  reward = float("nan")
  try:
    batches = tr.train_batches(start)
    for step in range(start, c.train.steps):
      state, metrics, rolled = tr.train_step(state, next(batches))
      source = rolled.source
      if not math.isnan(rolled.reward):  # the newest sequence reward (RL + GKD)
        reward = rolled.reward
      loss = float(metrics.pop("loss")[0])
      if not math.isfinite(loss) or not float(metrics.pop("params_finite")[0]):
        good = (
          f"the last good checkpoint (step {tr.saved_step}) in {ckpt_dir(workdir)} is intact"
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
        if tr.rollout.reward_fn is not None:
          out["reward"] = reward
        logger.write(done, out, prefix="train")
        progress.update(done, loss=out["loss"], tokens_per_s=out["tokens_per_s"])
        acc, window, t_last = {}, {}, time.time()
      if c.train.ckpt_every and done % c.train.ckpt_every == 0 and done < c.train.steps:
        tr.save(state)
      if c.train.eval_every and done % c.train.eval_every == 0 and done < c.train.steps:
        tr.eval_student(state, logger)
      if done == c.train.sft_warmup_steps and c.eval.num_examples and done < c.train.steps:
        summary["eval"]["after_sft_warmup"] = tr.eval_student(state, logger)[0]
        if tr.is_main:
          write_summary(workdir, summary)
      if stop["flag"]:
        tr.save(state, wait=True)
        summary.update(status="preempted", step=done)
        log.warning("SIGTERM: saved step %d and stopped", done)
        return summary
    tr.save(state, wait=True)  # a no-op when a resumed run restored the final step
    summary.update(step=c.train.steps, sources=planned_sources(c))
    if c.eval.num_examples:
      summary["eval"]["after"], summary["samples"] = tr.eval_student(state, logger)
    if c.train.export_hf:
      # every process joins the gather (params span all of them); process 0 writes
      params = state.params
      if jax.process_count() > 1:
        params = jax.tree.map(sharding.to_host, params)
      if tr.is_main:
        student = nnx.merge(tr.graphdef, params)
        summary["export"] = models.save_hf(student, tr.tokenizer, os.path.join(workdir, "hf"))
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
