"""Text metrics for decoding-based evaluation, without TensorFlow.

Every metric is `fn(targets, predictions) -> {name: float}`, seqio's `metric_fns` signature, and works
on plain lists of strings. `targets[i]` is a reference string or a list of references (multi-reference
sets: SciTLDR dev, WMT22 A/B). Scores are percentages (0-100), as seqio/T5 report them.
Only `rouge_score`, `sacrebleu` and the standard library are imported, and only when a metric runs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def reference_lists(targets, name="targets") -> list[list[str]]:
  """Each target (a string or a list of strings) as a non-empty list of reference strings;
  a bad one is reported as ``name[i]``."""
  out = []
  for i, t in enumerate(targets):
    refs = [t] if isinstance(t, str) else list(t)
    if not refs or not all(isinstance(s, str) for s in refs):
      raise ValueError(f"{name}[{i}] must be a string or a non-empty list of strings, got {t!r}")
    out.append(refs)
  return out


@functools.lru_cache(maxsize=None)
def _rouge_scorer(rouge_types: tuple[str, ...], use_stemmer: bool):
  from rouge_score import rouge_scorer

  return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def rouge_scores(
  targets, predictions, rouge_types=ROUGE_TYPES, use_stemmer=True, name="targets"
) -> list[dict]:
  """Per example {rouge type: F-measure in [0, 1]}, the best over its references
  (`RougeScorer.score_multi`)."""
  scorer = _rouge_scorer(tuple(rouge_types), bool(use_stemmer))
  return [
    {k: s[k].fmeasure for k in rouge_types}
    for s in (
      scorer.score_multi(refs, pred)
      for refs, pred in zip(reference_lists(targets, name), predictions)
    )
  ]


def _check_lengths(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not predictions:
    raise ValueError("no predictions to score")


def rouge(
  targets, predictions, *, rouge_types: Sequence[str] = ROUGE_TYPES, use_stemmer=True
) -> dict:
  """Mean ROUGE F-measure x 100 (rouge-score, Porter stemming). With several references per example
  the best-scoring one counts (`RougeScorer.score_multi`). "rougeLsum" splits summaries on newlines."""
  _check_lengths(targets, predictions)
  totals = dict.fromkeys(rouge_types, 0.0)
  for scores in rouge_scores(targets, predictions, rouge_types, use_stemmer):
    for k in rouge_types:
      totals[k] += scores[k]
  return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def rouge_l(targets, predictions) -> dict:
  """ROUGE-L F x 100 with stemming, best over references: the instruction-following metric of
  MiniLLM/ATKD."""
  return rouge(targets, predictions, rouge_types=("rougeL",))


def bleu(targets, predictions, *, tokenize="13a") -> dict:
  """sacreBLEU corpus BLEU. Examples with fewer references repeat their first one, which leaves
  BLEU unchanged (clipped counts and the closest reference length are maxima/minima over refs)."""
  import sacrebleu

  _check_lengths(targets, predictions)
  refs = reference_lists(targets)
  width = max(len(r) for r in refs)
  streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
  return {"bleu": sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize).score}


# GSM8K final answers: "#### 1,234", "The answer is -3.5.", else the last number in the text.
_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+"
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
  """'1,234.50' -> '1234.5', '$-3.' -> '-3', '07' -> '7'; None if `text` is not a number."""
  s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
  if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", s):
    return None
  negative = s.startswith("-")
  s = s.lstrip("-")
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  s = s.lstrip("0") or "0"
  if s.startswith("."):
    s = "0" + s
  return "-" + s if negative and s != "0" else s


def extract_answer(text: str) -> str | None:
  """The normalised final number of a GSM8K rationale or model output, or None.

  Looks for "#### N" first, then "The answer is N", then takes the last number in the text.
  """
  for pattern in (_HASHES, _ANSWER_IS):
    found = pattern.findall(text)
    if found:
      return normalize_number(found[-1])
  found = _ANY_NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def gsm8k_accuracy(targets, predictions) -> dict:
  """Percentage of predictions whose final number equals the reference's ("#### N")."""
  _check_lengths(targets, predictions)
  refs = [r[0] for r in reference_lists(targets)]
  hits = 0
  for ref, pred in zip(refs, predictions):
    want = extract_answer(ref)
    hits += want is not None and extract_answer(pred) == want
  return {"accuracy": 100.0 * hits / len(predictions)}


def first_number_accuracy(targets, predictions) -> dict:
  """Percentage of predictions whose first number equals the reference's first number (ASDiv:
  the answer is "N unit", so the first number is the answer; rambling after it is not penalised)."""
  _check_lengths(targets, predictions)
  hits = 0
  for refs, pred in zip(reference_lists(targets), predictions):
    want, got = _ANY_NUMBER.search(refs[0]), _ANY_NUMBER.search(pred)
    hits += bool(want and got) and normalize_number(want.group()) == normalize_number(got.group())
  return {"accuracy": 100.0 * hits / len(predictions)}
