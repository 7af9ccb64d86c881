"""Properties, errors and composition of amp_optax.amp."""

import functools
import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tree_asserts import assert_tree_finite
from tree_asserts import assert_trees_close
from tree_asserts import assert_trees_equal

import amp_optax


def mlp_params(seed=0, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
      "dense": {"kernel": jax.random.normal(k1, (5, 7), dtype), "bias": jnp.zeros((7,), dtype)},
      "out": {"kernel": jax.random.normal(k2, (7, 2), dtype), "bias": 0.1 * jnp.ones((2,), dtype)},
      "scale": jax.random.normal(k3, (), dtype),
  }


def mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  out = params["scale"] * (h @ params["out"]["kernel"]) + params["out"]["bias"]
  return jnp.mean((out - y) ** 2)


def make_batch(seed=1, n=8, dtype=jnp.float32):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, 5), dtype), jax.random.normal(ky, (n, 2), dtype)


def zero_params(dtype=jnp.float32):
  """Params at the origin, so that theta + Delta == Delta exactly."""
  return jax.tree.map(jnp.zeros_like, mlp_params(dtype=dtype))


def delta_probe(params):
  """A grad_fn returning the perturbation it is called at: p - params.

  Exact when params are zero; elsewhere p - params has rounding error.
  """
  return lambda p, _: jax.tree.map(lambda a, b: a - b, p, params)


def leaf_norms(tree):
  return [float(jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32))) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------- the ascent


@pytest.mark.parametrize("k_steps", [1, 2, 5])
@pytest.mark.parametrize("eps", [1e-3, 0.3, 10.0])
def test_delta_stays_in_per_tensor_ball(k_steps, eps):
  params = zero_params()
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)
  tx = amp_optax.amp(eps, inner_lr=2.0, inner_steps=k_steps, norm="per_tensor")
  delta, state = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
  for n in leaf_norms(delta):
    assert n <= eps * (1 + 1e-5)
  assert float(state.delta_norm) == pytest.approx(float(amp_optax.global_l2_norm(delta)), rel=1e-5)


@pytest.mark.parametrize("k_steps", [1, 2, 5])
@pytest.mark.parametrize("eps", [1e-3, 0.3, 10.0])
def test_delta_stays_in_global_ball(k_steps, eps):
  params = zero_params()
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)
  tx = amp_optax.amp(eps, inner_lr=2.0, inner_steps=k_steps, norm="global")
  delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
  assert float(amp_optax.global_l2_norm(delta)) <= eps * (1 + 1e-5)


@pytest.mark.slow
def test_small_ball_is_reached_and_direction_kept():
  grads = jax.grad(mlp_loss)(mlp_params(), make_batch())
  params = zero_params()
  eps = 1e-3
  for norm in ("per_tensor", "global"):
    tx = amp_optax.amp(eps, norm=norm)
    delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
    if norm == "per_tensor":
      np.testing.assert_allclose(leaf_norms(delta), eps, rtol=1e-5)
      want = jax.tree.map(lambda g: eps * g / jnp.linalg.norm(jnp.ravel(g)), grads)
    else:
      assert float(amp_optax.global_l2_norm(delta)) == pytest.approx(eps, rel=1e-5)
      want = jax.tree.map(lambda g: eps * g / amp_optax.global_l2_norm(grads), grads)
    assert_trees_close(delta, want, rtol=1e-5, atol=1e-9)


def test_large_epsilon_one_step_is_gradient_at_shifted_point():
  params, batch = mlp_params(), make_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  inner_lr = 0.05
  tx = amp_optax.amp(1e6, inner_lr=inner_lr, inner_steps=1)
  grad_fn = jax.grad(lambda p, _: mlp_loss(p, batch))
  got, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  shifted = jax.tree.map(lambda p, g: p + inner_lr * g, params, grads)
  assert_trees_close(got, jax.grad(mlp_loss)(shifted, batch), rtol=1e-6)


def test_second_step_continues_from_first():
  """K=2 with a huge ball: Delta_2 = lr*g0 + lr*g(theta + lr*g0)."""
  params, batch = mlp_params(), make_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  lr = 0.05
  tx = amp_optax.amp(1e6, inner_lr=lr, inner_steps=2)
  grad_fn = jax.grad(lambda p, _: mlp_loss(p, batch))
  got, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  p1 = jax.tree.map(lambda p, g: p + lr * g, params, grads)
  g1 = jax.grad(mlp_loss)(p1, batch)
  p2 = jax.tree.map(lambda p, a, b: p + lr * a + lr * b, params, grads, g1)
  assert_trees_close(got, jax.grad(mlp_loss)(p2, batch), rtol=1e-4, atol=1e-5)


def test_zero_gradient_gives_zero_delta_and_no_nan():
  params = mlp_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  for norm in ("per_tensor", "global"):
    for eps in (0.0, 0.5):
      tx = amp_optax.amp(eps, norm=norm, inner_steps=2)
      update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, grad_fn=delta_probe(params)))
      delta, state = update(zeros, tx.init(params), params)
      assert_tree_finite((delta, state))
      assert_trees_equal(delta, zeros)
      assert float(state.delta_norm) == 0.0


@pytest.mark.parametrize("k_steps", [1, 3])
def test_grad_fn_called_k_times_with_inner_step(k_steps):
  params, batch = mlp_params(), make_batch()
  calls = []

  def grad_fn(p, inner_step):
    calls.append(int(inner_step))
    return jax.grad(mlp_loss)(p, batch)

  tx = amp_optax.amp(0.1, inner_steps=k_steps)
  with jax.disable_jit():  # so that the fori_loop body runs once per step
    tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params, grad_fn=grad_fn)
  assert calls == list(range(k_steps))


