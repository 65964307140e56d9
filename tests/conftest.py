"""Test setup: CPU JAX with 8 fake devices (set before jax is imported); the tiny-model fixture."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny-model programs (in this process and in the CLI subprocesses,
# which inherit the variables): a persistent compilation cache compiles each once.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny random Llama teacher (4 layers, d_model 32) with SmolLM2's tokenizer in
    ``teacher/``, and a 1-layer model with another vocabulary (no tokenizer) in ``other_vocab/``."""
    import gguf
    from flax import nnx

    from gkd_jax import models
    from gkd_jax.models.llama import Llama, LlamaConfig
    from gkd_jax.tokenizers import Tokenizer

    tiny = LlamaConfig(vocab_size=49152, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                       mlp_dim=64, max_seq_len=256, tie_embeddings=True, rms_eps=1e-5)
    tok = Tokenizer.from_gguf_metadata(gguf.GGUFReader(models.alias_path("smollm2-135m-instruct")))
    root = tmp_path_factory.mktemp("tiny")
    models.save_hf(Llama(tiny, rngs=nnx.Rngs(0)), tok, str(root / "teacher"))
    small = LlamaConfig(**{**tiny.__dict__, "vocab_size": 256, "n_layers": 1})
    models.save_hf(Llama(small, rngs=nnx.Rngs(1)), None, str(root / "other_vocab"))
    return root
