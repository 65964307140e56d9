"""Distillation losses as objects: one frozen dataclass per loss, owning its parameters.

A loss is a hashable value (a jit static argument) built from a name and its keyword
parameters (config: ``gkd.loss`` and ``gkd.loss_kw``; ``get("jsd", beta=0.5)``). Its
parameters are checked when it is built, before anything is traced. Both the unfused path
(``loss_sum``, on full logits) and the fused one (``gkd_jax.fused``, chunk by chunk) compute

    loss = sum_k sum_tokens w_k * term_k / count

from the loss's own pieces (the ``Loss`` protocol):
  terms(s_logits, t_logits, targets, temperature=, vocab_size=) -> K arrays ``[...]``, the
      per-token components (a divergence: one; ATKD: TKD and DKD);
  weights(mask, reduction, uncertainty) -> (K weight arrays ``[...]``, count, hard): a
      divergence's reduction weights (``divergences.reduction_weights``), or ATKD's easy/hard
      token weights from the teacher's uncertainty (count 1: its loss is already a mean);
  uncertainty(t_logits, targets, ...) -> ``[...]``, only where ``needs_uncertainty``.

Adding a divergence: its per-token function (``gkd_jax.divergences``) and a dataclass here
registered with ``@register``; its parameters are the dataclass fields. See the README's
"Adding a loss".
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import ClassVar, Protocol

import jax.numpy as jnp

from gkd_jax import atkd as at
from gkd_jax import divergences as dv


class Loss(Protocol):
  """What the train step and the fused kernel ask of a loss (see the module docstring)."""

  name: ClassVar[str]
  term_names: ClassVar[tuple[str, ...]]
  per_token: ClassVar[bool]  # True: a sum over tokens divided by the token/sequence count
  needs_uncertainty: ClassVar[bool]  # True: weights need u = 1 - p_T(target)
  aliases: ClassVar[dict[str, str]]  # field -> the flat gkd.* config key that also sets it

  def terms(self, s_logits, t_logits, targets, *, temperature, vocab_size=None) -> tuple: ...

  def weights(self, mask, reduction, uncertainty=None) -> tuple: ...

  def metrics(self, terms, mask, hard, uncertainty=None) -> dict: ...

  def uncertainty(self, t_logits, targets, *, temperature, vocab_size=None): ...


REGISTRY: dict[str, type] = {}


def register(cls):
  """Class decorator: makes ``cls`` buildable by its ``name`` (``get``, ``gkd.loss``)."""
  if cls.name in REGISTRY:
    raise ValueError(f"loss {cls.name!r} is registered twice")
  REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(name: str, **params) -> Loss:
  """``get("jsd", beta=0.3)`` -> the loss object; unknown names or parameters are errors."""
  if name not in REGISTRY:
    raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(REGISTRY)}")
  cls = REGISTRY[name]
  allowed = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(f"loss {name!r} got unknown parameter(s) {unknown}; allowed: {allowed}")
  return cls(**params)


def params(loss) -> dict:
  """The loss's parameters, field -> value."""
  return {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss)}


def from_config(gkd) -> Loss:
  """The loss of a config's ``gkd`` section: ``gkd.loss`` with ``gkd.loss_kw``; the flat
  keys named in the loss's ``aliases`` (``gkd.beta``, ``gkd.atkd_split``, ...) fill the
  parameters loss_kw leaves unset."""
  cls = REGISTRY.get(gkd.loss)
  if cls is None:
    raise ValueError(f"config.gkd.loss = {gkd.loss!r}: must be one of {names()}")
  kw = {f: gkd[key] for f, key in cls.aliases.items()}
  kw.update(dict(gkd.loss_kw))
  try:
    return get(gkd.loss, **kw)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.gkd.loss_kw (loss {gkd.loss!r}): {e}") from None