def test_mask_leaves_unperturbed():
  params = zero_params()
  grads = jax.tree.map(jnp.ones_like, params)
  mask = jax.tree.map(lambda p: p.ndim == 2, params)  # kernels only
  for m in (mask, lambda p: jax.tree.map(lambda x: x.ndim == 2, p)):
    tx = amp_optax.amp(0.5, mask=m, norm="global")
    delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
    assert float(jnp.abs(delta["dense"]["bias"]).max()) == 0.0
    assert float(jnp.abs(delta["out"]["bias"]).max()) == 0.0
    assert float(jnp.abs(delta["scale"])) == 0.0
    assert float(jnp.abs(delta["dense"]["kernel"]).min()) > 0.0
    # Unmasked leaves do not take a share of the global ball.
    assert float(amp_optax.global_l2_norm(delta)) == pytest.approx(0.5, rel=1e-5)


def test_prefix_mask():
  params = zero_params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = amp_optax.amp(0.5, mask={"dense": True, "out": False, "scale": False})
  delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
  assert float(jnp.abs(delta["out"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(delta["dense"]["kernel"]).min()) > 0.0


def test_non_float_leaves_left_alone():
  params = {"w": jnp.ones((3,)), "step": jnp.array(7, jnp.int32)}
  seen = []

  def grad_fn(p, _):
    seen.append(p["step"])
    return {"w": 2.0 * p["w"], "step": jnp.zeros((), jnp.int32)}

  grads = {"w": jnp.ones((3,)), "step": jnp.zeros((), jnp.int32)}
  tx = amp_optax.amp(0.5, norm="global")
  out, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
  assert int(seen[0]) == 7 and seen[0].dtype == jnp.int32
  assert out["step"].dtype == jnp.int32


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_params(dtype):
  grads = jax.grad(mlp_loss)(mlp_params(dtype=dtype), make_batch(dtype=dtype))
  params = zero_params(dtype)
  for norm in ("per_tensor", "global"):
    tx = amp_optax.amp(0.5, norm=norm, inner_steps=2)
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, grad_fn=delta_probe(params)))
    delta, state = update(grads, tx.init(params), params)
    for d in jax.tree.leaves(delta):
      assert d.dtype == dtype
    assert_tree_finite(delta)
    assert state.delta_norm.dtype == jnp.float32
    assert 0.0 < float(state.delta_norm) <= 0.5 * (np.sqrt(5) if norm == "per_tensor" else 1) * 1.01


def test_fp16_large_gradient_norm_does_not_overflow():
  """The sum of squares of 1e3 fp16 entries of 300 overflows fp16 (max 65504)."""
  params = {"w": jnp.zeros((1000,), jnp.float16)}
  grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
  tx = amp_optax.amp(1.0)
  delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
  assert float(jnp.linalg.norm(delta["w"].astype(jnp.float32))) == pytest.approx(1.0, rel=1e-2)


# ------------------------------------------------------------- identities


def erm_and_amp_updates(amp_tx, base, steps=4, grad_fn_factory=None):
  """Runs ``base`` alone and ``chain(amp_tx, base)`` on the same batches."""
  params, erm_params = mlp_params(), mlp_params()
  tx = optax.chain(amp_tx, base)
  state, erm_state = tx.init(params), base.init(params)
  for i in range(steps):
    batch = make_batch(seed=10 + i)
    grads = jax.grad(mlp_loss)(params, batch)
    gf = (grad_fn_factory or (lambda b: jax.grad(lambda p, _: mlp_loss(p, b))))(batch)
    updates, state = tx.update(grads, state, params, grad_fn=gf)
    params = optax.apply_updates(params, updates)
    erm_grads = jax.grad(mlp_loss)(erm_params, batch)
    erm_updates, erm_state = base.update(erm_grads, erm_state, erm_params)
    erm_params = optax.apply_updates(erm_params, erm_updates)
  return params, erm_params


def base_optimizer():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True))


def test_zero_steps_is_base_optimizer_to_the_bit_and_never_calls_grad_fn():
  def forbidden(p, k):
    raise AssertionError("grad_fn must not be called with inner_steps=0")

  params, erm_params = erm_and_amp_updates(
      amp_optax.amp(0.5, inner_steps=0), base_optimizer(),
      grad_fn_factory=lambda b: forbidden)
  assert_trees_equal(params, erm_params)


def test_zero_steps_needs_no_grad_fn():
  params = mlp_params()
  tx = amp_optax.amp(0.5, inner_steps=0)
  grads = jax.grad(mlp_loss)(params, make_batch())
  out, _ = tx.update(grads, tx.init(params), params)
  assert_trees_equal(out, grads)


@pytest.mark.slow
def test_zero_epsilon_is_base_optimizer_up_to_rounding():
  params, erm_params = erm_and_amp_updates(amp_optax.amp(0.0, inner_steps=2), base_optimizer())
  assert_trees_close(params, erm_params, rtol=1e-5, atol=1e-6)


def test_amp_changes_the_trajectory():
  params, erm_params = erm_and_amp_updates(amp_optax.amp(0.5), base_optimizer())
  diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), params, erm_params)
  assert max(float(d) for d in jax.tree.leaves(diff)) > 1e-3


# ------------------------------------------------------------- composition


