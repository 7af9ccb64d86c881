"""Conformance of ``optax.chain(amp_optax.amp(...), base)`` with optax's own test batteries.

Optax runs a battery of property tests over each of its optimisers
(``optax/_src/alias_test.py``, ``optax/contrib/_common_test.py``,
``optax/contrib/_sam_test.py``): extra arguments without recompiling,
``inject_hyperparams``, dtype preservation, state shape/dtype/sharding stability,
gradient accumulation, schedules and convergence on standard test functions.
This file checks the same properties, in its own code, for AMP chained with
sgd (momentum), adam and adamw, K = 1 and 2 inner steps, per-tensor and global
balls. Numbers are compared with the float64 NumPy references of
``tests/conformance_functions.py``, which know nothing of amp_optax.

Where a property cannot hold as optax states it (AMP descends the AMP loss
``max_{|Delta| <= eps} L(theta + Delta)``, not ``L``), the test asserts what
does hold and says why in its docstring: the AMP loss's minimiser, found
independently in NumPy, where it differs from ``L``'s (Rosenbrock, a sharp
well), and ``L``'s own minimiser where the two coincide (isotropic and
symmetric quadratics). With eps = 0 the classic optima are asserted as optax
does.
"""

import functools

import conformance_functions as cf
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest
from tree_asserts import assert_tree_finite
from tree_asserts import assert_trees_close
from tree_asserts import assert_trees_equal

import amp_optax

# K, norm and base optimiser: together these cover K in {1, 2}, both norms and
# the three bases without the full product (the file must stay fast).
CONFIGS = [
    pytest.param(1, "per_tensor", "sgd_mom", id="K1-per_tensor-sgd_mom"),
    pytest.param(2, "global", "adam", id="K2-global-adam"),
    pytest.param(2, "per_tensor", "adamw", id="K2-per_tensor-adamw"),
]


def make_base(name, learning_rate):
  if name == "sgd_mom":
    return optax.sgd(learning_rate, momentum=0.9)
  if name == "adam":
    return optax.adam(learning_rate)
  if name == "adamw":
    return optax.adamw(learning_rate)
  raise ValueError(name)


def make_tx(k, norm, base, *, eps=0.1, inner_lr=0.5, lr=0.1):
  return optax.chain(amp_optax.amp(eps, inner_lr=inner_lr, inner_steps=k, norm=norm),
                     make_base(base, lr))


# A small tree with a matrix, a vector and a scalar leaf, and a loss coupling
# them, so that per-tensor and global balls differ.
def tree_params(dtype=jnp.float32):
  return {
      "w": jnp.asarray(np.linspace(-1.0, 1.0, 6).reshape(3, 2), dtype),
      "b": jnp.asarray([0.5, -0.25], dtype),
      "s": jnp.asarray(1.5, dtype),
  }


def tree_loss(p):
  return (jnp.sum(jnp.abs(p["w"] - 1.0) ** 2) + 2.0 * jnp.sum(jnp.abs(p["b"] + 0.5) ** 2)
          + 3.0 * jnp.abs(p["s"]) ** 2 + jnp.abs(jnp.sum(p["w"]) * p["s"]) ** 2)


tree_grad = cf.conj_grad(tree_loss)


def grad_fn_of(grad):
  return lambda p, _: grad(p)


def shapes_dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def counted_step(tx, grad, **extra):
  """A jitted step and the list it appends to each time it is traced."""
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    updates, state = tx.update(grad(params), state, params, grad_fn=grad_fn_of(grad), **extra)
    return optax.apply_updates(params, updates), state, updates

  return step, traces


# ------------------------------------------------------------ extra args


@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_extra_args_accepted_without_recompiling(k, norm, base):
  """optax: update takes extra args it does not know, and a 2nd call does not recompile."""
  tx = make_tx(k, norm, base)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)
    value, grads = jax.value_and_grad(tree_loss)(params)
    updates, state = tx.update(
        grads, state, params, grad_fn=grad_fn_of(tree_grad), value=value,
        unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(params, updates), state

  params = tree_params()
  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)
  assert len(traces) == 1, f"the step was traced {len(traces)} times for 3 calls, want 1"
  assert_tree_finite(params)

  # Unknown extra args are ignored: the same update as without them.
  params = tree_params()
  state = tx.init(params)
  update = functools.partial(tx.update, grad_fn=grad_fn_of(tree_grad))
  plain = jax.jit(update)(tree_grad(params), state, params)
  extra = jax.jit(functools.partial(update, unexpected_extra_args_your_optimizer_doesnt_expect=1))(
      tree_grad(params), state, params, value=jnp.ones(()))
  assert_trees_equal(plain, extra)


