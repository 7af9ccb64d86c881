"""Tests of amp_optax.equinox on Equinox's own patterns: filter/combine, State, filter_jit, scan."""

import functools
from pathlib import Path
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import equinox as amp_eqx

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
BASE = optax.adamw(1e-2)  # one object: the jitted ERM steps compile once for all tests.


# ---------------------------------------------------------------------------------------------
# Models in Equinox's styles: the MNIST example's list of layers (MaxPool2d: non-array fields
# that eqx.filter turns into None), and the stateful example's BatchNorm with an eqx.nn.State.


class CNN(eqx.Module):
  layers: list

  def __init__(self, key):
    key1, key2 = jax.random.split(key)
    self.layers = [
        eqx.nn.Conv2d(1, 2, kernel_size=3, key=key1),  # 1x6x6 -> 2x4x4
        eqx.nn.MaxPool2d(kernel_size=2),  # -> 2x3x3
        jax.nn.relu,
        jnp.ravel,
        eqx.nn.Linear(18, 3, key=key2),
        jax.nn.log_softmax,
    ]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def cnn_loss(model, x, y):
  log_probs = jax.vmap(model)(x)
  return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


class BatchNormNet(eqx.Module):
  linear1: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  linear2: eqx.nn.Linear

  def __init__(self, key, mode="ema"):
    key1, key2 = jax.random.split(key)
    self.linear1 = eqx.nn.Linear(4, 8, key=key1)
    # "ema" (Equinox's stateful example's mode) normalises with the running statistics in
    # training too, so a wrong state changes the gradients.
    self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode=mode, momentum=0.5)
    self.linear2 = eqx.nn.Linear(8, 3, key=key2)

  def __call__(self, x, state):
    x, state = self.norm(self.linear1(x), state)
    return self.linear2(jax.nn.relu(x)), state