def test_chain_accepts_and_ignores_unknown_extra_args():
  params, batch = mlp_params(), make_batch()
  tx = optax.chain(amp_optax.amp(0.5), optax.add_decayed_weights(1e-4), optax.sgd(0.1))
  state = tx.init(params)
  loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
  gf = jax.grad(lambda p, _: mlp_loss(p, batch))
  with_extra, _ = tx.update(grads, state, params, grad_fn=gf, value=loss, some_flag=True)
  without, _ = tx.update(grads, state, params, grad_fn=gf)
  assert_trees_equal(with_extra, without)


def test_same_train_step_runs_with_optax_sam():
  """A train step written for optax.contrib.sam(opaque_mode=True) runs with amp."""
  params, batch = mlp_params(), make_batch()

  def make_step(tx):
    @jax.jit
    def step(params, state):
      grads = jax.grad(mlp_loss)(params, batch)
      updates, state = tx.update(grads, state, params,
                                 grad_fn=jax.grad(lambda p, _: mlp_loss(p, batch)))
      return optax.apply_updates(params, updates), state
    return step

  sam = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), sync_period=2, opaque_mode=True)
  amp = optax.chain(amp_optax.amp(1e6, inner_lr=0.05), optax.sgd(0.1))
  p_sam, _ = make_step(sam)(params, sam.init(params))
  p_amp, _ = make_step(amp)(params, amp.init(params))
  # With an unbounded ball and an un-normalised adversary both take the same
  # ascent step theta + 0.05 g, so they agree.
  assert_trees_close(p_sam, p_amp, rtol=1e-6)


def test_inject_hyperparams_changes_epsilon_between_steps():
  params = zero_params()
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps", "norm"))(
      epsilon=0.5, inner_steps=1, norm="global")
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=delta_probe(params)))
  delta, state = update(grads, state, params)
  assert float(amp_optax.global_l2_norm(delta)) == pytest.approx(0.5, rel=1e-5)
  state.hyperparams["epsilon"] = jnp.full_like(state.hyperparams["epsilon"], 0.125)
  delta, state = update(grads, state, params)
  assert float(amp_optax.global_l2_norm(delta)) == pytest.approx(0.125, rel=1e-5)
  assert update._cache_size() == 1


def test_inject_hyperparams_without_static_inner_steps_says_what_to_do():
  params = mlp_params()
  tx = optax.inject_hyperparams(amp_optax.amp)(epsilon=0.5, inner_steps=1)
  with pytest.raises(TypeError, match="static_args"):
    state = tx.init(params)
    tx.update(jax.tree.map(jnp.ones_like, params), state, params,
              grad_fn=delta_probe(params))


def test_schedules_are_evaluated_at_the_step_count():
  params = zero_params()
  grads = jax.tree.map(jnp.ones_like, params)
  eps_schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  lr_schedule = lambda count: 1.0 + count  # noqa: E731
  tx = amp_optax.amp(eps_schedule, inner_lr=lr_schedule, norm="global")
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=delta_probe(params)))
  for i in range(5):
    delta, state = update(grads, state, params)
    assert float(amp_optax.global_l2_norm(delta)) == pytest.approx(
        min(i / 4, 1.0), rel=1e-5, abs=1e-7)
  assert int(state.count) == 5
  # A ball large enough not to bind shows inner_lr's schedule: Delta = lr * g.
  tx = amp_optax.amp(1e6, inner_lr=lr_schedule)
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=delta_probe(params)))
  for i in range(3):
    delta, state = update(grads, state, params)
    assert_trees_close(delta, jax.tree.map(lambda g, i=i: (1.0 + i) * g, grads))


def test_no_recompilation_across_steps():
  params = mlp_params()
  tx = optax.chain(amp_optax.amp(optax.cosine_decay_schedule(0.5, 10), inner_steps=3),
                   optax.sgd(optax.cosine_decay_schedule(0.1, 10), momentum=0.9))
  traces = []

  @jax.jit
  def step(params, state, batch):
    traces.append(1)
    grads = jax.grad(mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params,
                               grad_fn=jax.grad(lambda p, _: mlp_loss(p, batch)))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(6):
    params, state = step(params, state, make_batch(seed=i))
  assert len(traces) == 1
  assert step._cache_size() == 1


def test_compiled_program_size_does_not_grow_with_k():
  """K > 1 with unroll=1 is one lax loop: the HLO for K=8 is no bigger than for K=2."""
  params, batch = mlp_params(), make_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  gf = jax.grad(lambda p, _: mlp_loss(p, batch))

  def hlo_len(k):
    tx = amp_optax.amp(0.5, inner_steps=k, unroll=1)
    f = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=gf))
    return len(f.lower(grads, tx.init(params), params).as_text())

  assert hlo_len(8) == hlo_len(2)


def _lowered_text(tx, params, batch):
  grads = jax.grad(mlp_loss)(params, batch)
  gf = jax.grad(lambda p, _: mlp_loss(p, batch))
  f = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=gf))
  return f.lower(grads, tx.init(params), params).as_text()


def test_default_loop_is_unrolled_on_cpu_and_a_loop_elsewhere(monkeypatch):
  """unroll=None decides per backend at trace time (XLA:CPU runs loop bodies slowly)."""
  params, batch = mlp_params(), make_batch()
  assert jax.default_backend() == "cpu"
  cpu_text = _lowered_text(amp_optax.amp(0.5, inner_steps=3), params, batch)
  assert "while" not in cpu_text
  assert cpu_text == _lowered_text(amp_optax.amp(0.5, inner_steps=3, unroll=True), params, batch)
  # As it would trace for a GPU or TPU: one loop body, compile time flat in K.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  gpu_text = _lowered_text(amp_optax.amp(0.5, inner_steps=3), params, batch)
  assert "while" in gpu_text
  assert gpu_text == _lowered_text(amp_optax.amp(0.5, inner_steps=3, unroll=1), params, batch)


