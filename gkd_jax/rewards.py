"""Sequence rewards for REINFORCE on student samples (RL + GKD), and their baselines.

A reward function is ``fn(predictions, references) -> float32 [B]``: ``predictions[i]`` is the
decoded sample, ``references[i]`` a reference string or a list of references (the best one counts).

  get_reward(name, **kwargs)   a registered name ("gsm8k_correct", "rouge", "exact_match") or a
                               "module.path:function" string; kwargs are bound to the function
  register_reward(name, fn)    plug in ``fn(predictions, references, **kwargs) -> [B]``
  baseline_advantages(rewards, group_size=g)   reward - batch mean (g=1) or - per-prompt mean

Light to import: NumPy and the standard library; rouge-score loads on the first ROUGE call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence

import numpy as np

from gkd_jax.data.metrics import extract_answer, reference_lists, rouge_scores

RewardFn = Callable[[Sequence[str], Sequence], np.ndarray]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BASELINES = ("mean", "none")

_REGISTRY: dict[str, Callable] = {}


def gsm8k_correct(predictions, references) -> np.ndarray:
  """1.0 where the prediction's final number equals a reference's final answer ("#### N")."""
  out = np.zeros(len(predictions), np.float32)
  for i, (pred, refs) in enumerate(zip(predictions, reference_lists(references, "references"))):
    wanted = {extract_answer(r) for r in refs}
    if None in wanted:
      raise ValueError(f"references[{i}] has no final number: {refs!r}")
    out[i] = extract_answer(pred) in wanted
  return out


def exact_match(predictions, references) -> np.ndarray:
  """1.0 where the stripped prediction equals a stripped reference."""
  return np.array(
    [
      p.strip() in {r.strip() for r in refs}
      for p, refs in zip(predictions, reference_lists(references, "references"))
    ],
    np.float32,
  )


def rouge(predictions, references, *, rouge_type: str = "rougeL") -> np.ndarray:
  """ROUGE F1 in [0, 1] (rouge-score, Porter stemming), max over references."""
  if rouge_type not in ROUGE_TYPES:
    raise ValueError(f"rouge_type={rouge_type!r}; expected one of {ROUGE_TYPES}")
  scores = rouge_scores(references, predictions, (rouge_type,), name="references")
  return np.array([s[rouge_type] for s in scores], np.float32)


def register_reward(name: str, fn: Callable) -> None:
  """Register ``fn(predictions, references, **kwargs) -> [B]`` under `name` (replaces any previous)."""
  if not isinstance(name, str) or not name or ":" in name:
    raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")
  if not callable(fn):
    raise ValueError(f"reward {name!r}: fn is not callable: {fn!r}")
  _REGISTRY[name] = fn


def _lookup(name: str) -> Callable:
  if ":" in name:
    module, _, attr = name.partition(":")
    try:
      fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"reward {name!r}: cannot import {attr!r} from {module!r}: {e}") from e
    if not callable(fn):
      raise ValueError(f"reward {name!r} is not callable")
    return fn
  if name not in _REGISTRY:
    raise ValueError(
      f"unknown reward {name!r}; registered: {sorted(_REGISTRY)} (or pass 'module.path:function')"
    )
  return _REGISTRY[name]


def get_reward(name: str, **kwargs) -> RewardFn:
  """The reward `name` with `kwargs` bound, checked: returns float32 ``[len(predictions)]``."""
  fn = _lookup(name)
  try:
    inspect.signature(fn).bind_partial(None, None, **kwargs)
  except TypeError as e:
    raise ValueError(f"reward {name!r} does not accept {sorted(kwargs)}: {e}") from e
  except ValueError:  # builtins without a signature: let the call report bad kwargs
    pass
  bound = functools.partial(fn, **kwargs) if kwargs else fn

  def reward(predictions: Sequence[str], references: Sequence) -> np.ndarray:
    if isinstance(predictions, str) or isinstance(references, str):
      raise ValueError(f"reward {name!r}: predictions and references must be lists, not a string")
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
      raise ValueError(
        f"reward {name!r}: {len(predictions)} predictions but {len(references)} references"
      )
    out = np.asarray(bound(predictions, references), dtype=np.float32)
    if out.shape != (len(predictions),):
      raise ValueError(
        f"reward {name!r} returned shape {out.shape}, expected ({len(predictions)},)"
      )
    return out

  reward.__name__ = name
  return reward


def baseline_advantages(rewards_B, *, group_size: int = 1, baseline: str = "mean") -> np.ndarray:
  """REINFORCE advantages, float32 [B].

  baseline="mean": group_size 1 subtracts the batch mean; group_size g > 1 treats rows as
  consecutive blocks of g samples of one prompt ([0..g-1] is prompt 0) and subtracts each block's
  mean. baseline="none": the rewards unchanged.
  """
  r = np.asarray(rewards_B, dtype=np.float32)
  if r.ndim != 1:
    raise ValueError(f"rewards_B must be 1-D [B], got shape {r.shape}")
  if baseline not in BASELINES:
    raise ValueError(f"baseline={baseline!r}; expected one of {BASELINES}")
  if (
    isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1
  ):
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  if r.shape[0] % group_size:
    raise ValueError(f"batch size {r.shape[0]} is not divisible by group_size={group_size}")
  if baseline == "none" or r.size == 0:
    return r.copy()
  if group_size == 1:
    return r - r.mean()
  groups = r.reshape(-1, group_size)
  return (groups - groups.mean(axis=1, keepdims=True)).reshape(-1)


register_reward("gsm8k_correct", gsm8k_correct)
register_reward("rouge", rouge)
register_reward("exact_match", exact_match)
