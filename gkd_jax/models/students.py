"""A run's student, from config.student: loaded (init "path"), cut from the teacher's layers
("prune") or a smaller fresh model ("fresh"), per its family's StudentBuilder
(gkd_jax.models.base); the frozen teacher in config.teacher's numerics; and the checks that a
teacher/student pair can be distilled."""

from __future__ import annotations

import dataclasses

from flax import nnx

from gkd_jax import models
from gkd_jax.models import base, numerics


def build_student(s, teacher, seed: int):
  """The student of config section ``s`` (``config.student``): loaded, cut from the teacher's
  layers, or fresh (initialised from ``seed``); its family says which inits it supports and
  how it is rebuilt with the configured numerics."""
  fam = base.family_of(teacher.cfg)
  if s.init not in fam.student_inits:
    raise ValueError(
      f"config.student.init must be one of {fam.student_inits} for {fam.name} teachers "
      f"(got {s.init!r})"
    )
  if s.init == "path":
    student, _ = models.load(s.path, dtype=s.dtype, param_dtype=s.param_dtype)
  elif s.init == "prune":
    student = fam.converter().prune_layers(teacher, list(s.keep_layers))
  else:
    conv = fam.converter()
    student = conv.fresh_model(conv.smaller_config(teacher.cfg, **dict(s.overrides)), seed)
  sfam = base.family_of(student.cfg)
  if sfam.builds_students:  # dtypes and remat from the config
    cfg = dataclasses.replace(
      student.cfg,
      dtype=s.dtype,
      param_dtype=s.param_dtype,
      remat=s.remat,
      remat_policy=s.remat_policy,
      scan_layers=s.scan_layers,
      dot_dtype=s.dot_dtype or None,
    )
    if cfg != student.cfg:
      student = sfam.converter().with_config(student, cfg)
  elif s.remat_policy != "full":
    raise ValueError(
      f"config.student.remat_policy={s.remat_policy!r} is for decoder-only (Llama-family) "
      f"students; set it to 'full' for {sfam.name} students"
    )
  elif s.dot_dtype:
    raise ValueError(
      f"config.student.dot_dtype={s.dot_dtype!r} is for decoder-only (Llama-family) students; "
      f"set it to '' for {sfam.name} students"
    )
  return student


def frozen_teacher(teacher, t):
  """The teacher in the layout and numerics of config section ``t`` (``config.teacher``): with
  ``t.scan_layers`` its layers stacked into one scanned block; with ``t.dot_dtype`` its matmul
  inputs, and its stored matrices, in that dtype (it is frozen, so storing them rounded changes
  no number it computes). Call after ``build_student`` (a pruned student copies the teacher's
  unrounded, per-layer weights)."""
  fam = base.family_of(teacher.cfg)
  for key, value in (("scan_layers", t.scan_layers), ("dot_dtype", t.dot_dtype)):
    if value and not fam.builds_students:
      raise ValueError(
        f"config.teacher.{key}={value!r} is for decoder-only (Llama-family) teachers; set it "
        f"to {type(value)()!r} for {fam.name} teachers"
      )
  if t.scan_layers and not teacher.cfg.scan_layers:
    teacher = fam.converter().with_config(
      teacher, dataclasses.replace(teacher.cfg, scan_layers=True)
    )
  if not t.dot_dtype:
    return teacher
  return numerics.with_dot_dtype(*nnx.split(teacher), t.dot_dtype)


def check_pair(teacher, student, tokenizer, sample_dot_dtype=""):
  tv, sv = teacher.cfg.vocab_size, student.cfg.vocab_size
  if tv != sv:
    raise ValueError(
      f"teacher and student vocabularies differ ({tv} vs {sv}): token-level "
      "distillation needs a shared vocabulary"
    )
  if base.is_encoder_decoder(teacher) != base.is_encoder_decoder(student):
    raise ValueError("teacher and student must both be decoder-only or both encoder-decoder")
  if tokenizer is not None and tokenizer.vocab_size > tv:
    raise ValueError(
      f"the tokenizer has {tokenizer.vocab_size} tokens but the models only {tv} logits"
    )
  if sample_dot_dtype and base.is_encoder_decoder(student):
    raise ValueError(
      f"gkd.sample_dot_dtype={sample_dot_dtype!r} is for decoder-only models; "
      "set it to '' for encoder-decoder (T5) runs"
    )
