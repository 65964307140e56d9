"""Orbax save / restore of a model's nnx.Param state (our own format, not HF).

Params are stored as a flat dict {"layers.0.wq": array, ...} so the on-disk tree
does not depend on nnx container types.
"""

from __future__ import annotations

import os

import jax
from flax import nnx


def _flat_vars(model) -> dict:
  """{"a.b.c": Variable} for every nnx.Param of `model`."""
  return {
    ".".join(str(p) for p in path): var
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
  }


def save_params(model, path, *, overwrite: bool = False) -> str:
  """Writes the model's params to directory `path` (must not exist unless overwrite)."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise ValueError(f"checkpoint path {path!r} already exists (pass overwrite=True)")
  flat = {k: v[...] for k, v in _flat_vars(model).items()}
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, flat, force=overwrite)
  ckptr.wait_until_finished()
  return path


def restore_params(model_template, path):
  """Loads params saved by save_params into `model_template` (in place; returned).

  The template fixes structure, dtypes and shardings (restored arrays take the
  template arrays' shardings). Missing path, missing / unexpected parameters
  and shape mismatches -> ValueError naming the culprit.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f"checkpoint path {path!r} does not exist")
  ckptr = ocp.StandardCheckpointer()
  saved = ckptr.metadata(path).item_metadata
  saved = dict(saved.tree if hasattr(saved, "tree") else saved)
  variables = _flat_vars(model_template)
  missing = sorted(set(variables) - set(saved))
  if missing:
    raise ValueError(f"checkpoint {path!r} lacks parameter(s) {missing[:5]} of the model")
  extra = sorted(set(saved) - set(variables))
  if extra:
    raise ValueError(f"checkpoint {path!r} has parameter(s) {extra[:5]} the model lacks")
  for name, var in variables.items():
    if tuple(saved[name].shape) != tuple(var.shape):
      raise ValueError(
        f"checkpoint parameter {name!r} has shape {tuple(saved[name].shape)}, "
        f"model expects {tuple(var.shape)}"
      )

  def target(v):
    value = v[...]
    sharding = getattr(value, "sharding", None)
    return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

  restored = ckptr.restore(path, {k: target(v) for k, v in variables.items()})
  state = nnx.state(model_template, nnx.Param)
  for path_, var in nnx.to_flat_state(state):
    var.set_value(restored[".".join(str(p) for p in path_)])
  nnx.update(model_template, state)
  return model_template