def loss_sum(
  loss, s_logits, t_logits, targets, mask, *, temperature=1.0, vocab_size=None, reduction="token"
):
  """Unfused: logits ``[..., V]``, targets and mask ``[...]`` -> (sum, count, metrics)."""
  u = None
  if loss.needs_uncertainty:
    u = loss.uncertainty(t_logits, targets, temperature=temperature, vocab_size=vocab_size)
  ws, count, hard = loss.weights(mask, reduction, u)
  terms = loss.terms(s_logits, t_logits, targets, temperature=temperature, vocab_size=vocab_size)
  return weighted_sum(ws, terms), count, loss.metrics(terms, mask, hard, u)


def weighted_sum(ws, terms):
  """sum over tokens and components of w_k * term_k (masked entries, w = 0, add nothing)."""
  return jnp.sum(
    functools.reduce(operator.add, [jnp.where(w > 0, w * t, 0.0) for w, t in zip(ws, terms)])
  )


# ------------------------------------------------------------------------- divergences
@dataclasses.dataclass(frozen=True)
class Divergence:
  """A per-token divergence D(P_T || P_S), reduced by token or sequence (``reduction``)."""

  name: ClassVar[str]
  fn: ClassVar[Callable]
  term_names: ClassVar[tuple[str, ...]] = ("divergence",)
  per_token: ClassVar[bool] = True
  needs_uncertainty: ClassVar[bool] = False
  aliases: ClassVar[dict[str, str]] = {}

  def __post_init__(self):
    for f in dataclasses.fields(self):  # every divergence parameter is a weight in [0, 1]
      object.__setattr__(self, f.name, dv.check_unit(f.name, getattr(self, f.name)))

  def per_token_fn(self, *, temperature=1.0, vocab_size=None) -> Callable:
    """-> ``fn(student_logits, teacher_logits)`` giving the divergence per token ``[...]``."""
    dv.check_temperature(temperature)
    if vocab_size is not None and not (isinstance(vocab_size, int) and vocab_size >= 1):
      raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return functools.partial(
      type(self).fn, **params(self), temperature=temperature, vocab_size=vocab_size
    )

  def terms(self, s_logits, t_logits, targets, *, temperature, vocab_size=None):
    del targets
    return (self.per_token_fn(temperature=temperature, vocab_size=vocab_size)(s_logits, t_logits),)

  def weights(self, mask, reduction, uncertainty=None):
    del uncertainty
    w, count = dv.reduction_weights(mask, reduction)
    return (w,), count, None

  def uncertainty(self, t_logits, targets, *, temperature, vocab_size=None):
    raise NotImplementedError(f"loss {self.name!r} does not use the teacher's uncertainty")

  def metrics(self, terms, mask, hard, uncertainty=None):
    return {}


@register
@dataclasses.dataclass(frozen=True)
class FKL(Divergence):
  """KL(P_T || P_S), mode-covering (supervised KD's divergence)."""

  name: ClassVar[str] = "fkl"
  fn: ClassVar[Callable] = dv.forward_kl


@register
@dataclasses.dataclass(frozen=True)
class RKL(Divergence):
  """KL(P_S || P_T), mode-seeking."""

  name: ClassVar[str] = "rkl"
  fn: ClassVar[Callable] = dv.reverse_kl


@register
@dataclasses.dataclass(frozen=True)
class JSD(Divergence):
  """Generalized JSD(beta) as in the GKD paper and TRL (beta 0: forward KL, 1: reverse KL)."""

  beta: float = 0.5
  name: ClassVar[str] = "jsd"
  fn: ClassVar[Callable] = dv.generalized_jsd
  aliases: ClassVar[dict[str, str]] = {"beta": "beta"}


@register
@dataclasses.dataclass(frozen=True)
class TVD(Divergence):
  """Total variation distance, in [0, 1]."""

  name: ClassVar[str] = "tvd"
  fn: ClassVar[Callable] = dv.total_variation


@register
@dataclasses.dataclass(frozen=True)
class SKL(Divergence):
  """Skew KL (DistiLLM): KL(P_T || alpha*P_T + (1-alpha)*P_S)."""

  alpha: float = 0.1
  name: ClassVar[str] = "skl"
  fn: ClassVar[Callable] = dv.skew_kl
  aliases: ClassVar[dict[str, str]] = {"alpha": "alpha"}