def test_state_is_a_namedtuple_of_scalars():
  params = mlp_params()
  state = amp_optax.amp(0.5).init(params)
  assert isinstance(state, amp_optax.AmpState)
  assert state._fields[0] == "count"
  for leaf in jax.tree.leaves(state):  # no parameter-sized buffer unless asked for
    assert leaf.shape == ()
  assert state.correction == ()


def test_diagnostics_in_state():
  params, batch = mlp_params(), make_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  gf = jax.grad(lambda p, _: mlp_loss(p, batch))
  tx = amp_optax.amp(0.05, norm="global")
  out, state = tx.update(grads, tx.init(params), params, grad_fn=gf)
  assert float(state.delta_norm) == pytest.approx(0.05, rel=1e-5)
  assert float(state.clean_grad_norm) == pytest.approx(float(amp_optax.global_l2_norm(grads)),
                                                       rel=1e-6)
  assert float(state.perturbed_grad_norm) == pytest.approx(float(amp_optax.global_l2_norm(out)),
                                                           rel=1e-6)


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(epsilon=-0.1), ValueError, "epsilon"),
        (dict(epsilon=float("nan")), ValueError, "epsilon"),
        (dict(epsilon="big"), TypeError, "epsilon"),
        (dict(epsilon=0.5, inner_lr=-1.0), ValueError, "inner_lr"),
        (dict(epsilon=0.5, inner_steps=1.5), TypeError, "inner_steps"),
        (dict(epsilon=0.5, inner_steps=True), TypeError, "inner_steps"),
        (dict(epsilon=0.5, inner_steps=-1), ValueError, "inner_steps"),
        (dict(epsilon=0.5, norm="l2"), ValueError, "per_tensor"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, error, words):
  with pytest.raises(error, match=words):
    amp_optax.amp(**kwargs)


def test_mismatched_mask_fails_at_init():
  params = mlp_params()
  tx = amp_optax.amp(0.5, mask={"dense": True, "other": False})
  with pytest.raises(ValueError, match="mask"):
    tx.init(params)


def test_missing_grad_fn_shows_the_call():
  params = mlp_params()
  tx = optax.chain(amp_optax.amp(0.5), optax.sgd(0.1))
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"grad_fn=jax\.grad\(lambda p, _: loss_fn\(p, batch\)\)"):
    tx.update(grads, tx.init(params), params)


def test_missing_params_says_so():
  params = mlp_params()
  tx = amp_optax.amp(0.5)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params), None, grad_fn=delta_probe(params))


