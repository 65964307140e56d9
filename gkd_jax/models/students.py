"""A run's student, from config.student: loaded (init "path"), cut from the teacher's layers
("prune") or a smaller fresh model ("fresh"), per its family's StudentBuilder
(gkd_jax.models.base); and the checks that a teacher/student pair can be distilled."""

from __future__ import annotations

import dataclasses

from gkd_jax import models
from gkd_jax.models import base


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
      scan_layers=s.scan_layers,
    )
    if cfg != student.cfg:
      student = sfam.converter().with_config(student, cfg)
  return student


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
