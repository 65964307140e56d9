"""The pure training step on tiny random models under a (data=4, model=2) mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkd_jax import config as config_lib
from gkd_jax import divergences as dv
from gkd_jax import losses as loss_lib
from gkd_jax import rollout, sampling, sharding, steps
from gkd_jax.models.llama import Llama, LlamaConfig

TEACHER = LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=64)
STUDENT = dataclasses.replace(TEACHER, n_layers=1)


@pytest.fixture(scope="module")
def setup():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  teacher = Llama(TEACHER, rngs=nnx.Rngs(0))
  teacher.lm_head[...] = teacher.lm_head[...] * 40.0  # a confident teacher: real targets
  sharding.shard_model(teacher, mesh)
  r = np.random.default_rng(0)
  prompts = r.integers(1, 64, (8, 6)).astype(np.int32)
  lengths = r.integers(2, 7, (8,)).astype(np.int32)
  targets = r.integers(1, 64, (8, 5)).astype(np.int32)
  tokens = np.zeros((8, 11), np.int32)
  pm, tm = np.zeros_like(tokens), np.zeros_like(tokens)
  for b in range(8):
    n = lengths[b]
    tokens[b, :n], tokens[b, n:n + 5] = prompts[b, :n], targets[b]
    pm[b, :n], tm[b, n:n + 5] = 1, 1
  batch = sharding.shard_batch({"tokens": tokens, "prompt_mask": pm, "target_mask": tm,
                                "prompt_tokens": prompts, "prompt_lengths": lengths}, mesh)
  return mesh, teacher, batch


def _run(setup, spec, steps_n=15, lr=1e-2, on_policy=False, advantages=None, grad_accum=1,
         share_ce=False):
  mesh, teacher, batch = setup
  student = Llama(STUDENT, rngs=nnx.Rngs(1))
  sharding.shard_model(student, mesh)
  c = config_lib.defaults()
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.train.steps = lr, 0, "constant", steps_n
  opt = steps.make_optimizer(c)
  view = steps.batch_view(batch, False)
  if on_policy:  # one fixed set of student samples ("a fixed batch")
    out = sampling.sample(student, batch["prompt_tokens"], batch["prompt_lengths"],
                          rng=jax.random.PRNGKey(0), max_new_tokens=5)
    view = steps.samples_view(batch["prompt_tokens"], batch["prompt_lengths"], out.tokens,
                              out.mask, False)
  adv = jnp.zeros(8) if advantages is None else advantages
  gd, params = nnx.split(student)
  tg, tp = nnx.split(teacher)
  opt_state = opt.init(params)
  fn = jax.jit(steps.train_step, static_argnames=("graphdef", "teacher_graphdef", "spec",
                                                  "optimizer", "grad_accum"))
  losses = []
  for _ in range(steps_n):
    params, opt_state, m = fn(gd, params, opt_state, tg, tp, view, None if share_ce else view,
                              adv, spec=spec,
                              optimizer=opt, grad_accum=grad_accum)
    losses.append(float(m["loss"][0]))
  return losses, params, m


CASES = {
    "fkl": steps.LossSpec(loss=loss_lib.get("fkl")), "rkl": steps.LossSpec(loss=loss_lib.get("rkl")),
    "jsd": steps.LossSpec(loss=loss_lib.get("jsd", beta=0.5)), "tvd": steps.LossSpec(loss=loss_lib.get("tvd")),
    "skl": steps.LossSpec(loss=loss_lib.get("skl", alpha=0.1)), "srkl": steps.LossSpec(loss=loss_lib.get("srkl", alpha=0.1)),
    "atkd": steps.LossSpec(loss=loss_lib.get("atkd")),
    "jsd_fused_seq": steps.LossSpec(loss=loss_lib.get("jsd"), fused=True, chunk_size=16, reduction="sequence"),
    "atkd_fused": steps.LossSpec(loss=loss_lib.get("atkd"), fused=True, chunk_size=16),
    "sft": steps.LossSpec(mode="sft"),
    "fkl_ce": steps.LossSpec(loss=loss_lib.get("fkl"), ce_weight=0.5, temperature=2.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_falls_on_a_fixed_batch(setup, name):
  losses, _, _ = _run(setup, CASES[name])
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.8 * losses[0], losses


def test_loss_falls_on_fixed_student_samples(setup):
  losses, _, _ = _run(setup, steps.LossSpec(loss=loss_lib.get("rkl")), on_policy=True)
  assert losses[-1] < 0.8 * losses[0], losses


def test_rl_plus_gkd_moves_toward_rewarded_samples(setup):
  """(1-alpha)*REINFORCE + alpha*divergence: positive advantages raise those samples' log-prob."""
  spec = steps.LossSpec(loss=loss_lib.get("jsd"), rl_alpha=0.5)
  adv = jnp.array([1.0, -1.0] * 4)
  _, params, m = _run(setup, spec, on_policy=True, advantages=adv, steps_n=8)
  assert {"pg", "divergence"} <= set(m)
  spec_tok = steps.LossSpec(loss=loss_lib.get("jsd"), rl_alpha=0.0, token_rkl_reward=True)
  losses, _, m = _run(setup, spec_tok, on_policy=True, steps_n=8)
  assert "pg" in m and "divergence" not in m and all(np.isfinite(losses))


