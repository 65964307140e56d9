"""Corrupt Hugging Face model directories (config.json, index json, safetensors) raise one-line
ValueErrors naming the file, before any model is built. Tiny files written here; nothing is loaded."""
import json
import re

import numpy as np
import pytest
from safetensors.numpy import save_file

from gkd_jax import models

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def _model_dir(tmp_path, config=CONFIG):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    return d


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_good_safetensors_read(tmp_path):
    d = _model_dir(tmp_path)
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(d / "model.safetensors"))
    np.testing.assert_array_equal(models.read_safetensors(str(d))["w"], np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("cut", ["truncated", "short_header", "garbage", "empty"])
def test_corrupt_safetensors_names_the_file(tmp_path, cut):
    d = _model_dir(tmp_path)
    path = d / "model.safetensors"
    save_file({"w": np.zeros((16, 16), np.float32)}, str(path))
    blob = path.read_bytes()
    path.write_bytes({"truncated": blob[:-100], "short_header": blob[:20],
                      "garbage": b"this is not a safetensors file at all" * 4, "empty": b""}[cut])
    want = f"model file {path} is corrupt or truncated (safetensors: "
    with pytest.raises(ValueError, match=re.escape(want)) as excinfo:
        models.read_safetensors(str(d))
    _one_line(excinfo)
    with pytest.raises(ValueError, match=re.escape(want)):
        models.load(str(d))  # config.json is fine: the weights are what fails


def test_truncated_shard_names_the_shard(tmp_path):
    d = _model_dir(tmp_path)
    save_file({"a": np.zeros(64, np.float32)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": np.zeros(64, np.float32)}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert sorted(models.read_safetensors(str(d))) == ["a", "b"]
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(ValueError, match=re.escape(f"model file {shard} is corrupt or truncated")):
        models.read_safetensors(str(d))


def test_invalid_config_json_names_file_line_and_column(tmp_path):
    d = _model_dir(tmp_path, '{\n  "architectures": ["LlamaForCausalLM"],\n  "hidden_size": 64,,\n}\n')
    want = f"{d / 'config.json'}: invalid JSON at line 3 column 21 (Expecting property name"
    with pytest.raises(ValueError, match=re.escape(want)) as excinfo:
        models.load(str(d))
    _one_line(excinfo)
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_')  # truncated
    with pytest.raises(ValueError, match=re.escape(f"{d / 'config.json'}: invalid JSON at line 1")):
        models.load(str(d))
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
        models.load(str(d))
    (d / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"config\.json: not valid UTF-8 \(byte 0xe9"):
        models.load(str(d))


def test_invalid_index_json_names_the_file(tmp_path):
    d = _model_dir(tmp_path)
    index = d / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"')
    with pytest.raises(ValueError, match=re.escape(f"{index}: invalid JSON at line 1")) as excinfo:
        models.read_safetensors(str(d))
    _one_line(excinfo)
    with pytest.raises(ValueError, match=re.escape(f"{index}: invalid JSON")):
        models.load(str(d))
    index.write_text('{"weight_map": ["model.safetensors"]}')
    with pytest.raises(ValueError, match="has no 'weight_map' object"):
        models.read_safetensors(str(d))
