"""One small `Tokenizer` over HF `tokenizers` (byte-level BPE, tokenizer.json) and SentencePiece.

Built from a Hugging Face tokenizer directory, a bare tokenizer.json, a SentencePiece `.model`
(T5 style), or a GGUF file's metadata; `save()` writes files `transformers.AutoTokenizer` reads back
to the same ids. Only `tokenizers`, `sentencepiece` and `jinja2` are imported, and only when used.
HF directories may be gs:// URLs (read and written through `gkd_jax.files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from gkd_jax import files

_PROBE = "The quick brown fox, 12 345 Ärger; 東京 #### 7 <|im_end|>"

# Used when a tokenizer has no chat template of its own (SmolLM2's format, without its system prompt).
CHATML_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GGUF `tokenizer.ggml.pre` -> regex splitting text before GPT-2's byte-level regex (llama.cpp's
# llama-vocab.cpp); "smollm" splits digits one by one, as SmolLM's own tokenizer.json does.
_GGUF_PRE_SPLITS = {"gpt2": None, "smollm": r"\p{N}"}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # llama.cpp token types
_SPECIALS = ("bos", "eos", "pad", "unk")


def _token_content(value):
  """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
  return value.get("content") if isinstance(value, dict) else value


def _gguf_value(fields, key, default=None):
  """A GGUF metadata value from `GGUFReader.fields` (ReaderField) or a plain dict."""
  field = fields.get(key)
  if field is None:
    return default
  return field.contents() if hasattr(field, "contents") else field