def test_value_reaches_a_later_chain_element():
  """`value=` passes through amp to optax.polyak_sgd, which needs it.

  The reference applies polyak_sgd by hand to amp's output (the gradient at the
  adversarial point), so a dropped or altered `value` shows.
  """
  params = tree_params()
  grad_fn = grad_fn_of(tree_grad)
  amp = amp_optax.amp(0.2, inner_lr=0.5, inner_steps=2, norm="global")
  polyak = optax.polyak_sgd(max_learning_rate=10.0)
  tx = optax.chain(amp, polyak)
  state = tx.init(params)
  update = jax.jit(lambda s, v: tx.update(tree_grad(params), s, params, grad_fn=grad_fn, value=v))
  adv_grad, _ = amp.update(tree_grad(params), amp.init(params), params, grad_fn=grad_fn)
  got = []
  for value in (0.5, 2.0):
    updates, _ = update(state, jnp.asarray(value))
    want, _ = polyak.update(adv_grad, polyak.init(params), params, value=jnp.asarray(value))
    assert_trees_close(updates, want, rtol=1e-5)
    got.append(updates)
  # The two values give different steps (Polyak's step size is value / |g|^2).
  assert not np.allclose(got[0]["w"], got[1]["w"])


# ------------------------------------------------------------ inject_hyperparams


def _two_steps(step, params, state):
  params, state, _ = step(params, state)
  return step(params, state)


@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_inject_hyperparams_wrapping_amp(k, norm, base):
  """inject_hyperparams(amp): epsilon and inner_lr injected, inner_steps and norm static.

  The injected chain gives the plain chain's updates and states; setting a new
  epsilon in the state between steps changes the update to the plain chain's
  with that epsilon, without recompiling.
  """
  injected = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps", "norm"))
  tx_inj = optax.chain(injected(epsilon=0.1, inner_lr=0.5, inner_steps=k, norm=norm),
                       make_base(base, 0.1))
  tx_ref = make_tx(k, norm, base, eps=0.1, inner_lr=0.5)
  params = tree_params()
  step_inj, traces = counted_step(tx_inj, tree_grad)
  step_ref, _ = counted_step(tx_ref, tree_grad)

  p_inj, s_inj, u_inj = _two_steps(step_inj, params, tx_inj.init(params))
  p_ref, s_ref, u_ref = _two_steps(step_ref, params, tx_ref.init(params))
  assert_trees_close(u_inj, u_ref, rtol=1e-5, atol=1e-7)
  assert_trees_close(s_inj[0].inner_state, s_ref[0], rtol=1e-5, atol=1e-7)
  assert_trees_close(s_inj[1], s_ref[1], rtol=1e-5, atol=1e-7)

  assert set(s_inj[0].hyperparams) == {"epsilon", "inner_lr"}
  # A new epsilon between steps: the update follows it, with no new trace.
  s_inj[0].hyperparams["epsilon"] = jnp.asarray(0.02, jnp.float32)
  _, _, u_new = step_inj(p_inj, s_inj)
  _, _, u_want = counted_step(make_tx(k, norm, base, eps=0.02, inner_lr=0.5), tree_grad)[0](
      p_ref, s_ref)
  _, _, u_old = step_ref(p_ref, s_ref)
  assert_trees_close(u_new, u_want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(u_new["w"], u_old["w"], rtol=1e-4), "epsilon change had no effect"
  assert len(traces) == 1, f"injected step traced {len(traces)} times, want 1"


@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_inject_hyperparams_wrapping_the_whole_chain(k, norm, base):
  """inject_hyperparams over a factory of the whole chain, as users write for schedules."""

  def whole_chain(epsilon, inner_lr, learning_rate):
    return optax.chain(amp_optax.amp(epsilon, inner_lr=inner_lr, inner_steps=k, norm=norm),
                       make_base(base, learning_rate))

  tx_inj = optax.inject_hyperparams(whole_chain)(epsilon=0.1, inner_lr=0.5, learning_rate=0.1)
  tx_ref = make_tx(k, norm, base, eps=0.1, inner_lr=0.5, lr=0.1)
  params = tree_params()
  step_inj, traces = counted_step(tx_inj, tree_grad)
  step_ref, _ = counted_step(tx_ref, tree_grad)
  p_inj, s_inj, u_inj = _two_steps(step_inj, params, jax.jit(tx_inj.init)(params))
  p_ref, s_ref, u_ref = _two_steps(step_ref, params, tx_ref.init(params))
  assert_trees_close(u_inj, u_ref, rtol=1e-5, atol=1e-7)
  assert_trees_close(s_inj.inner_state, s_ref, rtol=1e-5, atol=1e-7)

  s_inj.hyperparams["epsilon"] = jnp.asarray(0.02, jnp.float32)
  _, _, u_new = step_inj(p_inj, s_inj)
  _, _, u_want = counted_step(make_tx(k, norm, base, eps=0.02, inner_lr=0.5), tree_grad)[0](
      p_ref, s_ref)
  _, _, u_old = step_ref(p_ref, s_ref)
  assert_trees_close(u_new, u_want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(u_new["w"], u_old["w"], rtol=1e-4), "epsilon change had no effect"
  assert len(traces) == 1, f"injected step traced {len(traces)} times, want 1"


# ------------------------------------------------------------ dtypes and state stability

DTYPES = [jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64, jnp.complex64]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_dtype_and_state_stable_across_steps(dtype, k, norm, base):
  """optax's test_preserve_dtype and test_state_shape_dtype_shard_stability.

  Updates have the params' dtypes, grad_fn is called at theta + Delta of the
  params' dtypes, and after several steps the state has the tree structure,
  shapes and dtypes of the initial state. The update runs in a lax.cond against
  (zeros, old state), as in optax's test: the cond itself fails if any dtype or
  shape moves.
  """
  with jax.enable_x64(dtype == jnp.float64):
    params = tree_params(dtype)
    tx = make_tx(k, norm, base, eps=0.1, inner_lr=0.5, lr=1e-2)
    seen = []

    def grad_fn(p, _):
      seen.append(shapes_dtypes(p))
      return tree_grad(p)

    @jax.jit
    def step(params, state):
      def do_update():
        return tx.update(tree_grad(params), state, params, grad_fn=grad_fn)

      # Defeat constant folding; both branches must have one type.
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) >= 0
      updates, state = jax.lax.cond(
          cond, do_update, lambda: (jax.tree.map(jnp.zeros_like, params), state))
      return optax.apply_updates(params, updates), state, updates

    state0 = tx.init(params)
    state = state0
    for _ in range(3):
      params, state, updates = step(params, state)
      assert shapes_dtypes(updates) == shapes_dtypes(params)
      assert shapes_dtypes(params) == shapes_dtypes(tree_params(dtype))
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    assert shapes_dtypes(state) == shapes_dtypes(state0)
    assert seen and all(s == shapes_dtypes(tree_params(dtype)) for s in seen), (
        f"grad_fn saw {seen[0]}, params are {shapes_dtypes(tree_params(dtype))}")
    assert_tree_finite((params, state))
    # The parameters moved: the update was not the zero branch.
    assert not np.allclose(np.asarray(params["w"], np.complex128),
                           np.asarray(tree_params(dtype)["w"], np.complex128))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_low_precision_ascent_matches_float64_reference(dtype, norm):
  """A large inner_lr must not overflow fp16 before the projection (issue 8, item 2).

  eps = 0.5, inner_lr = 1e4, K = 2: inner_lr * g exceeds float16's max (65504),
  but the projected Delta is a vector of norm eps along g. With params at 0 and
  grad_fn returning its argument, amp's output is Delta_K itself, compared with
  the float64 NumPy ascent.
  """
  g64 = {"w": np.linspace(1.0, 12.0, 6).reshape(3, 2), "b": np.array([8.0, -9.0]),
         "s": np.array(10.0)}
  params = {k: jnp.zeros(v.shape, dtype) for k, v in g64.items()}
  grads = {k: jnp.asarray(v, dtype) for k, v in g64.items()}
  tx = amp_optax.amp(0.5, inner_lr=1e4, inner_steps=2, norm=norm)
  delta, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q, _: q))(
      grads, tx.init(params), params)
  g_rounded = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  want, _ = cf.np_ascent(g_rounded, lambda d: d, eps=0.5, inner_lr=1e4, k_steps=2, norm=norm)
  for key in g64:
    assert delta[key].dtype == dtype
    np.testing.assert_allclose(np.asarray(delta[key], np.float64), want[key],
                               rtol=2e-2, atol=1e-3, err_msg=f"Delta[{key!r}] in {dtype}")
  assert np.isfinite(float(state.delta_norm))


