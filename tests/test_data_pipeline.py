"""seqio tasks, vocabularies and batches (gkd_jax.data) on the real data with the SmolLM2 tokenizer
and seqio's toy SentencePiece model. TensorFlow is imported once, by the `seqio_tasks` fixture."""
import importlib.util
import logging
import os

import numpy as np
import pytest
import shared_data
from shared_data import need

from gkd_jax.data import batching, metrics, pipeline, tasks
from gkd_jax.tokenizers import Tokenizer

@pytest.fixture(scope="module")
def data_dir():
    return shared_data.data_dir()


@pytest.fixture(scope="module")
def seqio_tasks():
    from gkd_jax.data import seqio_tasks as module  # seqio + TensorFlow, ~5 s

    return module


@pytest.fixture(scope="module")
def tok():
    import gguf

    from gkd_jax.models import alias_path

    try:
        path = alias_path("smollm2-135m-instruct")
    except ValueError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    return Tokenizer.from_gguf_metadata(gguf.GGUFReader(path))


@pytest.fixture(scope="module")
def sp_model(seqio_tasks):
    path = os.path.join(importlib.util.find_spec("seqio").submodule_search_locations[0],
                        "test_data", "sentencepiece", "sentencepiece.model")
    return need(path)


def chat_prompt(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------ vocabularies
def test_tokenizer_vocabulary_matches_tokenizer(seqio_tasks, tok):
    import tensorflow as tf

    from gkd_jax.data.vocab import TokenizerVocabulary

    vocab = TokenizerVocabulary(tok)
    texts = ["Hello world", "Natalia sold 48/2 = <<48/2=24>>24 clips.", "Ein Mann mit einem Hut.", ""]
    assert (vocab.eos_id, vocab.pad_id, vocab.bos_id, vocab.vocab_size) == (2, 2, 1, 49152)
    assert vocab.encode_tf(tf.constant(texts[1])).numpy().tolist() == tok.encode(texts[1])
    assert vocab.encode_tf(tf.constant(texts)).to_list() == tok.encode_batch(texts)
    ids = tok.encode(texts[2], add_eos=True) + [vocab.pad_id] * 3
    assert vocab.decode(ids) == texts[2]
    assert vocab.decode_tf(tf.constant([ids, ids])).numpy().tolist() == [texts[2].encode()] * 2


def test_sentencepiece_adapters_agree(seqio_tasks, sp_model):
    import seqio

    from gkd_jax.data.vocab import TokenizerVocabulary, make_vocabulary

    ours = make_vocabulary(Tokenizer.from_sentencepiece(sp_model))
    theirs = make_vocabulary(sp_model)
    assert isinstance(ours, TokenizerVocabulary) and isinstance(theirs, seqio.SentencePieceVocabulary)
    assert (ours.eos_id, ours.pad_id, ours.unk_id) == (theirs.eos_id, theirs.pad_id, theirs.unk_id) == (1, 0, 2)
    for text in ["summarize: the cat sat on the mat.", "translate English to German: A man in an orange hat"]:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.encode_tf(text).numpy().tolist() == theirs.encode_tf(text).numpy().tolist()


# ------------------------------------------------------------------ examples and tokenized lengths
def test_gsm8k_t5_prompts_and_lengths(seqio_tasks, tok, data_dir):
    need(os.path.join(data_dir, "gsm8k", "test.jsonl"))
    ex = pipeline.get_eval_examples("gsm8k", "test", tokenizer=tok, prompt_format="t5", data_dir=data_dir,
                                    max_prompt_len=1024, max_target_len=1024)
    assert len(ex) == 1319
    first = ex[0]
    assert first["prompt_text"].startswith("Q: Janet’s ducks lay 16 eggs") and first["prompt_text"].endswith(" A:")
    assert first["prompt_tokens"].dtype == np.int32
    assert first["prompt_tokens"].tolist() == tok.encode(first["prompt_text"])
    assert first["reference"].endswith("#### 18") and metrics.extract_answer(first["reference"]) == "18"
    loaded = pipeline.load_examples("gsm8k", "test", tokenizer=tok, prompt_format="t5", data_dir=data_dir,
                                    max_prompt_len=1024, max_target_len=1024)
    assert all(e["target"][-1] == tok.eos_id for e in loaded)
    # README: SmolLM2 tokens of GSM8K answers, mean 124 (train) / 127.07 (test); +1 for EOS here
    assert np.mean([len(e["target"]) for e in loaded]) == pytest.approx(128.07, abs=0.01)
    assert np.mean([len(e["prompt"]) for e in loaded]) == pytest.approx(
        np.mean([len(tok.encode(f"Q: {e['prompt_text'][3:-3]} A:")) for e in loaded]))


def test_chat_prompts_follow_the_template(seqio_tasks, tok, data_dir):
    need(os.path.join(data_dir, "wmt22", "generaltest2022.en-de.src.en"))
    ex = pipeline.get_eval_examples("translate_en_de", "wmt22", tokenizer=tok, prompt_format="chat",
                                    data_dir=data_dir)
    assert len(ex) == 2037
    spec = tasks.get_spec("translate_en_de")
    want = chat_prompt(tok, spec.chat_prefix + "You can come back any time as our chat service window is open 24/7")
    assert ex[0]["prompt_text"] == want and want.endswith("<|im_start|>assistant\n")
    assert ex[0]["prompt_tokens"].tolist() == tok.encode(want)
    assert len(ex[0]["references"]) == 2 and ex[0]["reference"] == ex[0]["references"][0]


def test_instruct_t5_uses_file_prompt(seqio_tasks, tok, data_dir):
    need(os.path.join(data_dir, "instruct", "vicuna.valid.jsonl"))
    ex = pipeline.get_eval_examples("instruct", "vicuna", tokenizer=tok, prompt_format="t5", data_dir=data_dir)
    assert len(ex) == 80
    assert ex[0]["prompt_text"].startswith("Below is an instruction that describes a task.")
    assert ex[0]["prompt_text"].endswith("### Response:\n")


# ------------------------------------------------------------------ batches
def test_decoder_batch_layout(seqio_tasks, tok):
    examples = pipeline.load_examples("xsum", "validation", tokenizer=tok, prompt_format="chat",
                                      source="local", max_prompt_len=512, max_target_len=64)
    it = pipeline.get_dataset("xsum", "validation", tokenizer=tok, prompt_format="chat", source="local",
                              max_prompt_len=512, max_target_len=64, batch_size=4, shuffle=False)
    b = next(it)
    B, L = b["tokens"].shape
    P, T = b["prompt_tokens"].shape[1], b["target_tokens"].shape[1]
    assert B == 4 and L == P + T and P in batching.bucket_lengths(512) and T in batching.bucket_lengths(64)
    assert all(v.dtype == np.int32 for v in b.values())
    np.testing.assert_array_equal(b["positions"], np.tile(np.arange(L), (B, 1)))
    for i in range(B):
        prompt, target = examples[i]["prompt"], examples[i]["target"]  # shuffle=False: file order
        p, t = len(prompt), len(target)
        assert (b["prompt_lengths"][i], b["target_lengths"][i]) == (p, t)
        np.testing.assert_array_equal(b["tokens"][i, :p + t], np.concatenate([prompt, target]))
        assert (b["tokens"][i, p + t:] == tok.pad_id).all()
        assert b["prompt_mask"][i].tolist() == [1] * p + [0] * (L - p)
        assert b["target_mask"][i].tolist() == [0] * p + [1] * t + [0] * (L - p - t)
        np.testing.assert_array_equal(b["prompt_tokens"][i, :p], prompt)
        np.testing.assert_array_equal(b["target_tokens"][i, :t], target)
        assert target[-1] == tok.eos_id
        assert tok.decode(target, skip_special_tokens=False) == examples[i]["target_text"] + "<|im_end|>"
    # the logit at position t-1 predicts tokens[:, t]: targets for the loss are tokens[:, 1:] under mask[:, 1:]
    shifted = b["tokens"][:, 1:][b["target_mask"][:, 1:] == 1]
    np.testing.assert_array_equal(shifted, b["target_tokens"][np.arange(T)[None, :] < b["target_lengths"][:, None]])


def test_resume_shard_seed_and_buckets(seqio_tasks, tok):
    kwargs = dict(tokenizer=tok, prompt_format="chat", source="local", max_prompt_len=512,
                  max_target_len=64, batch_size=8, seed=3, shard_index=0, num_shards=1)
    full = take(pipeline.get_dataset("xsum", "validation", **kwargs), 30)  # 240 rows: crosses 2 epochs
    for k in (1, 12, 25):
        same_batches(take(pipeline.get_dataset("xsum", "validation", start_step=k, **kwargs), 5), full[k:k + 5])
    # one epoch visits every example once
    examples = pipeline.load_examples("xsum", "validation", tokenizer=tok, prompt_format="chat",
                                      source="local", max_prompt_len=512, max_target_len=64)
    order = pipeline.stream_indices(len(examples), 0, 100, seed=3)
    assert sorted(order.tolist()) == list(range(100))
    other_seed = next(pipeline.get_dataset("xsum", "validation", **{**kwargs, "seed": 4}))
    assert not np.array_equal(other_seed["prompt_lengths"], full[0]["prompt_lengths"])
    # two hosts with 4 rows each see the rows of one host with 8, with the same shapes
    host_kwargs = {**kwargs, "batch_size": 4, "num_shards": 2}
    hosts = [take(pipeline.get_dataset("xsum", "validation", **{**host_kwargs, "shard_index": i}), 6)
             for i in range(2)]
    for step in range(6):
        for k in full[step]:
            np.testing.assert_array_equal(np.concatenate([hosts[0][step][k], hosts[1][step][k]]), full[step][k])
    shapes = {(b["prompt_tokens"].shape[1], b["target_tokens"].shape[1]) for b in full}
    assert len(shapes) <= 9


def test_bucket_lengths_against_brute_force():
    for max_len in (5, 8, 64, 100, 160, 512):
        for n in (1, 2, 3, 4, 6):
            for ratio in (1.125, 1.5, 2.0, 3.0):
                want = {max_len}
                for i in range(n):  # smallest multiple of 8 >= max_len / ratio**i, capped
                    m = next(m for m in range(8, 10 * max_len, 8) if m >= max_len / ratio**i)
                    want.add(min(m, max_len))
                assert batching.bucket_lengths(max_len, n, ratio=ratio) == sorted(want)
    assert batching.bucket_lengths(160, 4, ratio=1.125) == [120, 128, 144, 160]
    assert batching.bucket_lengths(512) == [128, 256, 512]  # the default ratio 2 halves
    with pytest.raises(ValueError, match="ratio must be > 1"):
        batching.bucket_lengths(160, 3, ratio=1.0)


def test_bucket_ratio_pads_each_batch_to_its_smallest_fitting_bucket(seqio_tasks, tok):
    kwargs = dict(tokenizer=tok, prompt_format="chat", source="local", max_prompt_len=512,
                  max_target_len=64, batch_size=4, seed=3, shard_index=0, num_shards=1)
    buckets = batching.bucket_lengths(512, 6, ratio=1.25)
    for b in take(pipeline.get_dataset("xsum", "validation", num_buckets=6, bucket_ratio=1.25,
                                       **kwargs), 12):
        width, longest = b["prompt_tokens"].shape[1], int(b["prompt_lengths"].max())
        assert width == min(x for x in buckets if x >= longest)


def test_finite_epochs_and_padded_last_batch(seqio_tasks, tok):
    kwargs = dict(tokenizer=tok, prompt_format="chat", source="local", max_prompt_len=512,
                  max_target_len=64, batch_size=32, num_epochs=1)
    assert len(list(pipeline.get_dataset("xsum", "validation", **kwargs))) == 3
    batches = list(pipeline.get_dataset("xsum", "validation", drop_remainder=False, **kwargs))
    assert len(batches) == 4
    last = batches[-1]
    assert (last["prompt_lengths"][4:] == 0).all() and last["target_mask"][4:].sum() == 0
    assert sum(int(b["target_lengths"].astype(bool).sum()) for b in batches) == 100


def test_encdec_batch_with_sentencepiece(seqio_tasks, sp_model, data_dir):
    need(os.path.join(data_dir, "multi30k", "val.en.gz"))
    t5_tok = Tokenizer.from_sentencepiece(sp_model)
    kwargs = dict(model_kind="encdec", prompt_format="t5", data_dir=data_dir, max_prompt_len=256,
                  max_target_len=128, batch_size=4, shuffle=False)
    b = next(pipeline.get_dataset("translate_en_de", "validation", tokenizer=t5_tok, **kwargs))
    b_sp = next(pipeline.get_dataset("translate_en_de", "validation", tokenizer=sp_model, **kwargs))
    same_batches([b], [b_sp])  # our SentencePiece wrapper == seqio.SentencePieceVocabulary
    S, T = b["encoder_tokens"].shape[1], b["decoder_tokens"].shape[1]
    assert b["prompt_tokens"].shape == (4, S) and b["decoder_targets"].shape == b["decoder_mask"].shape == (4, T)
    want = t5_tok.encode("translate English to German: A group of men are loading cotton onto a truck",
                         add_eos=True)
    assert b["encoder_tokens"][0, :len(want)].tolist() == want and b["prompt_lengths"][0] == len(want)
    for i in range(4):
        s, t = b["prompt_lengths"][i], b["target_lengths"][i]
        assert b["encoder_tokens"][i, s - 1] == 1 and b["encoder_mask"][i].sum() == s
        assert b["decoder_targets"][i, t - 1] == 1 and b["decoder_mask"][i].sum() == t
        assert b["decoder_tokens"][i, 0] == 0
        np.testing.assert_array_equal(b["decoder_tokens"][i, 1:t], b["decoder_targets"][i, :t - 1])
        assert (b["decoder_targets"][i, t:] == 0).all()


# ------------------------------------------------------------------ over-long, empty and bad input
def test_overlong_truncate_and_drop(seqio_tasks, tok, caplog):
    caplog.set_level(logging.INFO, logger="gkd_jax.data")
    common = dict(tokenizer=tok, prompt_format="chat", source="local", max_target_len=48)
    long = pipeline.load_examples("xsum", "validation", max_prompt_len=4096, **common)
    too_long = sum(len(e["prompt"]) > 200 or len(e["target"]) > 48 for e in long)
    assert 0 < too_long < 100
    short = pipeline.load_examples("xsum", "validation", max_prompt_len=200, **common)
    assert f"{too_long} truncated" in caplog.text
    tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    for a, e in zip(long, short):
        assert len(e["prompt"]) <= 200 and len(e["target"]) <= 48 and e["target"][-1] == tok.eos_id
        assert e["prompt"][-len(tail):].tolist() == tail
        if len(a["prompt"]) <= 200:
            np.testing.assert_array_equal(a["prompt"], e["prompt"])
    dropped = pipeline.load_examples("xsum", "validation", max_prompt_len=200, overlong="drop", **common)
    assert len(dropped) == 100 - too_long and f"{too_long} dropped" in caplog.text


def test_bad_input(seqio_tasks, tok, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gkd_jax.data")
    good = tmp_path / "x.jsonl"
    good.write_text('{"document": "Doc one.", "summary": "One."}\n{"document": "Doc two.", "summary": "  "}\n'
                    '{"document": "Doc three.", "summary": "Three."}\n')
    ex = pipeline.get_eval_examples("xsum", "train", tokenizer=tok, paths={"train": str(good)})
    assert [e["reference"] for e in ex] == ["One.", "Three."]
    assert "filtered 1 with empty targets" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"document": "Doc one.", "summary": "One."}\n{"document": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed JSON"):
        next(pipeline.get_dataset("xsum", "train", tokenizer=tok, paths={"train": str(bad)}))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        next(pipeline.get_dataset("gsm8k", "train", tokenizer=tok, paths={"train": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(ValueError, match="registered tasks: .*'xsum'"):
        next(pipeline.get_dataset("cnn_dm", "train", tokenizer=tok))
    with pytest.raises(ValueError, match="overlong="):
        pipeline.load_examples("xsum", "train", tokenizer=tok, paths={"train": str(good)}, overlong="clip")


# ------------------------------------------------------------------ seqio views: TFDS source, metrics
def test_tfds_source_preprocessing(seqio_tasks, tok):
    import tensorflow as tf

    assert tasks.choose_source(tasks.get_spec("xsum")) == "tfds"
    assert tasks.choose_source(tasks.get_spec("xsum"), data_dir="/d") == "local"
    assert tasks.choose_source(tasks.get_spec("scitldr")) == "local"
    with pytest.raises(ValueError, match="no TFDS source"):
        tasks.choose_source(tasks.get_spec("instruct"), "tfds")
    task = seqio_tasks.get_task("xsum", tokenizer=tok, source="tfds")
    assert task.source.tfds_dataset.name.startswith("xsum")
    fake = tf.data.Dataset.from_tensor_slices({"document": ["The cat sat."], "summary": ["A cat."], "id": ["1"]})
    (ex,) = list(task.preprocess_postcache(fake, sequence_length=None).as_numpy_iterator())
    assert ex["inputs"].tolist() == tok.encode("summarize: The cat sat.")
    assert ex["targets"].tolist() == tok.encode("A cat.", add_eos=True)
    assert ex["references"].tolist() == [b"A cat."]


def test_seqio_metric_fns_and_postprocess(seqio_tasks, tok, data_dir):
    task = seqio_tasks.get_task("scitldr", tokenizer=tok, data_dir=data_dir)
    refs = [["a cat sat on the mat", "the cat sat"], ["dogs bark loudly"]]
    preds = ["the cat sat on a mat", "dogs bark"]
    (fn,) = task.metric_fns
    assert fn(refs, preds) == metrics.rouge(refs, preds)
    example = {"references": np.array([b"first", b"second"], dtype=object)}
    assert task.postprocess_fn(b"x", example=example, is_target=True) == ["first", "second"]
    assert task.postprocess_fn(b"pred", example=example) == "pred"