def test_grad_accumulation_equals_full_batch(setup):
  spec = steps.LossSpec(loss=loss_lib.get("fkl"), reduction="sequence")
  full, p1, _ = _run(setup, spec, steps_n=2)
  acc, p2, _ = _run(setup, spec, steps_n=2, grad_accum=4)
  np.testing.assert_allclose(acc, full, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_divergence_metric_matches_direct_computation(setup):
  mesh, teacher, batch = setup
  _, params, m = _run(setup, steps.LossSpec(loss=loss_lib.get("fkl")), steps_n=1, lr=0.0)
  student = Llama(STUDENT, rngs=nnx.Rngs(1))
  view = steps.batch_view(batch, False)
  pick = lambda x: jnp.take_along_axis(x, view["loss_positions"][..., None], axis=1)
  s = pick(student(view["tokens"], mask_BxT=view["mask"]))
  t = pick(teacher(view["tokens"], mask_BxT=view["mask"]))
  want = dv.masked_mean(dv.forward_kl(s, t), view["loss_mask"])[0]
  total, count = m["divergence"]
  np.testing.assert_allclose(float(total) / float(count), want, rtol=1e-5)
  np.testing.assert_allclose(m["loss"][0], want, rtol=1e-5)


def test_samples_view_layout():
  prompts = jnp.array([[5, 6, 7], [8, 0, 0]])
  lens = jnp.array([3, 1])
  gen = jnp.array([[1, 2], [3, 4]])
  mask = jnp.array([[True, True], [True, False]])
  v = steps.samples_view(prompts, lens, gen, mask, False, pad_id=9)
  assert v["tokens"].tolist() == [[5, 6, 7, 1, 2], [8, 3, 9, 9, 9]]
  assert v["mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
  # position t predicts t+1: trained where the next token is a valid generated token;
  # K = 2 (max_new_tokens) positions per row go through the head.
  assert v["loss_positions"][0].tolist() == [2, 3] and v["loss_positions"][1, 0] == 0
  assert v["loss_mask"].tolist() == [[1, 1], [1, 0]]
  assert v["targets"].tolist()[0] == [1, 2] and v["targets"][1, 0] == 3


@pytest.mark.parametrize("lmbda", [0.0, 0.3, 1.0])
def test_on_policy_fraction_is_lmbda(lmbda):
  draws = [rollout.step_source(7, s, lmbda, False) == "on_policy" for s in range(4000)]
  assert abs(np.mean(draws) - lmbda) < 0.03
  assert rollout.step_source(7, 11, lmbda, False) == rollout.step_source(7, 11, lmbda, False)
  if lmbda < 1:
    assert {rollout.step_source(7, s, lmbda, True) for s in range(50)} >= {"teacher"}


def test_shared_ce_forward_equals_a_separate_one(setup):
  """ce_view=None (CE on the view's own sequences) reuses the forward: same numbers."""
  spec = CASES["fkl_ce"]
  sep, p1, _ = _run(setup, spec, steps_n=3)
  shared, p2, _ = _run(setup, spec, steps_n=3, share_ce=True)
  np.testing.assert_allclose(shared, sep, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):  # summation order only: 3 Adam
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # steps at lr 1e-2


def test_top_layers_freezes_the_rest_and_keeps_the_top_gradients(setup):
  """train.top_layers=1 on the 3-layer teacher: layers 0-1 and the (tied) embedding stay put;
  the top layer and final norm get exactly the full model's gradients (frozen layers still run
  forward)."""
  mesh, teacher, batch = setup
  model = Llama(TEACHER, rngs=nnx.Rngs(3))
  gd, params = nnx.split(model)
  view = steps.batch_view(batch, False)

  def ce(p, top):
    s = steps.hidden_and_head(nnx.merge(gd, steps.freeze_below(p, top)), view)
    return steps.ce_sum(s, view, steps.LossSpec(mode="sft"))

  full = jax.grad(ce)(params, 0)
  part = jax.grad(ce)(params, 1)
  np.testing.assert_allclose(float(ce(params, 1)), float(ce(params, 0)), rtol=1e-6)
  flat_full = dict(jax.tree_util.tree_flatten_with_path(full)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(part)[0]:
    name = jax.tree_util.keystr(path)
    top = name.startswith("['layers'][2]") or name.startswith("['final_norm']")
    if top:
      np.testing.assert_allclose(np.asarray(g), np.asarray(flat_full[path]), rtol=1e-5, atol=1e-7)
    else:
      assert not np.any(np.asarray(g)), name
  assert np.any(np.asarray(full["embed"][...]))
  c = config_lib.defaults()
  c.train.top_layers = 1
  assert steps.LossSpec.from_config(c).top_layers == 1
  with pytest.raises(ValueError, match="train.top_layers needs a decoder-only"):
    steps.freeze_below({"encoder": {}}, 1)


def test_eval_token_kl_with_cached_teacher_hidden_states(setup):
  from gkd_jax import evaluation
  mesh, teacher, batch = setup
  student = Llama(STUDENT, rngs=nnx.Rngs(1))
  view = steps.batch_view(batch, False)
  pick = lambda x: jnp.take_along_axis(x, view["loss_positions"][..., None], axis=1)
  s = pick(student(view["tokens"], mask_BxT=view["mask"]))
  t = pick(teacher(view["tokens"], mask_BxT=view["mask"]))
  want = float(dv.masked_mean(dv.forward_kl(s, t), view["loss_mask"])[0])
  hidden = evaluation.teacher_hidden(teacher, [view, view])
  got = evaluation.token_kl(student, teacher, [view, view], hidden)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(evaluation.token_kl(student, teacher, [view]), want, rtol=1e-5)


def test_rollout_sources_views_and_samples(setup):
  """The rollout's view per source: the dataset's own (ce view shared), or the student's
  samples drawn with fold_in(rng, step) from (graphdef, params), the dataset view kept for CE."""
  import types
  mesh, teacher, batch = setup
  student = Llama(STUDENT, rngs=nnx.Rngs(1))
  sharding.shard_model(student, mesh)
  c = config_lib.defaults()
  c.data.batch_size, c.gkd.max_new_tokens, c.gkd.lmbda = 8, 5, 1.0
  tok = types.SimpleNamespace(pad_id=0, eos_id=63)
  ro = rollout.Rollout(c, mesh, None, tok, False)
  key = jax.random.PRNGKey(4)
  r = ro(batch, 3, nnx.split(student), nnx.split(teacher), key)
  assert r.source == "on_policy" and np.isnan(r.reward) and r.ce_view is not None
  out = sampling.sample(student, batch["prompt_tokens"], batch["prompt_lengths"],
                        rng=jax.random.fold_in(key, 3), max_new_tokens=5, eos_ids=[63], pad_id=0)
  want = steps.samples_view(batch["prompt_tokens"], batch["prompt_lengths"], out.tokens, out.mask,
                            False)
  for k in want:
    np.testing.assert_array_equal(r.view[k], want[k], err_msg=k)
  data = steps.batch_view(batch, False)
  for k in data:
    np.testing.assert_array_equal(r.ce_view[k], data[k], err_msg=k)
  c.gkd.lmbda = 0.0
  r = ro(batch, 3, nnx.split(student), nnx.split(teacher), key)
  assert r.source == "dataset" and r.ce_view is None
  np.testing.assert_array_equal(r.view["targets"], data["targets"])
  assert ro(batch, 3, nnx.split(student), nnx.split(teacher), key, sft=True).source == "sft"


def test_bf16_dots_step_is_the_rounded_models_loss_and_fused_agrees(setup):
  """teacher.dot_dtype / student.dot_dtype = "bfloat16" (tied heads, so the head's gradient is
  the embedding's): the step's loss is the JSD of the two models' own bf16-dot logits (their
  forward is checked against transformers in test_llama); the teacher stored in bfloat16
  (``students.frozen_teacher``) changes no number; fused and unfused heads agree in loss and
  update; parameters and gradients stay float32."""
  from gkd_jax.models import numerics

  mesh, _, batch = setup
  tied = dict(tie_embeddings=True, dot_dtype="bfloat16")
  teacher = Llama(dataclasses.replace(TEACHER, **tied), rngs=nnx.Rngs(0))
  student = Llama(dataclasses.replace(STUDENT, **tied), rngs=nnx.Rngs(1))
  stored = numerics.with_dot_dtype(*nnx.split(teacher), "bfloat16")
  view = steps.batch_view(batch, False)
  import optax

  opt = optax.sgd(1.0)  # the update is minus the gradient
  gd, p0 = nnx.split(student)
  fn = jax.jit(steps.train_step, static_argnames=("graphdef", "teacher_graphdef", "spec",
                                                  "optimizer", "grad_accum"))
  out = {}
  for name, t, fused in (("unfused", teacher, False), ("stored", stored, False),
                         ("fused", stored, True)):
    spec = steps.LossSpec(loss=loss_lib.get("jsd", beta=0.5), fused=fused, chunk_size=16)
    out[name] = fn(gd, p0, opt.init(p0), *nnx.split(t), view, None, jnp.zeros(8), spec=spec,
                   optimizer=opt, grad_accum=1)
  pick = lambda x: jnp.take_along_axis(x, view["loss_positions"][..., None], axis=1)
  s = pick(student(view["tokens"], mask_BxT=view["mask"]))
  t = pick(teacher(view["tokens"], mask_BxT=view["mask"]))
  want = dv.masked_mean(dv.generalized_jsd(s, t, beta=0.5), view["loss_mask"])[0]
  np.testing.assert_allclose(out["unfused"][2]["loss"][0], want, rtol=1e-5)
  assert float(out["stored"][2]["loss"][0]) == float(out["unfused"][2]["loss"][0])
  np.testing.assert_allclose(out["fused"][2]["loss"][0], want, rtol=1e-5)
  # the gradients agree up to bf16 roundings that the heads' f32 summation orders flip
  for a, b, p in zip(*(jax.tree.leaves(x) for x in (out["fused"][0], out["unfused"][0], p0))):
    assert a.dtype == jnp.float32
    g = np.abs(np.asarray(p) - np.asarray(b)).max()  # the largest step (plus f32 rounding)
    np.testing.assert_allclose(a, b, atol=1e-2 * g + 4e-7 * float(np.abs(p).max()))
  assert any(float(jnp.abs(a - b).max()) > 1e-4  # the step moved the parameters
             for a, b in zip(jax.tree.leaves(out["fused"][0]), jax.tree.leaves(p0)))


# ---------------------------------------------------------------- gradient clipping
def _grad_tree(scale):
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  return {"w": scale * jax.random.normal(k[0], (64, 48)), "b": scale * jax.random.normal(k[1], (48,)),
          "layers": {"w": scale * jax.random.normal(k[2], (3, 16, 16))}}


@pytest.mark.parametrize("scale", [1e-3, 1.0])  # global norm ~0.06 (kept) and ~60 (clipped)
def test_clip_by_global_norm_matches_optax(scale):
  import optax

  g = _grad_tree(scale)
  ours, state = steps.clip_by_global_norm(1.0).update(g, steps.clip_by_global_norm(1.0).init(g))
  ref, ref_state = optax.clip_by_global_norm(1.0).update(g, optax.clip_by_global_norm(1.0).init(g))
  assert state == ref_state  # optax's EmptyState: checkpoints interchangeable
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    if scale < 1:  # unclipped: the gradient itself, bit for bit
      np.testing.assert_array_equal(a, b)
    else:  # clipped: g * (1/||g||) vs (g / ||g||) * 1 differ by rounding only
      np.testing.assert_allclose(a, b, rtol=3e-7, atol=0)
  norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(ours))))
  assert norm == pytest.approx(min(1.0, float(optax.tree.norm(g))), rel=1e-6)