def test_grad_fn_with_wrong_tree_says_how_to_fix():
  params = mlp_params()
  tx = amp_optax.amp(0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(grads, tx.init(params), params, grad_fn=lambda p, _: p["dense"])


def test_updates_with_wrong_tree_says_so():
  params = mlp_params()
  tx = amp_optax.amp(0.5)
  with pytest.raises(ValueError, match="updates"):
    tx.update(params["dense"], tx.init(params), params, grad_fn=delta_probe(params))


@pytest.mark.slow
@pytest.mark.parametrize("unroll", [True, 2])
def test_unrolled_inner_loop_gives_the_same_update(unroll):
  params, batch = mlp_params(), make_batch()
  grads = jax.grad(mlp_loss)(params, batch)
  gf = jax.grad(lambda p, _: mlp_loss(p, batch))
  looped = amp_optax.amp(0.1, inner_steps=3)
  unrolled = amp_optax.amp(0.1, inner_steps=3, unroll=unroll)
  want, _ = jax.jit(lambda g, s, p: looped.update(g, s, p, grad_fn=gf))(
      grads, looped.init(params), params)
  got, _ = jax.jit(lambda g, s, p: unrolled.update(g, s, p, grad_fn=gf))(
      grads, unrolled.init(params), params)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("unroll", [0, -1, 1.5, "yes"])
def test_bad_unroll_fails_at_construction(unroll):
  with pytest.raises(ValueError, match="unroll"):
    amp_optax.amp(0.5, inner_steps=2, unroll=unroll)


# ------------------------------------------------ compositions and call mistakes (issue 8)


@pytest.mark.slow
def test_fp16_huge_inner_step_is_projected_not_nan():
  """inner_lr * g overflows float16 before the projection; the ascent runs in float32."""
  params16 = jax.tree.map(lambda p: p.astype(jnp.float16), mlp_params())
  batch16 = jax.tree.map(lambda x: x.astype(jnp.float16), make_batch())
  grads = jax.grad(mlp_loss)(params16, batch16)
  for k_steps in (1, 2):
    tx = amp_optax.amp(0.5, inner_lr=1e4, inner_steps=k_steps)
    delta, state = jax.jit(functools.partial(tx.update, grad_fn=delta_probe(params16)))(
        grads, tx.init(params16), params16)
    assert all(bool(jnp.all(jnp.isfinite(d))) for d in jax.tree.leaves(delta))
    assert bool(jnp.isfinite(state.delta_norm))
    # Each non-zero leaf's Delta is on the sphere of radius 0.5 (to fp16 rounding of p + d - p).
    for n, g in zip(leaf_norms(delta), jax.tree.leaves(grads)):
      if float(jnp.max(jnp.abs(g.astype(jnp.float32)))) > 0:
        assert n == pytest.approx(0.5, rel=2e-2)
    updates, _ = tx.update(grads, tx.init(params16), params16,
                           grad_fn=jax.grad(lambda p, _: mlp_loss(p, batch16)))
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert all(u.dtype == jnp.float16 for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("k_steps", [1, 2])
def test_wrong_shape_from_grad_fn_names_the_leaf(k_steps):
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = amp_optax.amp(0.5, inner_steps=k_steps)
  bad = lambda p, _: {"w": jnp.ones((3, 1)), "b": jnp.zeros(())}
  with pytest.raises(ValueError, match=r"shape \(3, 1\) at params\['w'\].*shape \(3,\)"):
    tx.update(grads, tx.init(params), params, grad_fn=bad)


def test_wrong_shape_of_clean_gradient_names_the_leaf():
  params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
  grads = {"w": jnp.ones((3, 1)), "b": jnp.zeros(())}
  tx = amp_optax.amp(0.5)
  with pytest.raises(ValueError, match=r"`updates` has shape \(3, 1\) at params\['w'\]"):
    tx.update(grads, tx.init(params), params, grad_fn=lambda p, _: p)


@pytest.mark.parametrize("wrap", ["masked", "multi_transform", "partition"])
def test_amp_inside_masking_wrappers_points_to_amp_mask(wrap):
  params, batch = mlp_params(), make_batch()
  inner = optax.chain(amp_optax.amp(0.5), optax.sgd(0.1))
  labels = jax.tree.map(lambda p: "amp" if p.ndim > 1 else "plain", params)
  if wrap == "masked":
    tx = optax.masked(inner, jax.tree.map(lambda p: p.ndim > 1, params))
  elif wrap == "multi_transform":
    tx = optax.multi_transform({"amp": inner, "plain": optax.sgd(0.1)}, labels)
  else:
    if not hasattr(optax, "partition"):
      pytest.skip("this optax has no optax.partition")
    tx = optax.partition({"amp": inner, "plain": optax.sgd(0.1)}, labels)
  grads = jax.grad(mlp_loss)(params, batch)
  with pytest.raises(ValueError, match=r"MaskedNode(.|\n)*amp_optax.amp\(eps, mask=mask\)"):
    tx.update(grads, tx.init(params), params,
              grad_fn=jax.grad(lambda p, _: mlp_loss(p, batch)))


def test_one_argument_grad_fn_shows_the_call():
  params, batch = mlp_params(), make_batch()
  tx = amp_optax.amp(0.5)
  with pytest.raises(TypeError, match=r"cannot be called as grad_fn\(params, inner_step\)"
                     r"(.|\n)*grad_fn=jax.grad\(lambda p, _: loss_fn\(p, batch\)\)"):
    tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params,
              grad_fn=lambda p: jax.grad(mlp_loss)(p, batch))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_grad_of_loss_with_batch_argument_gets_a_note():
  """jax.grad(loss_fn) has the right arity but takes inner_step for the batch."""
  params, batch = mlp_params(), make_batch()
  tx = amp_optax.amp(0.5)
  with pytest.raises(TypeError) as info:
    tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params,
              grad_fn=jax.grad(mlp_loss))
  notes = "\n".join(getattr(info.value, "__notes__", []))
  assert "grad_fn(perturbed_params, inner_step)" in notes
  assert "close over the batch" in notes


def test_grad_fn_passed_positionally_says_keyword():
  params, batch = mlp_params(), make_batch()
  tx = amp_optax.amp(0.5)
  gf = jax.grad(lambda p, _: mlp_loss(p, batch))
  with pytest.raises(TypeError, match="keyword argument, not positionally"):
    tx.update(jax.grad(mlp_loss)(params, batch), tx.init(params), params, gf)


def test_flax_train_state_dropping_grad_fn_is_named():
  pytest.importorskip("flax")
  from flax.training import train_state
  params, batch = mlp_params(), make_batch()
  state = train_state.TrainState.create(
      apply_fn=None, params=params, tx=optax.chain(amp_optax.amp(0.05), optax.sgd(0.1)))
  with pytest.raises(ValueError, match=r"amp_optax.flax_linen.TrainState"):
    state.apply_gradients(grads=jax.grad(mlp_loss)(params, batch),
                          grad_fn=jax.grad(lambda p, _: mlp_loss(p, batch)))


def test_missing_grad_fn_mentions_the_flax_helpers():
  params = mlp_params()
  tx = amp_optax.amp(0.5)
  with pytest.raises(ValueError, match=r"flax_linen.TrainState(.|\n)*optimizer.update"):
    tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("value", ["0.5", b"0.5", True, jnp.array([True])])
def test_epsilon_of_wrong_type_fails_at_construction(value):
  with pytest.raises(TypeError, match="epsilon"):
    amp_optax.amp(value)


def _run_update(tx, params, batch):
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(
      lambda q, _: mlp_loss(q, batch))))
  state = tx.init(params)
  updates, state = step(jax.grad(mlp_loss)(params, batch), state, params)
  return jax.block_until_ready(updates)


def test_schedule_negative_at_a_probed_step_raises_at_construction():
  with pytest.raises(ValueError, match=r"`epsilon` is -0.5 at step 1"):
    amp_optax.amp(lambda count: 0.5 - 1.0 * count)  # 0.5 at step 0, negative after
  # The first probed step past 1023 at or after 2000 (log-spaced probes).
  with pytest.raises(ValueError, match=r"`inner_lr` is -1.0 at step 2211"):
    amp_optax.amp(0.1, inner_lr=lambda count: jnp.where(count >= 2000, -1.0, 1.0))


def test_scalar_only_schedule_is_probed_over_its_first_steps():
  def schedule(count):  # Python control flow: fails on an array of counts
    return 0.1 if int(count) < 10 else -0.1
  with pytest.raises(ValueError, match=r"`epsilon` is -0.1 at step 10"):
    amp_optax.amp(schedule)