@pytest.mark.slow
def test_state_and_updates_keep_their_sharding():
  """Params sharded over 8 (fake) devices: updates and state keep their shardings.

  Updates have the params' shardings, adam's moments follow the params from
  init on, and the state's shardings after step 1 stay through later steps, so
  later steps do not retrace. Scalar state leaves (counts, amp's norms) start on
  one device from an eager init, as optax's own counts do, and come out of the
  first jitted step replicated; the chain may therefore trace twice, but no more
  often than the base optimiser alone.
  """
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  row = NamedSharding(mesh, P("x", None))
  rep = NamedSharding(mesh, P())
  params = {"w": jax.device_put(jnp.asarray(np.linspace(-1, 1, 32).reshape(8, 4), jnp.float32),
                                row),
            "b": jax.device_put(jnp.asarray([0.1, 0.2, 0.3, 0.4], jnp.float32), rep)}
  target = jnp.asarray(np.linspace(0, 2, 32).reshape(8, 4), jnp.float32)
  loss = lambda p: jnp.sum((p["w"] - target) ** 2) + jnp.sum((p["b"] - 1.0) ** 2) * jnp.sum(p["w"])
  grad = jax.grad(loss)

  def run(tx):
    step, traces = counted_step(tx, grad)
    state = tx.init(params)
    for moment in ("mu", "nu"):
      for key in params:
        _assert_same_sharding(optax.tree.get(state, moment)[key].sharding,
                              params[key].sharding, params[key].ndim)
    p, state, _ = step(params, state)
    first = jax.tree.map(lambda x: x.sharding, state)
    p, state, _ = step(p, state)  # the first step whose input state came out of a step
    n_first = len(traces)
    for _ in range(3):
      p, state, updates = step(p, state)
    assert len(traces) == n_first, "a step after the first retraced: the state's types moved"
    jax.tree.map(lambda a, s: _assert_same_sharding(a.sharding, s, a.ndim), state, first)
    for key in params:
      _assert_same_sharding(updates[key].sharding, params[key].sharding, params[key].ndim)
      _assert_same_sharding(p[key].sharding, params[key].sharding, params[key].ndim)
    return len(traces)

  n_amp = run(optax.chain(amp_optax.amp(0.1, inner_lr=0.5, inner_steps=2, norm="global"),
                          optax.adam(1e-2)))
  n_base = run(optax.adam(1e-2))
  assert n_amp <= n_base, f"the AMP chain traced {n_amp} times, adam alone {n_base}"


