"""Logical-axis sharding of the Llama model on 8 fake CPU devices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gkd_jax import sharding
from gkd_jax.models.convert_llama import flat_params
from gkd_jax.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=16, mlp_dim=96, qkv_bias=True)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py should force 8 CPU devices"
  return sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})


def _spec(x):
  return x[...].sharding.spec


def test_make_mesh(mesh):
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh({"fsdp": 8}).shape) == {"data": 1, "fsdp": 8, "model": 1}
  with pytest.raises(ValueError, match=r"mesh shape \{'data': 3, 'model': 2\} needs 6 devices, but there are 8"):
    sharding.make_mesh({"data": 3, "model": 2})
  with pytest.raises(ValueError, match="unknown axes \\['tensor'\\]"):
    sharding.make_mesh({"tensor": 8})


def test_sharded_model_specs_and_logits(mesh):
  model = sharding.shard_model(Llama(CFG, rngs=nnx.Rngs(0)), mesh)
  assert _spec(model.embed) == P("model", "fsdp")
  assert _spec(model.lm_head) == P("fsdp", "model")
  assert _spec(model.final_norm) == P(None)
  block = model.layers[0]
  assert _spec(block.wq) == P("fsdp", "model", None)
  assert _spec(block.wk) == P("fsdp", "model", None)
  assert _spec(block.wo) == P("model", None, "fsdp")
  assert _spec(block.bq) == P("model", None)
  assert _spec(block.w_gate) == P("fsdp", "model")
  assert _spec(block.w_down) == P("model", "fsdp")
  assert block.wq[...].addressable_shards[0].data.shape == (32, 2, 16)

  reference = Llama(CFG, rngs=nnx.Rngs(0))  # same seed, plain single-device init
  for name, a in flat_params(reference).items():
    np.testing.assert_allclose(flat_params(model)[name], a, rtol=1e-6, atol=1e-8, err_msg=name)

  tokens = np.random.RandomState(0).randint(0, 128, (4, 8))
  mask = np.ones((4, 8), np.int32)
  mask[1, 5:] = 0
  batch = sharding.shard_batch({"tokens": tokens, "mask": mask}, mesh)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
  forward = nnx.jit(lambda m, t, mk: m(t, mask_BxT=mk))
  sharded_logits = forward(model, batch["tokens"], batch["mask"])
  cpu0 = jax.devices()[0]
  with jax.default_device(cpu0):
    ref_logits = forward(reference, jnp.asarray(tokens), jnp.asarray(mask))
  assert len(ref_logits.devices()) == 1
  np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(ref_logits), atol=1e-5)


def test_scanned_layers_and_shard_model(mesh):
  model = Llama(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(0))
  sharding.shard_model(model, mesh)
  assert _spec(model.layers.wq) == P(None, "fsdp", "model", None)
  assert _spec(model.layers.attn_norm) == P(None, None)
  rules = sharding.make_rules([("layers", "data"), ("embed", None)])
  model = sharding.shard_model(model, mesh, rules)
  assert _spec(model.layers.wq) == P("data", None, "model", None)
  assert _spec(model.embed) == P("model", None)


def test_rules_fallbacks_and_errors(mesh):
  # not divisible -> replicated (or fewer mesh axes), never a crash
  assert sharding.logical_to_spec(("vocab", "embed"), mesh, shape=(127, 64)) == P(None, "fsdp")
  assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(2, 5)) == P("data", None)
  assert sharding.logical_to_spec(("batch", "length"), mesh, shape=(3, 5)) == P(None, None)
  # a mesh axis is used at most once per array
  assert sharding.logical_to_spec(("heads", "mlp"), mesh, shape=(4, 4)) == P("model", None)
  assert sharding.logical_to_spec(("unknown_name",), mesh, shape=(8,)) == P(None)
  odd = Llama(dataclasses.replace(CFG, vocab_size=127, n_kv_heads=1), rngs=nnx.Rngs(0))
  sharding.shard_model(odd, mesh)
  assert _spec(odd.embed) == P(None, "fsdp")
  assert _spec(odd.layers[0].wk) == P("fsdp", None, None)
  with pytest.raises(ValueError, match="unknown mesh axis 'tensor'"):
    sharding.make_rules([("embed", "tensor")])
  with pytest.raises(ValueError, match="must be a pair"):
    sharding.make_rules([("embed",)])