def test_adamw_update_fuses_the_clip_no_gradient_sized_temporary():
  """optax's clip divides each element by the norm; XLA will not duplicate a division into
  Adam's moment and update fusions, so the clipped gradient is materialised: a temporary as
  large as the gradient. Ours multiplies, which fuses: the compiled update needs no such
  buffer (optax's does, the control)."""
  import optax

  params = {"w": jnp.zeros((512, 512)), "v": jnp.zeros((512, 256))}
  grads = jax.tree.map(jnp.ones_like, params)
  size = sum(x.nbytes for x in jax.tree.leaves(params))
  c = config_lib.defaults()  # adamw, clip_norm 1.0
  c.optim.warmup_steps = 0
  control = optax.chain(optax.clip_by_global_norm(c.optim.clip_norm), optax.adamw(1e-3))
  temps = {}
  for name, opt in (("ours", steps.make_optimizer(c)), ("optax", control)):

    def update(opt_state, p, g, opt=opt):
      u, opt_state = opt.update(g, opt_state, p)
      return opt_state, optax.apply_updates(p, u)

    exe = jax.jit(update, donate_argnums=(0, 1)).lower(opt.init(params), params, grads).compile()
    temps[name] = exe.memory_analysis().temp_size_in_bytes
  assert temps["optax"] >= size / 2, temps  # the control: optax's clip is materialised
  assert temps["ours"] < size / 8, temps