def _assert_same_sharding(got, want, ndim):
  assert got.is_equivalent_to(want, ndim), f"sharding {got}, want {want}"


# ------------------------------------------------------------ gradient accumulation

ACCUM_CONFIGS = [
    pytest.param(1, "per_tensor", "sgd_mom", id="K1-per_tensor-sgd_mom"),
    pytest.param(2, "global", "adam", id="K2-global-adam"),
    pytest.param(2, "per_tensor", "adamw", id="K2-per_tensor-adamw"),
]


@pytest.mark.parametrize("k,norm,base", ACCUM_CONFIGS)
def test_amp_outside_multisteps_is_per_micro_batch_ascent(k, norm, base):
  """chain(amp, MultiSteps(base, m)) = per-micro-batch AMP, then one base step.

  Reference (float64 NumPy): for each micro-batch, Delta from its own clean
  gradient by the ascent, the gradient at theta + Delta, the mean over the m
  micro-batches, then the base optimiser's step. In between, the updates are 0.
  """
  n_micro, eps, inner_lr, lr = 3, 0.3, 2.0, 0.05
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(2 * n_micro, 4, 3))
  ys = rng.normal(size=(2 * n_micro, 4))
  tx = optax.chain(amp_optax.amp(eps, inner_lr=inner_lr, inner_steps=k, norm=norm),
                   optax.MultiSteps(make_base(base, lr), n_micro).gradient_transformation())

  @jax.jit
  def micro_step(params, state, x, y):
    grad = jax.grad(lambda p: cf.tanh_regression_loss(p, x, y))
    updates, state = tx.update(grad(params), state, params, grad_fn=grad_fn_of(grad))
    return optax.apply_updates(params, updates), state, updates

  p0 = {"w": np.array([0.3, -0.2, 0.5]), "b": np.array(0.1)}
  params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), p0)
  state = tx.init(params)
  ref_params, ref_base = dict(p0), cf.NpBase(base, lr)
  for cycle in range(2):
    adv = []
    for i in range(n_micro):
      x, y = xs[cycle * n_micro + i], ys[cycle * n_micro + i]
      grad_at = lambda d, x=x, y=y, p=ref_params: cf.np_tanh_regression_grad(
          {key: p[key] + d[key] for key in p}, x, y)
      _, g = cf.np_ascent(cf.np_tanh_regression_grad(ref_params, x, y), grad_at, eps=eps,
                          inner_lr=inner_lr, k_steps=k, norm=norm)
      adv.append(g)
      params, state, updates = micro_step(params, state, jnp.asarray(x, jnp.float32),
                                          jnp.asarray(y, jnp.float32))
      if i < n_micro - 1:
        assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, updates))
    mean = {key: np.mean([g[key] for g in adv], axis=0) for key in ref_params}
    ref_params = ref_base.step(ref_params, mean)
    for key in ref_params:
      np.testing.assert_allclose(np.asarray(params[key], np.float64), ref_params[key],
                                 rtol=1e-5, atol=1e-6,
                                 err_msg=f"params[{key!r}] after accumulation cycle {cycle}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_multisteps_after_amp_keeps_dtypes(dtype):
  """optax's test_gradient_accumulation: the first of 4 micro-steps emits exact zeros.

  In bf16 too, with the state's dtypes unchanged (MultiSteps' lax.cond needs it).
  """
  fun = lambda x: jnp.sum(x**2)
  grad = jax.grad(fun)
  params = jnp.asarray([1.0, 2.0], dtype)
  tx = optax.chain(amp_optax.amp(0.1, inner_lr=0.5, inner_steps=2, norm="per_tensor"),
                   optax.MultiSteps(optax.adamw(1e-1), 4).gradient_transformation())
  state = jax.jit(tx.init)(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn_of(grad)))
  updates, new_state = update(grad(params), state, params)
  assert_trees_equal(updates, jnp.zeros_like(params))
  assert updates.dtype == dtype
  assert shapes_dtypes(new_state) == shapes_dtypes(state)