def test_negative_epsilon_past_the_probed_steps_gives_nan_updates():
  params, batch = mlp_params(), make_batch()
  # Negative from step 2**25 on, beyond the probed steps: only the device sees it.
  tx = amp_optax.amp(lambda count: jnp.where(count >= 2**25, -0.5, 0.5))
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(
      lambda q, _: mlp_loss(q, batch))))
  grads = jax.grad(mlp_loss)(params, batch)
  updates, _ = step(grads, tx.init(params), params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))  # epsilon(0) = 0.5: fine
  late = tx.init(params)._replace(count=jnp.asarray(2**25, jnp.int32))
  updates, _ = step(grads, late, params)
  assert all(np.isnan(x).all() for x in jax.tree.leaves(updates))


@pytest.mark.slow
def test_negative_injected_epsilon_gives_nan_updates():
  """Where optax.apply_if_finite must sit to skip such a step: tests/test_optax_conformance.py."""
  params, batch = mlp_params(), make_batch()
  tx = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps",))(epsilon=0.5)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(
      lambda q, _: mlp_loss(q, batch))))
  grads = jax.grad(mlp_loss)(params, batch)
  updates, _ = step(grads, state, params)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(updates))
  state.hyperparams["epsilon"] = jnp.asarray(-0.1)
  updates, _ = step(grads, state, params)
  assert all(np.isnan(x).all() for x in jax.tree.leaves(updates))


def test_injected_unroll_without_static_args_says_what_to_do():
  with pytest.raises(TypeError, match=r"static_args=\('inner_steps', 'unroll'\)"):
    optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps",))(
        epsilon=0.5, inner_steps=2, unroll=2).init(mlp_params())


def test_injected_callable_mask_without_static_args_says_what_to_do():
  params, batch = mlp_params(), make_batch()
  tx = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps",))(
      epsilon=0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  with pytest.raises(TypeError, match=r"static_args=\('inner_steps', 'mask'\)"):
    _run_update(tx, params, batch)
  # Listed as static, the same mask works.
  tx = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps", "mask"))(
      epsilon=0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(
      _run_update(tx, params, batch)))


# ------------------------------------------- relative radius and the cheaper step (issue 10)


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_relative_radius_scales_with_the_parameters(norm):
  params = mlp_params()
  params["dense"]["bias"] = jnp.zeros((7,))  # a zero tensor has a zero relative ball
  grads = jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params)
  eps = 1e-3  # small: the ascent reaches the sphere
  tx = amp_optax.amp(eps, norm=norm, relative=True)
  # delta_probe returns the perturbation itself (p - params, up to float32 rounding).
  delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
  if norm == "per_tensor":
    for d, p in zip(jax.tree.leaves(delta), jax.tree.leaves(params)):
      np.testing.assert_allclose(
          float(jnp.linalg.norm(jnp.ravel(d))), eps * float(jnp.linalg.norm(jnp.ravel(p))),
          rtol=1e-3, atol=1e-9)
    assert float(jnp.max(jnp.abs(delta["dense"]["bias"]))) == 0.0
  else:
    want = eps * float(amp_optax.global_l2_norm(params))
    assert float(amp_optax.global_l2_norm(delta)) == pytest.approx(want, rel=1e-3)


def _never_called(params, inner_step):
  raise AssertionError("grad_fn must not be called on a step with ascend=False")


def test_ascend_false_returns_the_clean_gradient_without_grad_fn():
  """ascend=False, decided in Python per call: no grad_fn call, the clean gradient, delta_norm 0."""
  params, batch = mlp_params(), make_batch()
  grad_fn = jax.grad(lambda p, _: mlp_loss(p, batch))
  tx = amp_optax.amp(0.1)
  step = jax.jit(lambda g, s, p, ascend: tx.update(
      g, s, p, **({"grad_fn": grad_fn} if ascend else {}), ascend=ascend), static_argnums=3)
  state = tx.init(params)
  grads = jax.grad(mlp_loss)(params, batch)
  for t in range(5):
    ascend = t % 3 == 0
    updates, state = step(grads, state, params, ascend)
    assert int(state.count) == t + 1
    assert (float(state.delta_norm) > 0) == ascend, t
    if ascend:
      assert float(amp_optax.global_l2_norm(jax.tree.map(jnp.subtract, updates, grads))) > 1e-4
    else:
      assert_trees_equal(updates, grads)  # the clean gradient, bitwise
  # A grad_fn given on a step without an ascent is not called (eagerly: no trace hides a call).
  updates, _ = tx.update(grads, state, params, grad_fn=_never_called, ascend=False)
  assert_trees_equal(updates, grads)
  assert step._cache_size() == 2  # one compiled step per value of ascend, no lax.cond
  assert "cond" not in step.lower(grads, state, params, False).as_text()
  assert "cond" not in step.lower(grads, state, params, True).as_text()


@pytest.mark.parametrize("ascend", ["yes", 1, jnp.asarray(True)])
def test_ascend_must_be_a_python_bool(ascend):
  params = mlp_params()
  tx = amp_optax.amp(0.1)
  with pytest.raises(TypeError, match=r"amp\(\): `ascend` must be a Python bool"):
    tx.update(params, tx.init(params), params, grad_fn=delta_probe(params), ascend=ascend)
  with pytest.raises(TypeError, match="static_argnames='ascend'"):  # traced: not static
    jax.jit(lambda p, s, a: tx.update(p, s, p, grad_fn=delta_probe(params), ascend=a))(
        params, tx.init(params), True)


