"""Steps off the documented path: each one is right (equal to the documented semantics) or loud.

Each test is written in the user's own pattern (the chain they would write, the resume the guide
used to advise) and checks the number or the error, against a hand-written reference.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

X = np.linspace(-1.0, 1.0, 24).reshape(8, 3)
Y = np.cos(np.arange(8.0))


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) + params["b"] - y) ** 2)


def fresh_params():
  return {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}


BATCH = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))
GRAD = jax.grad(loss_fn)
AMP_GRAD_FN = jax.grad(lambda p, _: loss_fn(p, BATCH))


def per_tensor_delta(grads, eps):
  return {k: g * min(1.0, eps / max(float(np.linalg.norm(g)), 1e-30)) for k, g in grads.items()}


# Case 1: amp not first in the chain -----------------------------------------------------------


@pytest.mark.parametrize("before", [
    optax.clip_by_global_norm(1e-3), optax.add_decayed_weights(0.5), optax.scale_by_adam()])
def test_amp_after_another_transform_raises_naming_first(before):
  tx = optax.chain(before, amp_optax.amp(0.05), optax.sgd(1.0))
  params = fresh_params()
  with pytest.raises(ValueError, match="must be\\s+first"):
    tx.update(GRAD(params, BATCH), tx.init(params), params, grad_fn=AMP_GRAD_FN)


def test_amp_after_a_transform_in_an_enclosing_chain_raises():
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.chain(amp_optax.amp(0.05), optax.sgd(1.0)))
  params = fresh_params()
  with pytest.raises(ValueError, match="transform 2 of 2"):
    jax.jit(lambda p, s: tx.update(GRAD(p, BATCH), s, p, grad_fn=AMP_GRAD_FN))(
        params, tx.init(params))


def test_amp_first_then_clip_clips_the_adversarial_gradient():
  """chain(amp, clip, sgd): the clip acts on the gradient at theta + Delta (NumPy reference)."""
  params = fresh_params()
  tx = optax.chain(amp_optax.amp(0.05), optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
  updates, _ = tx.update(GRAD(params, BATCH), tx.init(params), params, grad_fn=AMP_GRAD_FN)
  clean = {k: np.asarray(v, np.float64) for k, v in GRAD(params, BATCH).items()}
  delta = per_tensor_delta(clean, 0.05)
  adv = GRAD({k: params[k] + jnp.asarray(delta[k], jnp.float32) for k in params}, BATCH)
  adv = {k: np.asarray(v, np.float64) for k, v in adv.items()}
  scale = min(1.0, 1e-3 / np.sqrt(sum(float(np.sum(v ** 2)) for v in adv.values())))
  for k in params:
    np.testing.assert_allclose(updates[k], -adv[k] * scale, rtol=1e-5, atol=1e-9)
  assert float(optax.tree.norm(updates)) == pytest.approx(1e-3, rel=1e-5)


def test_grouped_amp_not_first_raises():
  params = fresh_params()
  grouped = amp_optax.group_batch(BATCH, 2)
  _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(params, grouped)
  tx = optax.chain(optax.add_decayed_weights(0.1), amp_optax.grouped_amp(0.05, num_groups=2))
  with pytest.raises(ValueError, match="must be\\s+first"):
    tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)


# Case 2: anything after drop_in_amp ------------------------------------------------------------


@pytest.mark.parametrize("after", [optax.scale_by_learning_rate(1e-2), optax.clip(0.01)])
def test_a_transform_after_drop_in_amp_raises_naming_last(after):
  tx = optax.chain(amp_optax.drop_in_amp(optax.scale_by_adam(), 0.05), after)
  params = fresh_params()
  with pytest.raises(ValueError, match="must be\\s+last"):
    tx.update(GRAD(params, BATCH), tx.init(params), params)


def test_drop_in_amp_inside_lookahead_raises():
  tx = optax.lookahead(amp_optax.drop_in_amp(optax.sgd(0.1), 0.05), sync_period=3,
                       slow_step_size=0.5)
  params = optax.LookaheadParams.init_synced(fresh_params())
  with pytest.raises(ValueError, match="lookahead"):
    tx.update(GRAD(params.fast, BATCH), tx.init(params), params)


def test_amp_inside_lookahead_names_lookahead_when_grad_fn_is_lost():
  tx = optax.with_extra_args_support(
      optax.lookahead(optax.chain(amp_optax.amp(0.05), optax.sgd(0.1)), 3, 0.5))
  params = optax.LookaheadParams.init_synced(fresh_params())
  with pytest.raises(ValueError, match="lookahead calls its inner optimiser"):
    tx.update(GRAD(params.fast, BATCH), tx.init(params), params, grad_fn=AMP_GRAD_FN)


def test_drop_in_amp_with_the_transforms_inside_runs_the_base_chain():
  """The fix the error names: drop_in_amp(chain(adam, lr)) moves to theta + Delta_1, then
  theta + base(g_1), with base the whole chain (reference: optax on the NumPy Delta)."""
  params = fresh_params()
  base = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2))
  tx = amp_optax.drop_in_amp(base, 0.05)
  state = tx.init(params)
  updates, state = tx.update(GRAD(params, BATCH), state, params)
  perturbed = optax.apply_updates(params, updates)
  delta = per_tensor_delta({k: np.asarray(v, np.float64) for k, v in GRAD(params, BATCH).items()},
                           0.05)
  for k in params:
    np.testing.assert_allclose(perturbed[k] - params[k], delta[k], rtol=1e-5, atol=1e-7)
  updates, state = tx.update(GRAD(perturbed, BATCH), state, perturbed)
  after = optax.apply_updates(perturbed, updates)
  base_updates, _ = base.update(GRAD(perturbed, BATCH), base.init(params), params)
  expected = optax.apply_updates(params, base_updates)
  for k in params:
    np.testing.assert_allclose(after[k], expected[k], rtol=1e-6, atol=1e-7)


# Case 3: resuming a drop-in run -----------------------------------------------------------------


def _drop_in_run(tx, calls, resume_at=None):
  """``calls`` calls of the unchanged step; at ``resume_at`` the parameters are replaced by
  ``unperturbed_params`` (what a run restored from such a checkpoint holds)."""
  params = fresh_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(GRAD(params, BATCH), state, params)
    return optax.apply_updates(params, updates), state

  for i in range(calls):
    if i == resume_at:
      params = amp_optax.unperturbed_params(params, state)
    params, state = step(params, state)
  return amp_optax.unperturbed_params(params, state)


@pytest.mark.slow
@pytest.mark.parametrize("make_tx, resume_at, extra_calls", [
    (lambda: amp_optax.drop_in_amp(optax.sgd(0.1, momentum=0.9), 0.05), 3, 1),  # phase 1
    (lambda: amp_optax.drop_in_amp(optax.adam(1e-2), 0.05, inner_steps=2), 4, 1),  # phase 1
    (lambda: amp_optax.drop_in_amp(optax.adam(1e-2), 0.05, inner_steps=2), 5, 2),  # phase 2
    (lambda: amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, ascent="momentum"), 4, 1),
])
def test_resume_from_unperturbed_params_restarts_the_step_exactly(make_tx, resume_at,
                                                                  extra_calls):
  """Resumed mid-cycle from theta, the step notices and restarts its AMP step (the calls of
  the cycle so far are spent again; the momentum ascent spends one call to move back to
  theta + Delta), then continues exactly as the uninterrupted run: bitwise, that many calls
  later."""
  uninterrupted = _drop_in_run(make_tx(), 12)
  resumed = _drop_in_run(make_tx(), 12 + extra_calls, resume_at=resume_at)
  for k in uninterrupted:
    np.testing.assert_array_equal(resumed[k], uninterrupted[k])
  # Without the restart the resumed run would differ: a test that can fail.
  assert not np.allclose(_drop_in_run(make_tx(), 12, resume_at=resume_at)["w"],
                         uninterrupted["w"], atol=1e-6)


# Case 4: drop_in_amp(apply_if_finite(base)) ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_apply_if_finite_inside_drop_in_amp_survives_a_nan_gradient(inner_steps):
  tx = amp_optax.drop_in_amp(optax.apply_if_finite(optax.sgd(0.1), 3), 0.05,
                             inner_steps=inner_steps)
  params = fresh_params()
  state = tx.init(params)
  for call in range(4 * (inner_steps + 1)):
    grads = GRAD(params, BATCH)
    if call in (0, inner_steps + 2):  # a clean call, then an ascent call
      grads = jax.tree.map(lambda g: g * jnp.nan, grads)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params)), call
  theta = amp_optax.unperturbed_params(params, state)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(theta))
  assert float(jnp.linalg.norm(theta["w"] - fresh_params()["w"])) > 1e-3  # it did train


def test_nan_gradient_skipped_by_inner_apply_if_finite_returns_to_theta():
  tx = amp_optax.drop_in_amp(optax.apply_if_finite(optax.sgd(0.1), 3), 0.05)
  params = fresh_params()
  state = tx.init(params)
  updates, state = tx.update(GRAD(params, BATCH), state, params)  # to theta + Delta_1
  perturbed = optax.apply_updates(params, updates)
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, GRAD(perturbed, BATCH))
  updates, state = tx.update(nan_grads, state, perturbed)
  back = optax.apply_updates(perturbed, updates)
  for k in params:
    np.testing.assert_allclose(back[k], params[k], atol=1e-7)
  assert int(state.phase) == 0


# Case 6: low-precision parameters ---------------------------------------------------------------


def test_bf16_delta_norm_is_the_applied_perturbation_and_init_warns():
  w = (jax.random.normal(jax.random.key(0), (256, 256)) * np.sqrt(2 / 256)).astype(jnp.bfloat16)
  params = {"w": w}
  grads = {"w": jax.random.normal(jax.random.key(1), (256, 256)).astype(jnp.bfloat16)}
  seen = {}

  def grad_fn(p, _):
    seen["applied"] = p["w"].astype(jnp.float32) - w.astype(jnp.float32)
    return grads

  tx = amp_optax.amp(0.05)
  with pytest.warns(UserWarning, match="bfloat16.*rounds away"):
    state = tx.init(params)
  _, state = tx.update(grads, state, params, grad_fn=grad_fn)
  applied = float(jnp.linalg.norm(seen["applied"]))
  assert abs(applied - 0.05) > 5e-4  # the rounding is real (here 0.0505: outside the ball) ...
  assert float(state.delta_norm) == pytest.approx(applied, rel=1e-6)  # ... and reported


def test_float32_parameters_do_not_warn_and_report_epsilon():
  params = fresh_params()
  tx = amp_optax.amp(0.05, norm="global")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = tx.init(params)
  _, state = tx.update(GRAD(params, BATCH), state, params, grad_fn=AMP_GRAD_FN)
  assert float(state.delta_norm) == pytest.approx(0.05, rel=1e-6)


# Unclear errors that now say what to change ---------------------------------------------------


def test_drop_in_gradient_of_the_wrong_shape_is_named():
  params = {"w": jnp.ones((8,))}
  tx = amp_optax.drop_in_amp(optax.sgd(0.1), 0.05)
  with pytest.raises(ValueError, match=r"shape \(1,\) at params\['w'\]"):
    tx.update({"w": jnp.ones((1,))}, tx.init(params), params)


def test_inject_hyperparams_around_drop_in_amp_names_the_fix_and_then_runs():
  params = fresh_params()
  with pytest.raises(TypeError, match=r"drop_in_amp\(\).*static_args=\('inner_steps',\)"):
    optax.inject_hyperparams(amp_optax.drop_in_amp)(optax.sgd(0.1), 0.05).init(params)
  tx = optax.inject_hyperparams(amp_optax.drop_in_amp, static_args=("inner_steps",))(
      optax.sgd(0.1), 0.05)
  plain = amp_optax.drop_in_amp(optax.sgd(0.1), 0.05)
  updates, _ = jax.jit(tx.update)(GRAD(params, BATCH), tx.init(params), params)
  expected, _ = plain.update(GRAD(params, BATCH), plain.init(params), params)
  for k in params:
    np.testing.assert_allclose(updates[k], expected[k], rtol=1e-6)


def test_reuse_correction_is_not_stored_from_a_step_with_a_negative_traced_epsilon():
  """That step's updates are NaN; the steps without ascent after it stay clean + the last
  valid correction (zero here), not a correction from the invalid step."""
  bad = 2**25
  tx = amp_optax.amp(lambda count: jnp.where(count == bad, -0.5, 0.5), reuse_correction=True)
  params = {"w": jnp.array([1.0, -2.0, 0.5])}
  loss = lambda q: jnp.sum(q["w"] ** 4)  # noqa: E731
  clean = jax.grad(loss)(params)
  step = jax.jit(lambda s, ascend: tx.update(clean, s, params, grad_fn=jax.grad(
      lambda q, _: loss(q)), ascend=ascend), static_argnums=1)
  updates, state = step(tx.init(params)._replace(count=jnp.asarray(bad, jnp.int32)), True)
  assert np.all(np.isnan(updates["w"]))
  updates, state = step(state, False)
  np.testing.assert_array_equal(updates["w"], clean["w"])


def test_infinite_inner_lr_is_refused_at_build():
  with pytest.raises(ValueError, match="`inner_lr` must be finite"):
    amp_optax.amp(0.1, inner_lr=float("inf"))


def test_grouped_amp_errors_name_grouped_amp():
  with pytest.raises(TypeError, match=r"^grouped_amp\(\): `batch_axis_name`"):
    amp_optax.grouped_amp(0.1, num_groups=2, batch_axis_name=3)


def test_linen_state_with_a_loss_scale_refuses_an_unscaled_amp_grad_fn():
  """Flax's ImageNet pattern (a TrainState with dynamic_scale, the closure loss): building
  amp_grad_fn without dynamic_scale= is an error naming it; with it, the step runs."""
  flax_linen = pytest.importorskip("amp_optax.flax_linen")
  from flax.training import dynamic_scale as dynamic_scale_lib
  nn = pytest.importorskip("flax.linen")

  class State(flax_linen.TrainState):
    dynamic_scale: dynamic_scale_lib.DynamicScale

  model = nn.Dense(1, dtype=jnp.float16)
  x, y = BATCH[0], BATCH[1][:, None]
  params = model.init(jax.random.key(0), x)["params"]
  state = State.create(apply_fn=model.apply, params=params,
                       tx=optax.chain(amp_optax.amp(0.05), optax.sgd(0.1)),
                       dynamic_scale=dynamic_scale_lib.DynamicScale())

  def step(state, scaled):
    def loss(p):
      return jnp.mean((model.apply({"params": p}, x).astype(jnp.float32) - y) ** 2)
    grad_fn = state.dynamic_scale.value_and_grad(loss)
    dynamic_scale, is_fin, _, grads = grad_fn(state.params)
    amp_grad_fn = flax_linen.make_grad_fn(
        loss, dynamic_scale=state.dynamic_scale if scaled else None)
    return state.apply_gradients(grads=grads, grad_fn=amp_grad_fn, dynamic_scale=dynamic_scale)

  with pytest.raises(ValueError, match=r"dynamic_scale=state.dynamic_scale"):
    jax.jit(step, static_argnums=1)(state, False)
  new_state = jax.jit(step, static_argnums=1)(state, True)
  assert int(new_state.step) == 1


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_a_bf16_grad_fn_gives_updates_in_the_clean_gradients_dtype_for_every_k(inner_steps):
  params = {"w": jnp.ones(3)}
  tx = amp_optax.amp(0.05, inner_steps=inner_steps)
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params,
                         grad_fn=lambda p, _: {"w": jnp.ones(3, jnp.bfloat16)})
  assert updates["w"].dtype == jnp.float32


def test_unperturbed_params_takes_an_nnx_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, amp_optax.drop_in_amp(optax.sgd(0.1), 0.05), wrt=nnx.Param)
  before = nnx.state(model, nnx.Param)
  theta = jax.tree.map(jnp.array, before)
  grads = nnx.grad(lambda m: jnp.mean(m(BATCH[0]) ** 2))(model)
  optimizer.update(model, grads)  # an ascent call: the model now holds theta + Delta_1
  held = nnx.state(model, nnx.Param)
  assert float(jnp.abs(held["kernel"][...] - theta["kernel"][...]).max()) > 1e-3
  restored = amp_optax.unperturbed_params(held, optimizer.opt_state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(theta), strict=True):
    np.testing.assert_array_equal(got, want)


# Case 10: drop_in_amp in an unchanged loop ------------------------------------------------------


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_drop_in_amp_says_at_init_that_a_step_takes_k_plus_1_calls(inner_steps):
  params = fresh_params()
  tx = amp_optax.drop_in_amp(optax.sgd(optax.constant_schedule(0.1)), 0.05,
                             inner_steps=inner_steps)
  calls = inner_steps + 1
  with pytest.warns(UserWarning, match=rf"one AMP step takes inner_steps \+ 1 = {calls} calls"
                                       rf".*a loop of N calls makes N // {calls} steps"):
    state = tx.init(params)
  # What the warning says, measured: 3 * calls calls of an unchanged loop are 3 descent steps.
  for _ in range(3 * calls):
    updates, state = tx.update(GRAD(params, BATCH), state, params)
    params = optax.apply_updates(params, updates)
  assert int(state.count) == 3 and int(state.phase) == 0
  schedule_state = state.inner_state[1]  # sgd's scale_by_schedule: the schedule's step count
  assert int(schedule_state.count) == 3


def test_drop_in_amp_momentum_ascent_takes_one_call_per_step_and_does_not_warn():
  tx = amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, ascent="momentum")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tx.init(fresh_params())