# ------------------------------------------------------------ schedules


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_schedules_evaluated_at_the_update_count(k, norm):
  """Schedules of epsilon and inner_lr are called with the number of updates done so far.

  The first update uses schedule(0), as optax's own schedules do. The values
  below make some steps saturate the ball (Delta shows epsilon) and others not
  (Delta shows inner_lr), so an off-by-one count in either schedule shows. With
  params at 0 and grad_fn returning its argument, amp's output is Delta_K.
  """
  eps_schedule = optax.piecewise_constant_schedule(0.3, {2: 2.0})  # 0.3, 0.3, 0.6, ...
  lr_schedule = optax.linear_schedule(0.02, 0.2, 4)  # 0.02, 0.065, 0.11, 0.155, 0.2
  g64 = {"a": np.array([3.0, 4.0]), "c": np.array([[1.0, -2.0], [0.5, 2.0]])}
  params = {key: jnp.zeros(v.shape) for key, v in g64.items()}
  grads = {key: jnp.asarray(v, jnp.float32) for key, v in g64.items()}
  tx = optax.chain(amp_optax.amp(eps_schedule, inner_lr=lr_schedule, inner_steps=k, norm=norm),
                   optax.scale(1.0))
  update = jax.jit(lambda s: tx.update(grads, s, params, grad_fn=lambda q, _: q))
  state = tx.init(params)
  for t in range(5):
    delta, state = update(state)
    want, _ = cf.np_ascent(g64, lambda d: d, eps=float(eps_schedule(t)),
                           inner_lr=float(lr_schedule(t)), k_steps=k, norm=norm)
    for key in g64:
      np.testing.assert_allclose(np.asarray(delta[key]), want[key], rtol=1e-5, atol=1e-7,
                                 err_msg=f"Delta[{key!r}] at update {t}")
  assert int(state[0].count) == 5


def test_constant_schedules_equal_constants():
  """optax: an optimiser given constant schedules behaves as with the constants."""
  params = tree_params()
  with_schedules = optax.chain(
      amp_optax.amp(optax.constant_schedule(0.1), inner_lr=optax.constant_schedule(0.5),
                    inner_steps=2, norm="global"),
      optax.adam(optax.constant_schedule(1e-2)))
  with_constants = make_tx(2, "global", "adam", eps=0.1, inner_lr=0.5, lr=1e-2)
  ends = []
  for tx in (with_schedules, with_constants):
    step, _ = counted_step(tx, tree_grad)
    p, s = params, tx.init(params)
    for _ in range(5):
      p, s, _ = step(p, s)
    ends.append(p)
  assert_trees_close(ends[0], ends[1], rtol=1e-6, atol=1e-7)


def test_tree_map_params_over_the_chain_state():
  """optax.tree.map_params reaches the base's params-shaped state, not amp's scalars."""
  params = tree_params()
  tx = make_tx(2, "global", "adam")
  step, _ = counted_step(tx, tree_grad)
  _, state, _ = step(params, tx.init(params))
  same = optax.tree.map_params(tx, lambda v: v, state)
  assert_trees_equal(same, state)
  doubled = optax.tree.map_params(tx, lambda v: 2 * v, state)
  assert_trees_equal(doubled[0], state[0])  # AmpState: count and norms untouched
  assert_trees_close(doubled[1][0].mu, jax.tree.map(lambda v: 2 * v, state[1][0].mu))
  assert float(state[0].delta_norm) > 0


# ------------------------------------------------------------ convergence

TARGETS = [cf.parabola, cf.rosenbrock, cf.matrix_parabola, cf.mixed_tensor_target]
# The learning rates of optax's alias_test.
CONVERGENCE_LR = {"sgd_mom": 1e-3, "adam": 1e-1, "adamw": 1e-1}


def run_scan(tx, grad, params, n_steps):
  """n_steps of the chain in one lax.scan (one compilation)."""

  def body(carry, _):
    p, s = carry
    updates, s = tx.update(grad(p), s, p, grad_fn=grad_fn_of(grad))
    return (optax.apply_updates(p, updates), s), None

  run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), length=n_steps)[0])
  return run(params, tx.init(params))[0]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.__name__)
