"""benchmarks/accelerator.py: its parameter, byte and FLOP counts against a hand count."""

import dataclasses

import jax
import pytest
from flax import nnx

from benchmarks import accelerator as acc
from gkd_jax.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=50, d_model=8, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=2,
                  mlp_dim=12)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True)])
def test_param_count_matches_the_model(tied, bias):
  cfg = dataclasses.replace(CFG, tie_embeddings=tied, qkv_bias=bias)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)))
  assert acc.param_count(cfg) == n


def test_bytes_and_flops_by_hand():
  block = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 12  # q, k, v, o (4 heads x 2, 2 kv heads), mlp
  assert acc.block_matmul_params(CFG) == block
  tied_weights = 3 * (block + 16) + 50 * 8 + 8  # blocks with 2 norms, the table, final norm
  kv = 2 * 3 * 5 * 2 * 7 * 2  # k and v, layers, batch 5, kv heads, 7 slots, head_dim
  assert acc.decode_bytes(CFG, 5, 7) == 2 * tied_weights + 2 * kv
  untied = dataclasses.replace(CFG, tie_embeddings=False)  # the input table is only gathered
  assert acc.decode_bytes(untied, 5, 7, itemsize=4, kv_itemsize=2) == 4 * tied_weights + 2 * kv
  assert acc.forward_flops(CFG, 10, 4) == 2 * (3 * block * 10 + 50 * 8 * 4)
  small = dataclasses.replace(CFG, n_layers=1)
  b, p, n = 2, 3, 4
  want = (3 * acc.forward_flops(small, b * (p + n), b * n) + acc.forward_flops(CFG, b * (p + n), b * n)
          + acc.forward_flops(small, b * (p + n - 1), b * n))
  assert acc.onpolicy_flops(small, CFG, b, p, n) == want


def test_peaks_lookup_and_override():
  a = acc.parse(["--dry-run"])
  assert acc.peaks("NVIDIA H200", a) == (989.0, 4800.0)
  assert acc.peaks("NVIDIA H100 PCIe", a) == (756.0, 2000.0)
  assert acc.peaks("cpu", a) == (None, None)
  a = acc.parse(["--peak-tflops", "100", "--peak-gbps", "1000"])
  assert acc.peaks("cpu", a) == (100.0, 1000.0)