def stateful_loss(model, state, x, y):
  batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  logits, state = batch_model(x, state)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def _cnn_data(n=16, seed=0):
  """Images whose label is the class of a fixed random linear teacher: learnable."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 1, 6, 6))
  labels = np.argmax(x.reshape(n, -1) @ rng.normal(size=(36, 3)), axis=1)
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def _vector_data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 4)) * 2.0
  labels = rng.integers(0, 3, size=n)
  return (jnp.asarray(centres[labels] + rng.normal(size=(n, 4)), jnp.float32),
          jnp.asarray(labels))


def _arrays(tree):
  return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def _max_abs_diff(a, b):
  pairs = zip(_arrays(a), _arrays(b), strict=True)
  return max(float(jnp.max(jnp.abs(jnp.asarray(u, jnp.float32) - v))) for u, v in pairs)


def _assert_identical(a, b):
  for u, v in zip(_arrays(a), _arrays(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _structure(tree):
  return jax.tree.structure(tree, is_leaf=lambda x: x is None)


# ---------------------------------------------------------------------------------------------
# The steps: Equinox's (ERM), and AMP's three ways.


@eqx.filter_jit
def erm_step(model, opt_state, x, y, tx):
  loss_value, grads = eqx.filter_value_and_grad(cnn_loss)(model, x, y)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
  return eqx.apply_updates(model, updates), opt_state, loss_value


@eqx.filter_jit
def make_grad_fn_step(model, opt_state, x, y, tx):
  loss_value, grads = eqx.filter_value_and_grad(cnn_loss)(model, x, y)
  amp_grad_fn = amp_eqx.make_grad_fn(model, cnn_loss, x, y)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array),
                                 grad_fn=amp_grad_fn)
  return eqx.apply_updates(model, updates), opt_state, loss_value


@eqx.filter_jit
def value_and_grad_step(model, opt_state, x, y, tx):
  loss_value, grads, amp_grad_fn = amp_eqx.value_and_grad(cnn_loss)(model, x, y)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array),
                                 grad_fn=amp_grad_fn)
  return eqx.apply_updates(model, updates), opt_state, loss_value


@eqx.filter_jit
def one_call_step(model, opt_state, x, y, tx):
  return amp_eqx.amp_step(model, opt_state, tx, cnn_loss, x, y)


@eqx.filter_jit
def stateful_erm_step(model, state, opt_state, x, y, tx):
  (loss_value, state), grads = eqx.filter_value_and_grad(stateful_loss, has_aux=True)(
      model, state, x, y)
  updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
  return eqx.apply_updates(model, updates), state, opt_state, loss_value


@eqx.filter_jit
def stateful_value_and_grad_step(model, state, opt_state, x, y, tx):
  (loss_value, state), grads, amp_grad_fn = amp_eqx.value_and_grad(
      stateful_loss, has_aux=True)(model, state, x, y)
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
  return eqx.apply_updates(model, updates), state, opt_state, loss_value


@eqx.filter_jit
def stateful_amp_step(model, state, opt_state, x, y, tx):
  model, opt_state, (loss_value, state) = amp_eqx.amp_step(
      model, opt_state, tx, stateful_loss, state, x, y, has_aux=True)
  return model, state, opt_state, loss_value


@eqx.filter_jit
def stateful_closure_step(model, state, opt_state, x, y, tx):
  """The mistake: a hand-written grad_fn closing over `state`, which is then rebound."""
  params, static = eqx.partition(model, eqx.is_inexact_array)
  (loss_value, state), grads = eqx.filter_value_and_grad(stateful_loss, has_aux=True)(
      model, state, x, y)
  grad_fn = jax.grad(lambda p, _: stateful_loss(eqx.combine(p, static), state, x, y)[0])
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
  return eqx.apply_updates(model, updates), state, opt_state, loss_value


@eqx.filter_jit
def stateful_late_make_grad_fn_step(model, state, opt_state, x, y, tx):
  """The same mistake with make_grad_fn: built after `state` is rebound."""
  (loss_value, state), grads = eqx.filter_value_and_grad(stateful_loss, has_aux=True)(
      model, state, x, y)
  amp_grad_fn = amp_eqx.make_grad_fn(model, stateful_loss, state, x, y, has_aux=True)
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
  return eqx.apply_updates(model, updates), state, opt_state, loss_value


def _run(step, model, tx, batch, steps=STEPS):
  opt_state = tx.init(eqx.filter(model, eqx.is_array))
  losses = []
  for _ in range(steps):
    model, opt_state, loss_value = step(model, opt_state, *batch, tx)
    losses.append(loss_value)
  return model, opt_state, losses


def _run_stateful(step, tx, batch, steps=STEPS, mode="ema"):
  model, state = eqx.nn.make_with_state(BatchNormNet)(jax.random.key(0), mode=mode)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  losses = []
  for _ in range(steps):
    model, state, opt_state, loss_value = step(model, state, opt_state, *batch, tx)
    losses.append(loss_value)
  return model, state, opt_state, losses


@functools.cache
def _erm_run():
  return _run(erm_step, CNN(jax.random.key(0)), BASE, _cnn_data())


@functools.cache
def _stateful_erm_run():
  return _run_stateful(stateful_erm_step, BASE, _vector_data())


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generic_recipe_fails_on_maxpool_and_make_grad_fn_combines_the_static_part():
  model = CNN(jax.random.key(0))
  x, y = _cnn_data()
  params = eqx.filter(model, eqx.is_array)
  # The generic recipe calls the filtered tree as the model: MaxPool2d finds None there.
  with pytest.raises(ValueError, match="init_values"):
    jax.grad(lambda p, _: cnn_loss(p, x, y))(params, 0)
  grads = jax.jit(amp_eqx.make_grad_fn(model, cnn_loss, x, y))(params, 0)
  assert _structure(grads) == _structure(params)  # None where params has None
  expected = eqx.filter_jit(eqx.filter_grad(cnn_loss))(model, x, y)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("step", [make_grad_fn_step, value_and_grad_step, one_call_step],
                         ids=["make_grad_fn", "value_and_grad", "amp_step"])
def test_epsilon_zero_is_the_plain_optax_step_bit_for_bit(step):
  batch = _cnn_data()
  erm_model, erm_opt, erm_losses = _erm_run()
  tx = optax.chain(amp_optax.amp(0.0), BASE)
  model, opt_state, losses = _run(step, CNN(jax.random.key(0)), tx, batch)
  _assert_identical((model, opt_state[1], losses), (erm_model, erm_opt, erm_losses))
  assert int(opt_state[0].count) == STEPS and float(opt_state[0].perturbed_grad_norm) > 0
  assert float(erm_losses[-1]) < float(erm_losses[0])  # the steps did move the model.


@pytest.mark.slow
@pytest.mark.parametrize("step", [stateful_value_and_grad_step, stateful_amp_step],
                         ids=["value_and_grad", "amp_step"])
def test_epsilon_zero_is_erm_bit_for_bit_with_batchnorm_state(step):
  batch = _vector_data()
  erm = _stateful_erm_run()
  amp = _run_stateful(step, optax.chain(amp_optax.amp(0.0, inner_steps=2), BASE), batch)
  _assert_identical((amp[0], amp[1], amp[2][1], amp[3]), (erm[0], erm[1], erm[2], erm[3]))
  # The running statistics moved: the state is part of what is compared.
  initial_state = eqx.nn.make_with_state(BatchNormNet)(jax.random.key(0))[1]
  assert _max_abs_diff(erm[1], initial_state) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [stateful_closure_step, stateful_late_make_grad_fn_step],
                         ids=["closure_over_state", "make_grad_fn_after_rebinding"])
def test_rebound_state_drifts_from_erm_where_value_and_grad_does_not(mistake):
  """The issue's stateful mistake: epsilon=0 silently differs from ERM (it cannot be detected:
  the returned State is a valid State). value_and_grad takes the arguments once, for both
  passes, so the same step written with it is ERM exactly (previous test)."""
  batch = _vector_data()
  erm = _stateful_erm_run()
  wrong = _run_stateful(mistake, optax.chain(amp_optax.amp(0.0), BASE), batch)
  assert _max_abs_diff(wrong[0], erm[0]) > 1e-4


class Counter(eqx.Module):
  """A stateful layer whose output depends on how often it ran: count k gives (1 + k) w.x."""

  weight: jax.Array
  index: eqx.nn.StateIndex

  def __init__(self):
    self.weight = jnp.array([1.0, 2.0, 3.0])
    self.index = eqx.nn.StateIndex(jnp.array(0.0))

  def __call__(self, x, state):
    count = state.get(self.index)
    # Not under vmap: state.set() invalidates the State object passed in, as Equinox does.
    return jnp.sum(self.weight * x) * (1.0 + count), state.set(self.index, count + 1.0)


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_perturbed_passes_start_from_the_state_before_the_clean_pass(inner_steps):
  model, state = eqx.nn.make_with_state(Counter)()
  x = jnp.array([1.0, -1.0, 0.5])
  tx = amp_optax.amp(0.0, inner_steps=inner_steps, unroll=1)

  @eqx.filter_jit
  def step(model, state):
    (loss_value, state), grads, amp_grad_fn = amp_eqx.value_and_grad(
        lambda m, s: m(x, s), has_aux=True)(model, state)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
    return updates, state

  updates, new_state = step(model, state)
  # Count 0 (the clean pass's start), not 1 (its end): the gradient is x, not 2x. Each
  # perturbed pass gets its own copy of the State, so K=2 runs too (no "old state" error).
  np.testing.assert_array_equal(updates.weight, x)
  assert float(new_state.get(model.index)) == 1.0  # advanced by the clean pass only.


@pytest.mark.slow
def test_learns_with_epsilon_0_05_and_differs_from_erm():
  batch = _cnn_data(n=32)
  base = optax.adamw(5e-2)
  tx = optax.chain(amp_optax.amp(0.05), base)
  model, opt_state, losses = _run(value_and_grad_step, CNN(jax.random.key(0)), tx, batch,
                                  steps=30)
  assert float(losses[-1]) < 0.6 * float(losses[0]), losses
  assert 0 < float(opt_state[0].delta_norm) <= 0.05 * 2 + 1e-6  # 4 arrays, each within 0.05
  erm_model, _, _ = _run(erm_step, CNN(jax.random.key(0)), base, batch, steps=30)
  assert _max_abs_diff(model, erm_model) > 1e-3


@pytest.mark.slow
def test_two_inner_steps_in_a_fori_loop_with_a_traced_inner_step():
  batch = _vector_data()
  inner_steps_seen = []

  def run(unroll):
    tx = optax.chain(amp_optax.amp(0.05, inner_lr=10.0, inner_steps=2, unroll=unroll),
                     optax.sgd(0.1))

    @eqx.filter_jit
    def step(model, state, opt_state, x, y, tx):
      (loss_value, state), grads, amp_grad_fn = amp_eqx.value_and_grad(
          stateful_loss, has_aux=True)(model, state, x, y)

      def recording_grad_fn(params, inner_step):
        inner_steps_seen.append(inner_step)
        return amp_grad_fn(params, inner_step)

      params = eqx.filter(model, eqx.is_inexact_array)
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=recording_grad_fn)
      return eqx.apply_updates(model, updates), state, opt_state, loss_value

    return _run_stateful(step, tx, batch, steps=2)

  looped = run(unroll=1)  # one loop body: grad_fn is traced once, with a traced inner_step
  assert len(inner_steps_seen) == 1 and isinstance(inner_steps_seen[0], jax.core.Tracer)
  unrolled = run(unroll=True)
  for a, b in zip(_arrays(looped[:3]), _arrays(unrolled[:3]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(looped[2][0].delta_norm) > 0.05  # it ascended, on several tensors.


@pytest.mark.slow
def test_lax_scan_over_steps_matches_the_python_loop():
  batch = _vector_data()
  tx = optax.chain(amp_optax.amp(0.05, inner_steps=2), optax.adamw(1e-2))
  model, state = eqx.nn.make_with_state(BatchNormNet)(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_array)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @jax.jit
  def train(params, state, opt_state):
    def one_step(carry, _):
      params, state, opt_state = carry
      model = eqx.combine(params, static)
      model, opt_state, (loss_value, state) = amp_eqx.amp_step(
          model, opt_state, tx, stateful_loss, state, *batch, has_aux=True)
      return (eqx.filter(model, eqx.is_array), state, opt_state), loss_value

    return jax.lax.scan(one_step, (params, state, opt_state), length=STEPS)

  (params, state, opt_state), losses = train(params, state, opt_state)
  model, state_looped, opt_looped, losses_looped = _run_stateful(stateful_amp_step, tx, batch)
  got = (params, state, opt_state, losses)
  want = (model, state_looped, opt_looped, jnp.stack(losses_looped))
  for a, b in zip(_arrays(got), _arrays(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(losses[-1]) < float(losses[0])


def _numpy_mse_grads(w, b, x, y):
  """Loss mean((x w^T + b - y)^2) over batch and outputs, and its gradient, in float64."""
  residual = x @ w.T + b - y
  scale = 2.0 / residual.size
  return scale * residual.T @ x, scale * residual.sum(axis=0)


def _project(v, eps):
  norm = np.linalg.norm(v)
  return v * min(1.0, eps / norm) if norm > 0 else v


def test_one_step_against_a_numpy_float64_reference():
  model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 3))
  y = rng.normal(size=(8, 2)) + 3.0

  def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  w, b = np.asarray(model.weight, np.float64), np.asarray(model.bias, np.float64)
  inner_lr = 0.5
  g_w, g_b = _numpy_mse_grads(w, b, x, y)
  # A radius between the two steps' norms: one tensor is projected, the other is not.
  n_w, n_b = np.linalg.norm(inner_lr * g_w), np.linalg.norm(inner_lr * g_b)
  assert max(n_w, n_b) > 1.5 * min(n_w, n_b)
  eps = float(np.sqrt(n_w * n_b))
  want_w, want_b = _numpy_mse_grads(w + _project(inner_lr * g_w, eps),
                                    b + _project(inner_lr * g_b, eps), x, y)

  x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  tx = amp_optax.amp(eps, inner_lr=inner_lr)
  params = eqx.filter(model, eqx.is_array)

  @eqx.filter_jit
  def step(model):
    _, grads, amp_grad_fn = amp_eqx.value_and_grad(loss)(model, x32, y32)
    return tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)

  updates, state = step(model)
  np.testing.assert_allclose(updates.weight, want_w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(updates.bias, want_b, rtol=2e-5, atol=1e-6)
  assert np.abs(want_w - g_w).max() > 1e-2  # the perturbation changed the gradient.
  np.testing.assert_allclose(float(state.delta_norm), np.hypot(min(n_w, eps), min(n_b, eps)),
                             rtol=1e-5)


class WithCounter(eqx.Module):
  """A model that holds an integer array next to its weights."""

  linear: eqx.nn.Linear
  calls: jax.Array

  def __init__(self, key):
    self.linear = eqx.nn.Linear(4, 3, key=key)
    self.calls = jnp.array(0, jnp.int32)

  def __call__(self, x):
    return self.linear(x)


def _with_counter_loss(model, x, y):
  logits = jax.vmap(model)(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.slow
def test_integer_arrays_get_a_zero_gradient_or_none_as_params_says():
  model = WithCounter(jax.random.key(0))
  x, y = _vector_data()
  amp_grad_fn = amp_eqx.make_grad_fn(model, _with_counter_loss, x, y)
  with_int = amp_grad_fn(eqx.filter(model, eqx.is_array), 0)
  assert with_int.calls.dtype == jnp.int32 and int(with_int.calls) == 0
  floats_only = eqx.filter(model, eqx.is_inexact_array)
  grads = amp_grad_fn(floats_only, 0)
  assert grads.calls is None and _structure(grads) == _structure(floats_only)
  # amp_step takes the floating arrays, the tree eqx.filter_value_and_grad's gradient has.
  tx = optax.chain(amp_optax.amp(0.05), optax.sgd(0.1))
  new_model, _, _ = amp_eqx.amp_step(model, tx.init(floats_only), tx, _with_counter_loss, x, y)
  assert int(new_model.calls) == 0 and _max_abs_diff(new_model.linear, model.linear) > 0


def test_params_that_are_not_a_filter_of_the_model_are_rejected():
  model = CNN(jax.random.key(0))
  x, y = _cnn_data()
  amp_grad_fn = amp_eqx.make_grad_fn(model, cnn_loss, x, y)
  with pytest.raises(ValueError, match=re.escape("eqx.filter(model, eqx.is_array)")):
    amp_grad_fn(eqx.filter(model.layers, eqx.is_array), 0)


@pytest.mark.slow
def test_loss_output_that_does_not_fit_has_aux_says_what_to_pass():
  model, state = eqx.nn.make_with_state(BatchNormNet)(jax.random.key(0))
  batch = _vector_data()
  with pytest.raises(TypeError, match="pass has_aux=True"):
    amp_eqx.value_and_grad(stateful_loss)(model, state, *batch)
  with pytest.raises(TypeError, match="pass has_aux=True"):
    amp_eqx.make_grad_fn(model, stateful_loss, state, *batch)(
        eqx.filter(model, eqx.is_array), 0)
  with pytest.raises(TypeError, match="has_aux=True, so loss_fn must return"):
    amp_eqx.make_grad_fn(CNN(jax.random.key(0)), cnn_loss, *_cnn_data(), has_aux=True)(
        eqx.filter(CNN(jax.random.key(0)), eqx.is_array), 0)


@pytest.mark.slow
def test_import_needs_no_equinox_and_without_it_names_the_extra():
  code = textwrap.dedent("""
      import sys
      import amp_optax
      assert "equinox" not in sys.modules, "import amp_optax imported equinox"
      sys.modules["equinox"] = None  # as if Equinox were not installed.
      try:
        import amp_optax.equinox
      except ModuleNotFoundError as e:
        assert e.name == "equinox", e.name
        print(e)
      else:
        raise SystemExit("imported without equinox")
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  assert 'pip install -e ".[equinox]"' in out.stdout and "amp_optax.equinox" in out.stdout