def test_reuse_keeps_one_correction_per_float_leaf():
  params = mlp_params()
  params["step"] = jnp.zeros((), jnp.int32)
  state = amp_optax.amp(0.1, reuse_correction=True).init(params)
  assert [c.shape for c in state.correction] == [
      p.shape for p in jax.tree.leaves(params) if jnp.issubdtype(p.dtype, jnp.floating)]
  assert all(float(jnp.max(jnp.abs(c))) == 0.0 for c in state.correction)
  assert amp_optax.amp(0.1, reuse_correction=True, inner_steps=0).init(params).correction == ()


def _reuse_step(tx, batch):
  """A jitted amp update whose grad_fn is NaN when ``poison``, ascend a static argument."""

  def grad_fn(poison):
    def fn(p, _):
      return jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), jax.grad(mlp_loss)(p, batch))
    return fn

  def step(grads, state, params, poison, ascend):
    return tx.update(grads, state, params, **({"grad_fn": grad_fn(poison)} if ascend else {}),
                     ascend=ascend)

  return jax.jit(step, static_argnums=4)


def test_reuse_adds_the_last_correction_between_ascents():
  """With reuse_correction, an ascend=False step returns clean + (adversarial - clean) of the last
  ascent, that ascent's correction unchanged by the steps in between. (The float64 reference of a
  whole run: tests/test_reference.py.)"""
  params, batch = mlp_params(), make_batch()
  tx = amp_optax.amp(0.1, reuse_correction=True)
  step = _reuse_step(tx, batch)
  grads0 = jax.grad(mlp_loss)(params, batch)
  adversarial, state = step(grads0, tx.init(params), params, False, True)
  float_leaves = lambda t: [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.inexact)]
  want_correction = [a - g for a, g in zip(float_leaves(adversarial), float_leaves(grads0))]
  for c, w in zip(state.correction, want_correction):
    np.testing.assert_array_equal(c, w)
  assert max(float(jnp.max(jnp.abs(c))) for c in state.correction) > 1e-4  # it matters
  correction = state.correction
  for seed in (2, 3):  # new clean gradients (another batch), no ascent
    clean = jax.grad(mlp_loss)(params, make_batch(seed=seed))
    updates, state = step(clean, state, params, False, False)
    want = jax.tree.unflatten(jax.tree.structure(clean), [
        g + c for g, c in zip(jax.tree.leaves(clean), correction)])
    assert_trees_equal(updates, want)
    assert float(state.delta_norm) == 0.0
    for c, w in zip(state.correction, correction):
      np.testing.assert_array_equal(c, w)


def test_reuse_does_not_store_a_correction_from_a_nan_perturbed_gradient():
  """A NaN perturbed pass on an ascent step: its update is NaN, but the correction kept is the
  previous finite one, so the following ascend=False steps return clean + that correction."""
  params, batch = mlp_params(), make_batch()
  tx = amp_optax.amp(0.1, reuse_correction=True)
  step = _reuse_step(tx, batch)
  grads = jax.grad(mlp_loss)(params, batch)
  _, state = step(grads, tx.init(params), params, False, True)  # a finite ascent
  finite_correction = state.correction
  updates, state = step(grads, state, params, True, True)  # a NaN perturbed pass
  assert all(np.isnan(u).all() for u in jax.tree.leaves(updates))
  for c, w in zip(state.correction, finite_correction):
    np.testing.assert_array_equal(c, w)
  for _ in range(2):
    updates, state = step(grads, state, params, False, False)
    assert_tree_finite(updates)
    assert_trees_equal(updates, jax.tree.unflatten(jax.tree.structure(grads), [
        g + c for g, c in zip(jax.tree.leaves(grads), finite_correction)]))


def test_reuse_with_a_nan_first_ascent_keeps_training_finite():
  """chain(amp(reuse_correction=True), apply_if_finite(sgd)): a NaN perturbed pass on the first
  ascent is skipped, and the ascend=False steps after it step with the clean gradient (the
  correction is still the initial zero): the params stay finite."""
  params, batch = mlp_params(), make_batch()
  tx = optax.chain(amp_optax.amp(0.1, reuse_correction=True),
                   optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2))
  step = _reuse_step(tx, batch)
  state = tx.init(params)
  for t, (poison, ascend) in enumerate([(True, True), (False, False), (False, False),
                                        (False, False)]):
    grads = jax.grad(mlp_loss)(params, batch)
    updates, state = step(grads, state, params, poison, ascend)
    if t == 0:  # skipped
      assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))
      assert int(state[1].notfinite_count) == 1
      assert all(float(jnp.max(jnp.abs(c))) == 0.0 for c in state[0].correction)
    else:
      assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, grads), rtol=1e-6)
    params = optax.apply_updates(params, updates)
    # (AmpState.perturbed_grad_norm reports step 0's NaN pass: a diagnostic, not state reused.)
    assert_tree_finite((params, state[0].correction, state[1].inner_state))
  assert int(state[1].total_notfinite) == 1


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(relative="relative"), TypeError, "relative"),
    (dict(relative=1), TypeError, "relative"),
    (dict(reuse_correction="reuse"), TypeError, "reuse_correction"),
    (dict(reuse_correction=1), TypeError, "reuse_correction"),
])
def test_bad_relative_or_reuse_arguments_fail_at_construction(kwargs, error, name):
  with pytest.raises(error, match=rf"amp\(\): `{name}` must be True or False"):
    amp_optax.amp(0.5, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(radius="relative"), dict(radius="absolute"), dict(debug_checks=True),
    dict(ascent_every=2), dict(between_ascents="reuse"), dict(num_groups=2)])
