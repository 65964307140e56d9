"""One training step, as pure functions: sequence views, losses, the optax update.

A *view* is the dict a loss reads. Both model kinds provide ``loss_positions [B, K]``
(the K sequence positions whose predictions are trained, in order; K is static,
e.g. the target bucket or max_new_tokens), ``targets [B, K]`` (the token each of
them predicts) and ``loss_mask [B, K]`` (1 where trained). Only those positions go
through the LM head, so a long prompt costs no [B, L, V] logits.
  decoder-only: tokens, mask (1 = real token) -> the logit at t predicts tokens[t+1]
  encoder-decoder: encoder_tokens, encoder_mask, decoder_tokens (shifted right),
    decoder_mask -> the logit at t predicts decoder target t
Every loss returns (sum, count); the trainer divides by the count of the whole
(global, all micro-batches) batch, so gradient accumulation and data parallelism
give exactly the full-batch gradient. A loss that is not a sum over tokens (ATKD,
``per_token`` False) counts the micro-batches (exact without accumulation).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gkd_jax import divergences as dv
from gkd_jax import losses, sparse
from gkd_jax.fused import fused_cached_loss, fused_loss
from gkd_jax.models import base, numerics


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """Static description of the step's loss (hashable: a jit static argument): the loss object
  (``gkd_jax.losses``) and how it is applied (reduction, extra terms, chunking)."""

  mode: str = "gkd"  # gkd | sft
  loss: losses.Loss = dataclasses.field(default_factory=losses.JSD)
  temperature: float = 1.0
  reduction: str = "token"
  ce_weight: float = 0.0
  fused: bool = False
  chunk_size: int = 1024
  rl_alpha: float = 1.0  # 1 = no policy gradient
  token_rkl_reward: bool = False
  top_layers: int = 0  # > 0: only the top n decoder layers and the final norm are trained

  @classmethod
  def from_config(cls, c):
    return cls(
      mode=c.mode,
      loss=losses.from_config(c.gkd),
      temperature=float(c.gkd.loss_temperature),
      reduction=c.gkd.reduction,
      ce_weight=float(c.gkd.ce_weight),
      fused=bool(c.gkd.fused),
      chunk_size=int(c.gkd.chunk_size),
      rl_alpha=float(c.rl.alpha),
      token_rkl_reward=c.rl.reward == "token_rkl",
      top_layers=int(c.train.top_layers),
    )


# ------------------------------------------------------------------------------ views
def decoder_view(tokens_BxL, mask_BxL, target_mask_BxL, pad_id=0, k=None):
  """Decoder-only view: position t is trained to predict tokens[t+1] where target_mask[t+1].

  k: static number of trained positions kept per row (>= the most target tokens in a
  row; default L).
  """
  b, length = tokens_BxL.shape
  pad = jnp.full((b, 1), pad_id, tokens_BxL.dtype)
  next_BxL = jnp.concatenate([tokens_BxL[:, 1:], pad], 1)
  m_BxL = jnp.concatenate([target_mask_BxL[:, 1:], jnp.zeros((b, 1), target_mask_BxL.dtype)], 1)
  pos_BxK = jnp.argsort(m_BxL <= 0, axis=1, stable=True)[:, : min(k or length, length)]
  return {
    "tokens": tokens_BxL,
    "mask": mask_BxL.astype(jnp.int32),
    "loss_positions": pos_BxK.astype(jnp.int32),
    "targets": jnp.take_along_axis(next_BxL, pos_BxK, axis=1),
    "loss_mask": jnp.take_along_axis(m_BxL, pos_BxK, axis=1).astype(jnp.float32),
  }


def encdec_view(encoder_tokens, encoder_mask, targets_BxT, target_mask_BxT, start_id=0):
  """Encoder-decoder view: decoder inputs are the targets shifted right after start_id."""
  b = targets_BxT.shape[0]
  start = jnp.full((b, 1), start_id, targets_BxT.dtype)
  return {
    "encoder_tokens": encoder_tokens,
    "encoder_mask": encoder_mask.astype(jnp.int32),
    "decoder_tokens": jnp.concatenate([start, targets_BxT[:, :-1]], 1),
    "decoder_mask": jnp.ones_like(targets_BxT, jnp.int32),
    "targets": targets_BxT,
    "loss_mask": target_mask_BxT.astype(jnp.float32),
  }


def batch_view(batch, encoder_decoder: bool, pad_id=0):
  """View of a dataset batch (gkd_jax.data layout); jitted, one program per batch shape."""
  if encoder_decoder:
    return _encdec_view(
      batch["encoder_tokens"],
      batch["encoder_mask"],
      batch["decoder_targets"],
      batch["decoder_mask"],
    )
  k = batch["target_tokens"].shape[1] if "target_tokens" in batch else None
  return _decoder_batch_view(
    batch["tokens"], batch["prompt_mask"], batch["target_mask"], pad_id=pad_id, k=k
  )


# The views are jitted: op by op, each of their ~20 ops compiles a small executable per new
# shape (about 40 MB of host memory per prompt width on CPU, against about 5 MB for one program).
_encdec_view = jax.jit(encdec_view, static_argnames=("start_id",))


@functools.partial(jax.jit, static_argnames=("pad_id", "k"))
def _decoder_batch_view(tokens_BxL, prompt_mask_BxL, target_mask_BxL, pad_id, k):
  mask_BxL = (prompt_mask_BxL + target_mask_BxL) > 0
  return decoder_view(tokens_BxL, mask_BxL, target_mask_BxL, pad_id, k)


@functools.partial(jax.jit, static_argnames=("encoder_decoder", "pad_id"))
def samples_view(prompt_BxP, prompt_len_B, gen_BxN, gen_mask_BxN, encoder_decoder: bool, pad_id=0):
  """View of prompts + generated continuations (on-policy or teacher samples); jitted."""
  if encoder_decoder:
    enc_mask = jnp.arange(prompt_BxP.shape[1])[None] < prompt_len_B[:, None]
    return encdec_view(prompt_BxP, enc_mask, gen_BxN, gen_mask_BxN)
  p, n = prompt_BxP.shape[1], gen_BxN.shape[1]
  pos = jnp.arange(p + n)[None]
  in_prompt = pos < prompt_len_B[:, None]
  g = pos - prompt_len_B[:, None]  # index into the generated tokens
  in_gen = (g >= 0) & (g < n)
  gi = jnp.clip(g, 0, n - 1)
  gen_valid = in_gen & jnp.take_along_axis(gen_mask_BxN.astype(bool), gi, axis=1)
  prompt_tok = jnp.take_along_axis(
    prompt_BxP, jnp.broadcast_to(jnp.clip(pos, 0, p - 1), g.shape), axis=1
  )
  tokens = jnp.where(
    in_prompt, prompt_tok, jnp.where(gen_valid, jnp.take_along_axis(gen_BxN, gi, axis=1), pad_id)
  )
  return decoder_view(tokens, in_prompt | gen_valid, gen_valid, pad_id, n)


# A teacher-logit cache's rows in a view (gkd_jax.teacher_cache): the teacher's top-k ids
# [B, K, k], their log-probs [B, K, k] and the log tail mass [B, K] at the trained positions.
CACHED_TEACHER = ("teacher_ids", "teacher_logp", "teacher_tail")


# ---------------------------------------------------------------------------- forwards
class Head(NamedTuple):
  """A model's LM head at the view's trained positions: logits ==
  softcap(einsum(f"btd,{layout}->btv", h, w), cap), the matmul's inputs rounded to ``dot_dtype``
  (None: h's dtype) with float32 accumulation."""

  h: jax.Array  # [B, K, D]
  w: jax.Array  # [D, V] ("dv") or [V, D] ("vd": a tied embedding, as stored)
  cap: float | None
  dot_dtype: str | None = None
  layout: str = "dv"


def head_dot_dtype(model) -> str | None:
  """The dtype of the LM head matmul's inputs: a decoder's ``cfg.matmul_dtype`` (its
  ``dot_dtype`` policy), None (the hidden states' dtype) for encoder-decoders."""
  return None if base.is_encoder_decoder(model) else model.cfg.matmul_dtype


def unembedding(model) -> tuple[jax.Array, str]:
  """(W, layout) of the model's LM head: a decoder's ``unembedding()``, ``(head(), "dv")`` for
  encoder-decoders."""
  return (model.head(), "dv") if base.is_encoder_decoder(model) else model.unembedding()


def hidden_and_head(model, view) -> Head:
  """-> ``Head`` at the view's trained positions."""
  if base.is_encoder_decoder(model):
    enc = model.encode(view["encoder_tokens"], view["encoder_mask"])
    h = model.decoder_hidden_states(
      enc, view["encoder_mask"], view["decoder_tokens"], view["decoder_mask"]
    )
  else:
    h = model.hidden_states(view["tokens"], mask_BxT=view["mask"])
    h = jnp.take_along_axis(h, view["loss_positions"][..., None], axis=1)
  w, layout = unembedding(model)
  return Head(h, w, model.logit_softcap(), head_dot_dtype(model), layout)


def frozen(head: Head) -> Head:
  """The head with no gradient into h and W (the teacher's)."""
  return head._replace(h=jax.lax.stop_gradient(head.h), w=jax.lax.stop_gradient(head.w))


def logits(h_BxTxD, w, cap, dot_dtype=None, layout="dv"):
  """softcap(h @ W) in float32 (``numerics.dot``: inputs in dot_dtype, default h's dtype); w is
  [D, V] for layout "dv", [V, D] for "vd"."""
  z = numerics.dot(f"btd,{layout}->btv", h_BxTxD, w, dot_dtype or h_BxTxD.dtype, jnp.float32)
  return dv.softcap(z, cap)


def count(view, spec: LossSpec, what: str):
  """The normalizer of a loss term for this view (depends on masks only)."""
  m = view["loss_mask"]
  if what == "div" and not spec.loss.per_token:
    return jnp.float32(1.0)
  if what in ("div", "ce") and spec.reduction == "sequence":
    return jnp.sum(jnp.any(m > 0, axis=-1)).astype(jnp.float32)
  if what == "pg" and not spec.token_rkl_reward:
    return jnp.float32(m.shape[0])
  return jnp.sum(m)


# ------------------------------------------------------------------------------ losses
def divergence_sum(s, t, view, spec: LossSpec):
  """Sum of the configured loss over the view's trained tokens (a per-token divergence), or
  the loss itself (ATKD). s, t: the student's and teacher's ``Head``. -> (sum, aux metrics)."""
  m, tgt = view["loss_mask"], view["targets"]
  if spec.fused:
    loss, aux = fused_loss(
      s.h,
      s.w,
      t.h,
      t.w,
      m,
      tgt,
      loss=spec.loss,
      temperature=spec.temperature,
      reduction=spec.reduction,
      student_softcap=s.cap,
      teacher_softcap=t.cap,
      chunk_size=spec.chunk_size,
      student_dot_dtype=s.dot_dtype,
      teacher_dot_dtype=t.dot_dtype,
      student_head_layout=s.layout,
      teacher_head_layout=t.layout,
    )
    return (aux["sum"], {}) if spec.loss.per_token else (loss, aux)
  total, _, aux = losses.loss_sum(
    spec.loss,
    logits(*s),
    logits(*t),
    tgt,
    m,
    temperature=spec.temperature,
    reduction=spec.reduction,
  )
  return total, aux


def cached_divergence_sum(s, view, spec: LossSpec):
  """``divergence_sum`` against the cached sparse teacher of the view (gkd_jax.sparse)."""
  ids, logp, tail = (view[k] for k in CACHED_TEACHER)
  if spec.fused:
    loss, aux = fused_cached_loss(
      s.h,
      s.w,
      ids,
      logp,
      tail,
      view["loss_mask"],
      view["targets"],
      loss=spec.loss,
      temperature=spec.temperature,
      reduction=spec.reduction,
      student_softcap=s.cap,
      chunk_size=spec.chunk_size,
      student_dot_dtype=s.dot_dtype,
      student_head_layout=s.layout,
    )
    return (aux["sum"], {}) if spec.loss.per_token else (loss, aux)
  total, _, aux = sparse.loss_sum(
    spec.loss,
    logits(*s),
    ids,
    logp,
    tail,
    view["targets"],
    view["loss_mask"],
    temperature=spec.temperature,
    reduction=spec.reduction,
  )
  return total, aux


def target_logprobs(head, view):
  """log p(target) per position ``[B, T]`` (float32) at temperature 1."""
  lp = jax.nn.log_softmax(logits(*head), axis=-1)
  return jnp.take_along_axis(lp, view["targets"][..., None], axis=-1)[..., 0]


def ce_sum(head, view, spec: LossSpec):
  nll = -target_logprobs(head, view)
  return dv.masked_mean(nll, view["loss_mask"], spec.reduction)[1][0]


def pg_sum(head, view, advantages, teacher_lp=None):
  """REINFORCE: -(A * log p(sample)). advantages [B] (sequence reward) or, when teacher
  log-probs [B, T] are given, the per-token reverse-KL reward log p_T - log p_S."""
  lp = target_logprobs(head, view)
  m = view["loss_mask"]
  if teacher_lp is not None:
    adv = jax.lax.stop_gradient(teacher_lp - lp)
    return -jnp.sum(jnp.where(m > 0, adv * lp * m, 0.0))
  return -jnp.sum(jax.lax.stop_gradient(advantages) * jnp.sum(jnp.where(m > 0, lp * m, 0.0), -1))


# ------------------------------------------------------------------------------ update
def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` as one multiply: g * min(1, max_norm / ||g||) -> clipped g.

  Unclipped steps are bit-identical to optax's; clipped ones differ by rounding (optax divides
  each element by the norm, then multiplies by max_norm). Why: XLA will not duplicate a
  division into several consumers, so optax's clipped gradient is materialised (a
  parameter-sized buffer) and read back by Adam's moment and update fusions; a multiply fuses
  into each of them. For benchmarks/vs_trl.py's student (64M float32 parameters), AdamW's
  update alone took 210 ms with optax's clip and 72-94 ms with this one (an EPYC, 2 cores),
  and the whole training step's temporary memory fell from 510 to 357 MB.
  The state is optax's (``EmptyState``): checkpoints are interchangeable.
  """

  def update_fn(updates, state, params=None):
    del params
    g_norm = optax.tree.norm(updates)
    scale = jnp.where(g_norm < max_norm, 1.0, max_norm / g_norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def make_optimizer(c) -> optax.GradientTransformation:
  """AdamW or Adafactor with warmup + constant/linear/cosine decay and clipping."""
  o, steps = c.optim, c.train.steps
  warm = min(o.warmup_steps, steps)
  end = o.lr * o.end_lr_fraction
  if o.schedule == "constant":
    decay = optax.constant_schedule(o.lr)
  elif o.schedule == "linear":
    decay = optax.linear_schedule(o.lr, end, max(steps - warm, 1))
  else:
    decay = optax.cosine_decay_schedule(o.lr, max(steps - warm, 1), alpha=o.end_lr_fraction)
  sched = (
    optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm), decay], [warm]) if warm else decay
  )
  if o.name == "adamw":
    opt = optax.adamw(sched, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
  else:
    opt = optax.adafactor(sched, weight_decay_rate=o.weight_decay or None)
  return optax.chain(clip_by_global_norm(o.clip_norm), opt) if o.clip_norm else opt


def freeze_below(params, top: int):
  """``params`` with everything but the top ``top`` decoder layers and the final norm behind
  stop_gradient (embedding/tied head included), so the backward pass never enters the frozen
  layers. Decoder-only models with a per-layer ``layers`` list (no scan_layers)."""
  if not top:
    return params
  layers = params.get("layers") if hasattr(params, "get") else None
  if layers is None or not hasattr(layers, "keys") or "final_norm" not in params:
    raise ValueError(
      "train.top_layers needs a decoder-only model with per-layer parameters "
      "(not T5, not scan_layers)"
    )
  n = len(layers)
  keep = {("layers", i) for i in range(max(n - top, 0), n)} | {("final_norm",)}

  def f(path, x):
    names = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    trained = names[:1] in keep or names[:2] in keep
    return x if trained else jax.lax.stop_gradient(x)

  return jax.tree_util.tree_map_with_path(f, params)


def _micro(x, k):
  return x.reshape((k, x.shape[0] // k) + x.shape[1:])


def train_step(
  graphdef,
  params,
  opt_state,
  teacher_graphdef,
  teacher_params,
  view,
  ce_view,
  advantages,
  *,
  spec: LossSpec,
  optimizer,
  grad_accum: int,
):
  """One optimizer update over ``grad_accum`` micro-batches -> (params, opt_state, metrics).

  view: the trained sequences (samples or dataset); ce_view: dataset sequences for
  the optional cross-entropy term, None when they are the view's own sequences (the
  student forward is then shared); advantages [B] for the
  sequence-reward policy gradient (zeros when unused). metrics: name -> (sum, count).
  """
  k = grad_accum
  same = ce_view is None or spec.mode == "sft"
  ce_view = view if ce_view is None else ce_view
  use_div = spec.mode == "gkd" and spec.rl_alpha > 0
  use_pg = spec.mode == "gkd" and spec.rl_alpha < 1
  use_ce = spec.mode == "sft" or spec.ce_weight > 0
  w_div = spec.rl_alpha if use_pg else 1.0
  n_div = count(view, spec, "div") * (1 if spec.loss.per_token else k)
  n_pg = count(view, spec, "pg")
  n_ce = count(ce_view, spec, "ce")

  def loss_fn(p, mv, mce, madv):
    student = nnx.merge(graphdef, freeze_below(p, spec.top_layers))
    s = hidden_and_head(student, mv)
    terms = {}
    total = 0.0
    t = t_lp = None
    cached = CACHED_TEACHER[0] in mv  # the teacher's rows come from a cache: no forward
    if not cached and (use_div or (use_pg and spec.token_rkl_reward)):
      teacher = nnx.merge(teacher_graphdef, teacher_params)
      t = frozen(hidden_and_head(teacher, mv))
    if use_div:
      d_sum, aux = cached_divergence_sum(s, mv, spec) if cached else divergence_sum(s, t, mv, spec)
      total += w_div * d_sum / n_div
      terms["divergence"] = d_sum
      terms.update({f"atkd/{a}": v for a, v in aux.items()})
    if use_pg:
      if spec.token_rkl_reward:
        t_lp = target_logprobs(t, mv)
      p_sum = pg_sum(s, mv, madv, t_lp)
      total += (1.0 - spec.rl_alpha) * p_sum / n_pg
      terms["pg"] = p_sum
    if use_ce:
      c = s if same else hidden_and_head(student, mce)
      c_sum = ce_sum(c, mce, spec)
      total += (1.0 if spec.mode == "sft" else spec.ce_weight) * c_sum / n_ce
      terms["ce"] = c_sum
    return total, terms

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (loss, terms), grads = grad_fn(params, view, ce_view, advantages)
  else:
    split = lambda tree: jax.tree.map(lambda x: _micro(x, k), tree)

    def body(acc, xs):
      (l, tm), g = grad_fn(params, *xs)
      return jax.tree.map(jnp.add, acc, (l, tm, g)), None

    xs = (split(view), split(ce_view), split(advantages))
    first = jax.tree.map(lambda x: x[0], xs)
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, *first)))
    (loss, terms, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]), xs)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  counts = {"divergence": n_div, "pg": n_pg, "ce": n_ce}
  finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
  metrics = {
    "loss": (loss, jnp.float32(1.0)),
    "grad_norm": (optax.tree.norm(grads), 1.0),
    "params_finite": (finite.astype(jnp.float32), 1.0),
    "tokens": (jnp.sum(view["loss_mask"]), 1.0),
  }
  for name, value in terms.items():
    metrics[name] = (value, counts.get(name, jnp.float32(k)))
  return params, opt_state, metrics