def test_every_public_name_has_an_api_entry_and_the_guide_is_listed():
  api = (REPO / "docs" / "api" / "equinox.md").read_text(encoding="utf-8")
  listed = re.search(r"autosummary::.*?\n\n(.*?)```", api, re.S).group(1).split()
  assert sorted(listed) == sorted(amp_eqx.__all__)
  assert "(equinox.md)" in (REPO / "docs" / "api" / "index.md").read_text(encoding="utf-8")
  toctree = (REPO / "docs" / "guides" / "index.md").read_text(encoding="utf-8")
  assert re.search(r"^equinox$", toctree, re.M)
  guide = (REPO / "docs" / "guides" / "equinox.md").read_text(encoding="utf-8")
  assert guide.count("```python") >= 2 and "amp_grad_fn" in guide


def test_snippets_name_the_builders_result_amp_grad_fn():
  """`grad_fn` is what users' code already calls jax.value_and_grad's result."""
  sources = [REPO / "amp_optax" / "equinox.py", REPO / "docs" / "guides" / "equinox.md",
             *(REPO / "examples" / "equinox").glob("*.py")]
  for path in sources:
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"\bgrad_fn\s*=\s*amp_eqx\.", text), path
    assert not re.search(r"grads?, grad_fn = amp_eqx\.", text), path