def test_removed_arguments_are_rejected(kwargs):
  """0.1's knobs are gone: passing one fails loudly, naming it, instead of being ignored."""
  with pytest.raises(TypeError, match=next(iter(kwargs))):
    amp_optax.amp(0.5, **kwargs)
  assert next(iter(kwargs)) not in inspect.signature(amp_optax.amp).parameters


# ------------------------------------------------------------- the 0.2 signatures


CONSTRUCTORS = {
    "amp": (amp_optax.amp, ("epsilon",), lambda **kw: amp_optax.amp(**kw)),
    "grouped_amp": (amp_optax.grouped_amp, ("epsilon",),
                    lambda **kw: amp_optax.grouped_amp(num_groups=2, **kw)),
    "drop_in_amp": (amp_optax.drop_in_amp, ("optimizer", "epsilon"),
                    lambda **kw: amp_optax.drop_in_amp(optax.sgd(0.1), **kw)),
}
SHARED = ("inner_lr", "inner_steps", "norm", "relative", "mask")


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_everything_after_epsilon_is_keyword_only(name):
  fn, positional, _ = CONSTRUCTORS[name]
  parameters = list(inspect.signature(fn).parameters.values())
  assert tuple(p.name for p in parameters[:len(positional)]) == positional
  assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
             for p in parameters[:len(positional)])
  rest = parameters[len(positional):]
  assert rest and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), [
      (p.name, p.kind) for p in rest]


def test_a_positional_argument_after_epsilon_is_a_type_error():
  with pytest.raises(TypeError, match="positional"):
    amp_optax.amp(0.05, 1.0)
  with pytest.raises(TypeError, match="positional"):
    amp_optax.grouped_amp(0.05, 4)
  with pytest.raises(TypeError, match="positional"):
    amp_optax.drop_in_amp(optax.sgd(0.1), 0.05, 1.0)


def test_shared_arguments_have_the_same_names_order_and_defaults():
  def shared(fn, names):
    parameters = inspect.signature(fn).parameters
    return [(n, parameters[n].default) for n in parameters if n in names]

  want = shared(amp_optax.amp, SHARED)
  assert [n for n, _ in want] == list(SHARED)
  assert want == [("inner_lr", 1.0), ("inner_steps", 1), ("norm", "per_tensor"),
                  ("relative", False), ("mask", None)]
  for name, (fn, _, _) in CONSTRUCTORS.items():
    assert shared(fn, SHARED) == want, name
  # amp and grouped_amp also share the device arguments.
  devices = ("batch_axis_name", "unroll")
  assert shared(amp_optax.grouped_amp, devices) == shared(amp_optax.amp, devices) == [
      ("batch_axis_name", None), ("unroll", None)]


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_errors_name_their_constructor(name):
  _, _, build = CONSTRUCTORS[name]
  prefix = rf"^{name}\(\): "
  with pytest.raises(ValueError, match=prefix + "`epsilon` must be >= 0"):
    build(epsilon=-0.1)
  with pytest.raises(ValueError, match=prefix + "`norm` must be one of"):
    build(epsilon=0.1, norm="l2")
  with pytest.raises(TypeError, match=prefix + "`relative` must be True or False"):
    build(epsilon=0.1, relative="relative")
  with pytest.raises(TypeError, match=prefix + "`inner_steps` must be a Python int"):
    build(epsilon=0.1, inner_steps=1.0)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_infinite_epsilon_fails_at_construction(name):
  _, _, build = CONSTRUCTORS[name]
  with pytest.raises(ValueError, match=rf"^{name}\(\): `epsilon` must be finite, got inf"):
    build(epsilon=float("inf"))
  build(epsilon=1e30)  # large but finite is a ball


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("leaf", ["no", 1, 0.0], ids=["str", "int", "float"])
def test_mask_leaf_that_is_not_a_bool_is_a_type_error(name, leaf):
  _, _, build = CONSTRUCTORS[name]
  with pytest.raises(TypeError, match=rf"^{name}\(\): each `mask` leaf must be True or False"):
    build(epsilon=0.1, mask={"w": leaf, "b": True})
  # From a function of the params too, when it is called (at init).
  tx = build(epsilon=0.1, mask=lambda p: {"w": leaf, "b": True})
  with pytest.raises(TypeError, match=rf"^{name}\(\): each `mask` leaf must be True or False"):
    tx.init({"w": jnp.ones((3,)), "b": jnp.zeros(())})


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_elementwise_mask_leaf_says_one_bool_per_parameter_array(name):
  _, _, build = CONSTRUCTORS[name]
  with pytest.raises(TypeError, match=r"one per parameter array"):
    build(epsilon=0.1, mask={"w": jnp.array([True, False, True]), "b": True})
  with pytest.raises(TypeError, match=r"one per parameter array"):
    build(epsilon=0.1, mask={"w": np.array([True, False, True]), "b": True})


def test_zero_d_bool_arrays_are_mask_leaves():
  """The control for the type errors above: bools and 0-d bool arrays are accepted."""
  params = zero_params()
  grads = jax.tree.map(jnp.ones_like, params)
  mask = {"dense": np.array(True), "out": jnp.array(False), "scale": np.bool_(False)}
  tx = amp_optax.amp(0.5, mask=mask)
  delta, _ = tx.update(grads, tx.init(params), params, grad_fn=delta_probe(params))
  assert float(jnp.abs(delta["dense"]["kernel"]).min()) > 0.0
  assert float(jnp.abs(delta["out"]["kernel"]).max()) == 0.0
  assert float(jnp.abs(delta["scale"])) == 0.0
