"""Logical axis names -> device mesh (t5x partitioning style, kept out of model code).

Models tag every parameter with logical axis names (nnx `out_sharding` metadata,
e.g. ("embed", "mlp")). Rules map each logical name to a mesh axis, a tuple of
mesh axes, or None (replicated). Mesh axes are "data", "fsdp", "model".

Fallbacks, so any model runs on any mesh without crashing:
  * a dimension not divisible by the size of its mesh axes drops mesh axes from
    the end of the tuple until it divides (ultimately: replicated);
  * a mesh axis already used by an earlier dimension of the same array is not
    reused (that dimension is replicated);
  * logical names without a rule are replicated.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("vocab", "model"),
  ("embed", "fsdp"),
  ("heads", "model"),
  ("kv_heads", "model"),
  ("mlp", "model"),
  ("head_dim", None),
  ("norm", None),
  ("layers", None),
)


def make_rules(overrides: Iterable[Sequence] | None = None) -> tuple[tuple[str, Any], ...]:
  """DEFAULT_RULES with `overrides` (pairs [logical, mesh_axes], e.g. from a config) applied."""
  rules = dict(DEFAULT_RULES)
  for pair in overrides or ():
    if len(pair) != 2 or not isinstance(pair[0], str):
      raise ValueError(f"sharding rule {pair!r} must be a pair (logical_name, mesh_axes)")
    name, axes = pair
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in axes if isinstance(axes, tuple) else (() if axes is None else (axes,)):
      if a not in MESH_AXES:
        raise ValueError(
          f"sharding rule for {name!r}: unknown mesh axis {a!r}; mesh axes: {MESH_AXES}"
        )
    rules[name] = axes
  return tuple(rules.items())


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  """Mesh with Auto axes, e.g. make_mesh({"data": 2, "fsdp": 2, "model": 2}).

  Missing axes among ("data", "fsdp", "model") get size 1. The product must equal
  the number of devices.
  """
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh shape {shape}: unknown axes {unknown}; allowed: {MESH_AXES}")
  sizes = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise ValueError(f"mesh shape {shape}: axis sizes must be >= 1")
  devices = jax.devices() if devices is None else list(devices)
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh shape {shape} needs {math.prod(sizes)} devices, but there are {len(devices)}"
    )
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # unusual topologies: plain row-major order
    grid = np.asarray(devices, dtype=object).reshape(sizes)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names, mesh: Mesh, rules=None, shape=None) -> PartitionSpec:
  """PartitionSpec for logical axis names (with the divisibility fallback if shape is given)."""
  rules = dict(DEFAULT_RULES if rules is None else rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = rules.get(name) if name is not None else None
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    axes = tuple(a for a in axes if a not in used and a in mesh.shape)
    while axes and shape is not None and shape[i] % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_to_sharding(names, mesh: Mesh, rules=None, shape=None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names, mesh, rules, shape))


def _var_sharding(v, mesh, rules):
  names = v.get_metadata().get("out_sharding")
  shape = v.shape
  if not names:
    names = (None,) * len(shape)
  if len(names) != len(shape):
    raise ValueError(f"logical axes {names} do not match parameter shape {shape}")
  return logical_to_sharding(names, mesh, rules, shape)


def state_shardings(state, mesh: Mesh, rules=None):
  """NamedSharding per Variable of an nnx State (real or abstract), from its logical names."""
  return jax.tree.map(
    lambda v: v.replace(_var_sharding(v, mesh, rules)),
    state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def shard_model(model, mesh: Mesh, rules=None):
  """Moves every parameter of `model` onto `mesh` as the rules say (in place); returns model."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


# ----------------------------------------------------------------------- data placement
def shard_batch(batch, mesh: Mesh, rules=None, global_data=False):
  """Global arrays with the leading axis on the "batch" mesh axes (the rest replicated).

  With one process, numpy or jax arrays are simply put there. With several, a numpy array
  holds this process's rows of the global batch, or (global_data=True) the whole global
  batch, the same on every process; a jax.Array is already global and is only resharded.
  """
  multi = jax.process_count() > 1

  def put(x):
    if isinstance(x, jax.Array) or not multi:
      x = x if isinstance(x, jax.Array) else np.asarray(x)
      names = ("batch",) + (None,) * (x.ndim - 1) if x.ndim else ()
      return jax.device_put(x, logical_to_sharding(names, mesh, rules, x.shape))
    x = np.asarray(x)
    shape = x.shape if global_data else (x.shape[0] * jax.process_count(),) + x.shape[1:]
    spec = logical_to_sharding(("batch",) + (None,) * (x.ndim - 1), mesh, rules, shape)
    return jax.make_array_from_process_local_data(spec, x, shape)

  return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
  """Global arrays held whole by every process (host-side code can read them), from numpy
  arrays that are the same on every process or from global jax.Arrays."""
  rep = NamedSharding(mesh, PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array):
      return jax.device_put(x, rep)
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(rep, x, x.shape)

  return jax.tree.map(put, tree)


def shard_eval_batch(batch, mesh: Mesh, rules=None):
  """Eval prompts, the same on every process: sharded on one process, replicated on several
  (so that the decoder can read its outputs on the host)."""
  if jax.process_count() > 1:
    return replicate(batch, mesh)
  return shard_batch(batch, mesh, rules, global_data=True)


def on_mesh(tree, mesh: Mesh):
  """Leaves not laid out on the mesh (e.g. optimizer step counts) become replicated on it."""
  rep = NamedSharding(mesh, PartitionSpec())
  fix = lambda x: (
    x if isinstance(getattr(x, "sharding", None), NamedSharding) else jax.device_put(x, rep)
  )
  return jax.tree.map(fix, tree)


def to_host(x) -> np.ndarray:
  """A global array as one numpy array on this host (gathered across processes)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