@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_epsilon_zero_reaches_the_classic_optimum(target, k, norm, base):
  """With eps = 0 AMP is ERM: optax's convergence test holds as stated.

  10,000 steps and optax's tolerances (3e-2); and the same path as the base
  optimiser alone.
  """
  init, final, objective = target(jnp.float32)
  grad = jax.grad(objective)
  tx = make_tx(k, norm, base, eps=0.0, inner_lr=1.0, lr=CONVERGENCE_LR[base])
  got = run_scan(tx, grad, init, 10_000)
  assert_trees_close(got, final, rtol=3e-2, atol=3e-2)
  # The same path as the base alone, over the first 100 steps: later, adam near
  # its optimum divides tiny gradients by their own scale, which amplifies the
  # rounding differences of two compiled programs to 1e-2 (measured).
  first = run_scan(tx, grad, init, 100)
  alone = run_scan(make_base(base, CONVERGENCE_LR[base]), grad, init, 100)
  assert_trees_close(first, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_complex_parabola(eps):
  """optax's alias_test also converges on a complex parabola (conjugated gradients).

  |theta - c|^2 is isotropic in C^n = R^2n, so with eps > 0 the AMP loss
  (|theta - c| + eps)^2 keeps the minimiser c (see the isotropic test below).
  """
  init, final, objective = cf.parabola(jnp.complex64)
  tx = make_tx(2, "global", "adam", eps=eps, inner_lr=0.1, lr=1e-1)
  got = run_scan(tx, cf.conj_grad(objective), init, 10_000)
  assert got.dtype == jnp.complex64
  assert_trees_close(got, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("target", [cf.parabola, cf.matrix_parabola, cf.mixed_tensor_target],
                         ids=lambda t: t.__name__)
@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_isotropic_targets_keep_their_optimum_with_epsilon(target, k, norm, base):
  """On f = sum_i |theta_i - c_i|^2 the AMP loss has the same minimiser c.

  Global ball: max_{|Delta| <= eps} f(theta + Delta) = (|theta - c| + eps)^2.
  Per-tensor ball: sum_i (|theta_i - c_i| + eps)^2. Both are minimised at c,
  so optax's property holds as stated with eps = 0.3 > 0. Near c the ascent
  does not saturate (inner_lr * |g| < eps), so the update is a positive multiple
  of theta - c and the iteration settles at c.
  """
  init, final, objective = target(jnp.float32)
  tx = make_tx(k, norm, base, eps=0.3, inner_lr=0.1, lr=CONVERGENCE_LR[base])
  got = run_scan(tx, jax.grad(objective), init, 10_000)
  assert_trees_close(got, final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_anisotropic_quadratic_amp_minimiser(k, norm, base):
  """0.5 theta^T A theta - b^T theta: the AMP loss is minimised at A^-1 b too.

  F(theta) = max_{|Delta| <= eps} f(theta + Delta) is convex (a max of convex
  functions) and symmetric about theta* = A^-1 b (f is, and so is the ball), so
  theta* minimises F. This is checked here against random points in NumPy (F on
  the boundary sphere, where a convex function attains its max over a ball),
  then AMP must reach np.linalg.solve(A, b). The single leaf makes per-tensor
  and global balls the same.
  """
  a = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
  b = np.array([1.0, -2.0, 0.5])
  theta_star = np.linalg.solve(a, b)
  eps = 0.3
  rng = np.random.default_rng(0)
  sphere = rng.normal(size=(4000, 3))
  sphere = eps * sphere / np.linalg.norm(sphere, axis=1, keepdims=True)

  def amp_loss(theta):
    pts = theta + sphere
    return np.max(0.5 * np.einsum("ni,ij,nj->n", pts, a, pts) - pts @ b)

  f_star = amp_loss(theta_star)
  for u in rng.normal(size=(20, 3)) * 0.2:
    assert amp_loss(theta_star + u) >= f_star - 1e-9

  objective = lambda p: 0.5 * p @ jnp.asarray(a, jnp.float32) @ p - p @ jnp.asarray(b, jnp.float32)
  tx = make_tx(k, norm, base, eps=eps, inner_lr=0.1, lr=CONVERGENCE_LR[base])
  got = run_scan(tx, jax.grad(objective), jnp.zeros(3), 10_000)
  np.testing.assert_allclose(np.asarray(got), theta_star, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("base,lr", [("sgd_mom", 1e-3), ("adam", 1e-2)])
def test_rosenbrock_amp_converges_to_the_amp_loss_minimiser_not_1_1(base, lr):
  """On Rosenbrock, AMP does not stop at (1, 1): it goes to the AMP loss's minimiser.

  optax asserts (1, 1). With eps = 0.05 the AMP loss F(theta) = max over the
  disc of radius eps of Rosenbrock is dominated by the steep valley walls, which
  grow with x, so F is lowest far down the valley, near (0.53, 0.28), where
  F is about 0.754 against 1.30 at (1, 1). F is computed independently by a grid
  search in NumPy. AMP is run with K = 5 inner steps: the valley is curved, so
  one step along the clean gradient is a poor inner maximiser and K = 1 stops
  elsewhere (measured F 0.94 to 1.11); the learning rate decays to 0 so the
  end point is a point, not a cycle. The end point must nearly attain min F
  (within 5%), lie near its argmin, and beat (1, 1) on the AMP loss.
  """
  eps, n_steps = 0.05, 20_000
  xs, ys = np.linspace(0.3, 0.8, 126), np.linspace(0.05, 0.65, 151)
  grid = cf.np_rosenbrock_amp_loss(*np.meshgrid(xs, ys, indexing="ij"), eps)
  i, j = np.unravel_index(np.argmin(grid), grid.shape)
  f_min, argmin = grid[i, j], np.array([xs[i], ys[j]])
  f_at_1_1 = float(cf.np_rosenbrock_amp_loss(np.array(1.0), np.array(1.0), eps))
  assert f_at_1_1 > 1.5 * f_min  # the optax target is far from optimal for AMP

  init, _, objective = cf.rosenbrock(jnp.float32)
  tx = optax.chain(amp_optax.amp(eps, inner_lr=1.0, inner_steps=5, norm="global"),
                   make_base(base, optax.cosine_decay_schedule(lr, n_steps)))
  got = np.asarray(run_scan(tx, jax.grad(objective), init, n_steps), np.float64)
  f_got = float(cf.np_rosenbrock_amp_loss(got[0], got[1], eps))
  assert f_got <= 1.05 * f_min, f"AMP loss {f_got} at {got}; min {f_min} at {argmin}"
  assert np.linalg.norm(got - argmin) < 0.1, f"ended at {got}, AMP-loss argmin {argmin}"
  assert np.linalg.norm(got - 1.0) > 0.5


@pytest.mark.parametrize("base,lr", [("sgd_mom", 1e-3), ("adam", 1e-2), ("adamw", 1e-2)])
def test_amp_leaves_a_sharp_global_minimum_for_the_flat_one(base, lr):
  """1-D loss with a narrow, deep well at 2 and a wide basin at 0 (cf.two_basin).

  The global minimiser of L is in the narrow well (about 1.9985); the AMP loss
  max_{|d| <= 0.5} L(x + d), found by a grid search in NumPy, is minimised at
  0, in the wide basin. Started in the well, ERM (eps = 0) stays there and AMP
  (eps = 0.5) leaves it for 0: what the AMP loss asks for, not what optax's
  "reaches the minimiser of L" would. K = 2 with a large inner_lr: with K = 1
  the single ascent step lands x + eps in the well's bottom from x = 1.5, where
  the perturbed gradient is 0; that spurious fixed point of one-step AMP traps
  adam (measured), while the second step looks past it.
  """
  xs = np.linspace(-1.0, 3.0, 8001)
  argmin_l = xs[np.argmin(cf.two_basin(xs))]
  argmin_amp = xs[np.argmin(cf.np_interval_max(cf.two_basin, xs, 0.5))]
  assert abs(argmin_l - 2.0) < 0.01 and abs(argmin_amp) < 0.01

  grad = jax.grad(lambda p: cf.two_basin(p["x"], jnp))
  for x0 in (1.98, 2.02):
    init = {"x": jnp.asarray(x0, jnp.float32)}
    erm = run_scan(make_tx(2, "global", base, eps=0.0, inner_lr=10.0, lr=lr), grad, init, 3000)
    amp = run_scan(make_tx(2, "global", base, eps=0.5, inner_lr=10.0, lr=lr), grad, init, 3000)
    np.testing.assert_allclose(float(erm["x"]), argmin_l, atol=3e-2, err_msg=f"ERM from {x0}")
    np.testing.assert_allclose(float(amp["x"]), argmin_amp, atol=3e-2, err_msg=f"AMP from {x0}")


# ------------------------------------------------------------ edge cases


@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_zero_gradients_give_no_nan(k, norm, base):
  """Zero gradients everywhere: Delta = 0 (no 0/0 in the projection), the base's own step."""
  params = tree_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = make_tx(k, norm, base, eps=0.5)
  base_tx = make_base(base, 0.1)
  update = jax.jit(lambda s: tx.update(zeros, s, params, grad_fn=lambda p, _: zeros))
  state, base_state = tx.init(params), base_tx.init(params)
  for _ in range(2):
    updates, state = update(state)
    want, base_state = base_tx.update(zeros, base_state, params)
  assert_tree_finite((updates, state))
  # adamw's weight decay makes its step nonzero; sgd's and adam's are 0.
  assert_trees_close(updates, want, rtol=1e-6, atol=0)
  assert float(state[0].delta_norm) == 0.0


def test_empty_params_tree():
  tx = make_tx(2, "global", "adam")
  state = jax.jit(tx.init)({})
  updates, state = jax.jit(lambda s: tx.update({}, s, {}, grad_fn=lambda p, _: {}))(state)
  assert updates == {}
  assert int(state[0].count) == 1


def test_integer_leaves_pass_through_unperturbed():
  """An int leaf (a step counter) among the params: never perturbed, never moved.

  With gradients from jax.grad(..., allow_int=True) the int leaf's gradient is
  float0; amp passes it through, grad_fn sees the int leaf unchanged, and the
  float leaf's update matches the NumPy reference. (optax.apply_updates itself
  rejects float0, so the chain below uses int zeros as the int leaf's gradient,
  which sgd and apply_updates accept.)
  """
  params = {"w": jnp.asarray([1.0, -2.0, 0.5]), "step": jnp.asarray(7, jnp.int32)}
  loss = lambda p: jnp.sum(p["w"] ** 2) * 1.5
  grad = jax.grad(loss, allow_int=True)
  seen = []

  def grad_fn(p, _):
    seen.append(p["step"])
    return grad(p)

  tx = amp_optax.amp(0.5, inner_lr=1.0, inner_steps=2, norm="global")
  updates, _ = tx.update(grad(params), tx.init(params), params, grad_fn=grad_fn)
  assert seen and all(int(s) == 7 and s.dtype == jnp.int32 for s in seen)
  assert updates["step"].dtype == jax.dtypes.float0
  w = np.asarray(params["w"], np.float64)
  _, want = cf.np_ascent({"w": 3.0 * w}, lambda d: {"w": 3.0 * (w + d["w"])}, eps=0.5,
                         inner_lr=1.0, k_steps=2, norm="global")
  np.testing.assert_allclose(np.asarray(updates["w"]), want["w"], rtol=1e-5)

  int_grad = lambda p: {"w": 3.0 * p["w"], "step": jnp.zeros((), jnp.int32)}
  chain = optax.chain(tx, optax.sgd(0.1))
  step, _ = counted_step(chain, int_grad)
  new, _, _ = step(params, chain.init(params))
  assert int(new["step"]) == 7 and new["step"].dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(new["w"]), w - 0.1 * want["w"], rtol=1e-5)


@pytest.mark.parametrize("k,norm,base", CONFIGS)
def test_jit_of_init_and_update_matches_eager(k, norm, base):
  params = tree_params()
  tx = make_tx(k, norm, base)
  state = tx.init(params)
  assert_trees_equal(jax.jit(tx.init)(params), state)
  eager = tx.update(tree_grad(params), state, params, grad_fn=grad_fn_of(tree_grad))
  jitted = jax.jit(functools.partial(tx.update, grad_fn=grad_fn_of(tree_grad)))(
      tree_grad(params), state, params)
  assert_trees_close(jitted, eager, rtol=1e-6, atol=1e-7)


# The one test in this directory of where optax.apply_if_finite goes around amp (tests/test_docs.py
# checks what docs/guides/accumulation.md says about it).
APPLY_IF_FINITE = {
    "outside": lambda: optax.apply_if_finite(make_tx(2, "global", "adam"),
                                             max_consecutive_errors=3),
    "inside": lambda: optax.chain(
        amp_optax.amp(0.1, inner_lr=0.5, inner_steps=2, norm="global"),
        optax.apply_if_finite(make_base("adam", 0.1), max_consecutive_errors=3)),
}


@pytest.mark.parametrize("nan_at", ["clean", "perturbed"])
@pytest.mark.parametrize("placement", list(APPLY_IF_FINITE))
def test_apply_if_finite_placement(placement, nan_at):
  """A NaN in the clean gradient, or only at theta + Delta, on step 2 of 3.

  Outside (around the whole chain) apply_if_finite checks the clean gradient only: it skips a
  NaN clean gradient, but a NaN only at the perturbed point passes into the params. Inside
  (around the base optimiser, after amp) it sees amp's output and skips both. A skipped step
  leaves the params and the base optimiser's state as they were: the run then ends where a run
  without that step ends, with the same base state.
  """
  tx = APPLY_IF_FINITE[placement]()

  @jax.jit
  def step(params, state, poison):
    poisoned = lambda g: jax.tree.map(lambda x: jnp.where(poison, jnp.nan, x), g)
    clean, grad_fn = tree_grad(params), grad_fn_of(tree_grad)
    if nan_at == "clean":
      clean = poisoned(clean)
    else:
      grad_fn = lambda p, _: poisoned(tree_grad(p))
    updates, state = tx.update(clean, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  guard = (lambda s: s) if placement == "outside" else (lambda s: s[1])
  params, state = tree_params(), tx.init(tree_params())
  params, state, _ = step(params, state, False)
  params, state, updates = step(params, state, True)
  if placement == "outside" and nan_at == "perturbed":  # the check saw a finite gradient
    assert int(guard(state).total_notfinite) == 0
    assert all(np.isnan(np.asarray(p)).all() for p in jax.tree.leaves(params))
    return
  assert int(guard(state).total_notfinite) == 1
  assert_trees_equal(updates, jax.tree.map(jnp.zeros_like, params))  # skipped
  params, state, _ = step(params, state, False)

  ref = make_tx(2, "global", "adam")
  ref_params, ref_state = tree_params(), ref.init(tree_params())
  ref_step, _ = counted_step(ref, tree_grad)
  for _ in range(2):
    ref_params, ref_state, _ = ref_step(ref_params, ref_state)
  assert_tree_finite((params, guard(state).inner_state))
  assert_trees_close(params, ref_params, rtol=1e-6)
  if placement == "outside":  # the whole chain skipped: amp's state too
    assert_trees_close(state.inner_state, ref_state, rtol=1e-6)
  else:  # amp ran on the skipped step; only the base was skipped
    assert_trees_close(state[1].inner_state, ref_state[1], rtol=1e-6)
    assert int(state[0].count) == 3