@register
@dataclasses.dataclass(frozen=True)
class SRKL(Divergence):
  """Skew reverse KL (DistiLLM): KL(P_S || alpha*P_S + (1-alpha)*P_T)."""

  alpha: float = 0.1
  name: ClassVar[str] = "srkl"
  fn: ClassVar[Callable] = dv.skew_reverse_kl
  aliases: ClassVar[dict[str, str]] = {"alpha": "alpha"}


DIVERGENCES = tuple(n for n, c in REGISTRY.items() if issubclass(c, Divergence))


def get_divergence(name: str, **kw) -> Callable:
  """``get_divergence("jsd", beta=0.5, temperature=2.0)`` -> ``fn(student, teacher)`` per
  token; ``temperature`` and ``vocab_size`` go to the function, the rest build the loss."""
  if name not in DIVERGENCES:
    raise ValueError(f"unknown divergence {name!r}; allowed: {', '.join(DIVERGENCES)}")
  call = {k: kw.pop(k) for k in ("temperature", "vocab_size") if k in kw}
  try:
    loss = get(name, **kw)
  except ValueError as e:
    raise ValueError(
      f"{e}".replace("; allowed: [", "; allowed: ['temperature', 'vocab_size', ", 1)
    ) from None
  return loss.per_token_fn(**call)


# -------------------------------------------------------------------------------- ATKD
@register
@dataclasses.dataclass(frozen=True)
class ATKD:
  """ATKD (Zhong et al., 2024; gkd_jax.atkd): easy tokens learn DKD, hard ones TKD + DKD;
  loss = easy_weight * mean_easy + (1 - easy_weight) * mean_hard. ``split`` "batch" (the
  official code) takes one uncertainty threshold over the batch, "sequence" one per row;
  ``base`` "rkl" swaps student and teacher inside TKD and DKD."""

  easy_weight: float = 0.2
  hard_fraction: float = 0.5
  split: str = "batch"
  base: str = "fkl"
  name: ClassVar[str] = "atkd"
  term_names: ClassVar[tuple[str, ...]] = ("tkd", "dkd")
  per_token: ClassVar[bool] = False
  needs_uncertainty: ClassVar[bool] = True
  aliases: ClassVar[dict[str, str]] = {
    "easy_weight": "easy_weight",
    "hard_fraction": "hard_fraction",
    "split": "atkd_split",
    "base": "atkd_base",
  }

  def __post_init__(self):
    at.check_params(self.easy_weight, self.hard_fraction, self.split, self.base)

  def uncertainty(self, t_logits, targets, *, temperature, vocab_size=None):
    """u = 1 - p_T(target) ``[...]`` (the teacher's only)."""
    lt = dv.log_probs(t_logits, temperature, vocab_size)
    return -jnp.expm1(jnp.take_along_axis(lt, targets[..., None], axis=-1)[..., 0])

  def terms(self, s_logits, t_logits, targets, *, temperature, vocab_size=None):
    ls, lt = dv.pair_log_probs(s_logits, t_logits, temperature, vocab_size)
    at.check_targets(s_logits, targets)
    parts = at.decompose_log_probs(ls, lt, targets, self.base)
    return parts["tkd"], parts["dkd"]

  def weights(self, mask, reduction, uncertainty=None):
    del reduction  # ATKD has its own weighting
    if self.split == "sequence" and mask.ndim != 2:
      raise ValueError(f"split 'sequence' needs [B, T] inputs, got mask shape {tuple(mask.shape)}")
    w_tkd, w_dkd, hard = at.atkd_weights(
      uncertainty,
      mask,
      easy_weight=self.easy_weight,
      hard_fraction=self.hard_fraction,
      split=self.split,
    )
    return (w_tkd, w_dkd), jnp.float32(1.0), hard

  def metrics(self, terms, mask, hard, uncertainty=None):
    return at.metrics({"tkd": terms[0], "dkd": terms[1], "uncertainty": uncertainty}, mask, hard)