class Tokenizer:
  """Text <-> ids with bos/eos/pad ids and a chat template.

  `backend` is a `tokenizers.Tokenizer` or a `sentencepiece.SentencePieceProcessor`.
  `pad_id` falls back to `eos_id` when the tokenizer defines no pad token (as for most decoder LMs).
  """

  def __init__(
    self, backend, *, bos_id=None, eos_id=None, pad_id=None, unk_id=None, chat_template=None
  ):
    self.backend = backend
    self._sp = hasattr(backend, "serialized_model_proto")  # a SentencePieceProcessor
    self._ids = {"bos": bos_id, "eos": eos_id, "pad": pad_id, "unk": unk_id}
    for name, i in self._ids.items():
      if i is not None and not 0 <= i < self.vocab_size:
        raise ValueError(f"{name}_id={i} is outside the vocabulary (size {self.vocab_size})")
    self.chat_template = chat_template

  # ----------------------------------------------------------------- constructors
  @classmethod
  def from_tokenizer_json(cls, path, **kwargs):
    """A bare tokenizer.json; special ids and chat template come from `kwargs`."""
    from tokenizers import Tokenizer as HFTokenizer

    if not files.path(path).is_file():
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    return cls(HFTokenizer.from_str(files.read_text(path)), **kwargs)

  @classmethod
  def from_hf_dir(cls, path):
    """A Hugging Face tokenizer directory: tokenizer.json plus tokenizer_config.json,
    special_tokens_map.json and chat_template.jinja where present."""
    tok = cls.from_tokenizer_json(os.path.join(path, "tokenizer.json"))
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
      if files.path(path, name).is_file():
        config.update(files.read_json(os.path.join(path, name)))
    for name in _SPECIALS:
      content = _token_content(config.get(f"{name}_token"))
      if content is not None:
        tok._ids[name] = tok.backend.token_to_id(content)
        if tok._ids[name] is None:
          raise ValueError(
            f"{path}: {name}_token {content!r} is not in tokenizer.json's vocabulary"
          )
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
      template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if files.path(jinja_path).is_file():
      template = files.read_text(jinja_path)
    tok.chat_template = template
    return tok

  @classmethod
  def from_sentencepiece(cls, model_path, *, bos_id=None, eos_id=None, pad_id=None, unk_id=None):
    """A SentencePiece `.model` (T5 style). Ids default to the model's own (`-1` = none);
    pad defaults to the model's pad id, else 0 (the T5/seqio convention pad=0, eos=1, unk=2)."""
    import sentencepiece as spm

    if not os.path.isfile(model_path):
      raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
    sp = spm.SentencePieceProcessor(model_file=str(model_path))

    def own(given, model_id):
      return given if given is not None else (model_id if model_id >= 0 else None)

    return cls(
      sp,
      bos_id=own(bos_id, sp.bos_id()),
      eos_id=own(eos_id, sp.eos_id()),
      pad_id=own(pad_id, sp.pad_id() if sp.pad_id() >= 0 else 0),
      unk_id=own(unk_id, sp.unk_id()),
    )

  @classmethod
  def from_gguf_metadata(cls, reader_or_fields):
    """The byte-level BPE (`tokenizer.ggml.model == "gpt2"`) a GGUF file describes.

    Takes a `gguf.GGUFReader` or its `fields` (or a plain dict of values). Control tokens become
    special added tokens and user-defined ones plain added tokens, as in transformers' GGUF loader.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    fields = getattr(reader_or_fields, "fields", reader_or_fields)
    if not isinstance(fields, Mapping):
      raise ValueError(
        f"expected a GGUFReader or its fields, got {type(reader_or_fields).__name__}"
      )
    model = _gguf_value(fields, "tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(
        f"tokenizer.ggml.model={model!r} is not supported; supported: ['gpt2'] (byte-level BPE)"
      )
    pre = _gguf_value(fields, "tokenizer.ggml.pre")
    if pre not in _GGUF_PRE_SPLITS:
      raise ValueError(
        f"tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(_GGUF_PRE_SPLITS)}"
      )
    tokens = _gguf_value(fields, "tokenizer.ggml.tokens")
    merges = _gguf_value(fields, "tokenizer.ggml.merges")
    if not tokens or merges is None:
      raise ValueError("GGUF metadata has no tokenizer.ggml.tokens / tokenizer.ggml.merges")

    bpe = models.BPE(
      vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges]
    )
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if _GGUF_PRE_SPLITS[pre] is not None:
      split = pre_tokenizers.Split(Regex(_GGUF_PRE_SPLITS[pre]), behavior="isolated")
      hf.pre_tokenizer = pre_tokenizers.Sequence([split, hf.pre_tokenizer])
    hf.decoder = decoders.ByteLevel()
    types = _gguf_value(fields, "tokenizer.ggml.token_type") or []
    hf.add_special_tokens(
      [
        AddedToken(t, normalized=False, special=True)
        for t, k in zip(tokens, types)
        if k == _GGUF_CONTROL
      ]
    )
    hf.add_tokens(
      [
        AddedToken(t, normalized=False, special=False)
        for t, k in zip(tokens, types)
        if k == _GGUF_USER_DEFINED
      ]
    )
    keys = {"bos_id": "bos", "eos_id": "eos", "pad_id": "padding", "unk_id": "unknown"}
    ids = {arg: _gguf_value(fields, f"tokenizer.ggml.{key}_token_id") for arg, key in keys.items()}
    return cls(hf, chat_template=_gguf_value(fields, "tokenizer.chat_template"), **ids)

  # ----------------------------------------------------------------- ids
  @property
  def bos_id(self):
    return self._ids["bos"]

  @property
  def eos_id(self):
    return self._ids["eos"]

  @property
  def pad_id(self):
    """The pad id, or `eos_id` when the tokenizer has none."""
    return self._ids["pad"] if self._ids["pad"] is not None else self._ids["eos"]

  @property
  def unk_id(self):
    return self._ids["unk"]

  @property
  def vocab_size(self):
    """Number of ids, added tokens included."""
    return (
      self.backend.get_piece_size()
      if self._sp
      else self.backend.get_vocab_size(with_added_tokens=True)
    )

  def fingerprint(self) -> str:
    """A hash of the vocabulary size, the special ids and the ids of a fixed probe text: the
    same tokenizer gives the same value on any machine (caches record it)."""
    import hashlib

    ids = [int(i) for i in self.encode(_PROBE)]
    doc = json.dumps([self.vocab_size, self.eos_id, self.pad_id, ids])
    return hashlib.sha256(doc.encode()).hexdigest()[:16]

  def id_to_token(self, i):
    return self.backend.id_to_piece(i) if self._sp else self.backend.id_to_token(i)

  def _special(self, name):
    i = self._ids[name]
    return None if i is None else self.id_to_token(i)

  # ----------------------------------------------------------------- encode / decode
  def _wrap(self, ids, add_bos, add_eos):
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
      if flag and self._ids[name] is None:
        raise ValueError(f"add_{name}=True but the tokenizer has no {name} token")
    return ([self.bos_id] if add_bos else []) + list(ids) + ([self.eos_id] if add_eos else [])

  def encode(self, text: str, *, add_bos=False, add_eos=False) -> list[int]:
    """Ids of `text`; special tokens written in the text are matched (HF backend)."""
    ids = (
      self.backend.encode(text)
      if self._sp
      else self.backend.encode(text, add_special_tokens=False).ids
    )
    return self._wrap(ids, add_bos, add_eos)

  def encode_batch(self, texts: Sequence[str], *, add_bos=False, add_eos=False) -> list[list[int]]:
    if self._sp:
      batch = self.backend.encode(list(texts))
    else:
      batch = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
    return [self._wrap(ids, add_bos, add_eos) for ids in batch]

  def decode(self, ids, *, skip_special_tokens=True) -> str:
    """Text of `ids` (all of them: nothing stops at eos)."""
    ids = [int(i) for i in ids]
    if not self._sp:
      return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
    sp = self.backend
    if skip_special_tokens:
      return sp.decode([i for i in ids if not sp.is_control(i)])
    # SentencePiece renders control pieces (pad/eos/bos) as nothing: write them out between runs.
    out, run = [], []
    for i in ids:
      if sp.is_control(i):
        out += [sp.decode(run), sp.id_to_piece(i)]
        run = []
      else:
        run.append(i)
    return "".join(out + [sp.decode(run)])

  # ----------------------------------------------------------------- chat
  def apply_chat_template(self, messages: list[dict], add_generation_prompt=True) -> str:
    """Render `messages` with the model's jinja chat template (as transformers does), or ChatML."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(self.chat_template or CHATML_TEMPLATE)
    specials = {f"{name}_token": self._special(name) for name in _SPECIALS}
    return template.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **specials
    )

  # ----------------------------------------------------------------- save
  def save(self, out_dir):
    """Write files `transformers.AutoTokenizer.from_pretrained(out_dir)` loads to the same ids:
    tokenizer.json + tokenizer_config.json + special_tokens_map.json, or for SentencePiece
    spiece.model + a T5-style tokenizer_config.json."""
    files.path(out_dir).mkdir(parents=True, exist_ok=True)
    specials = {
      f"{name}_token": self._special(name) for name in _SPECIALS if self._ids[name] is not None
    }
    if self._sp:
      files.write_bytes(
        os.path.join(out_dir, "spiece.model"), self.backend.serialized_model_proto()
      )
      config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, **specials}
    else:  # to_str(pretty=True) is what backend.save(path) writes
      files.write_text(os.path.join(out_dir, "tokenizer.json"), self.backend.to_str(pretty=True))
      config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **specials,
      }
    if self.chat_template:
      config["chat_template"] = self.chat_template
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
      text = json.dumps(content, indent=2, ensure_ascii=False)
      files.write_text(os.path.join(out_dir, name), text)
    return out_dir
