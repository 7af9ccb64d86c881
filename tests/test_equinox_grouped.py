"""Grouped AMP with a stateful Equinox model: amp_optax.equinox.grouped_value_and_grad and State.

The references are written by hand from the algorithm, with Equinox's own
``eqx.filter_value_and_grad`` on each group's examples run one group at a time (no vmap over
groups, none of amp_optax's grouped code): group ``j``'s clean gradient ``g_j`` from the incoming
state, ``Delta_j = g_j * min(1, eps / |g_j|)`` (global norm, ``inner_lr=1``, ``K=1``), its
gradient at ``theta + Delta_j`` from the incoming state, the mean over groups, an SGD step; the
new state is the mean over groups of the clean passes' new states. Float64 throughout.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import equinox as amp_eqx

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("group_passes")]

G = 4  # groups of 4 examples
N = 16
LR = 0.1


class Net(eqx.Module):
  linear1: eqx.nn.Linear
  norm: eqx.nn.BatchNorm
  linear2: eqx.nn.Linear

  def __init__(self, mode, key):
    k1, k2 = jax.random.split(key)
    self.linear1 = eqx.nn.Linear(3, 8, key=k1)
    self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode=mode)
    self.linear2 = eqx.nn.Linear(8, 2, key=k2)

  def __call__(self, x, state):
    h, state = self.norm(self.linear1(x), state)
    return self.linear2(jnp.tanh(h)), state


def compute_loss(model, state, xs, ys):
  batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  pred_ys, state = batch_model(xs, state)
  return jnp.mean((pred_ys - ys) ** 2), state


def make_model(mode):
  model, state = eqx.nn.make_with_state(Net)(mode, jax.random.key(0))
  assert model.linear1.weight.dtype == jnp.float64  # built under the x64 fixture
  return model, state


def make_data():
  kx, ky = jax.random.split(jax.random.key(1))
  xs = jax.random.normal(kx, (N, 3))
  ys = jnp.sin(2 * xs[:, :2]) + 0.3 * jax.random.normal(ky, (N, 2))
  assert xs.dtype == jnp.float64
  return xs, ys


def _copy(tree):
  """A fresh copy (new objects, same arrays): an eqx.nn.State may be invalidated by use."""
  return jax.tree.map(lambda x: x, tree)


def _arrays(model, state):
  return jax.tree.leaves(eqx.filter((model, state), eqx.is_array))


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, float) - np.asarray(y, float))))
             for x, y in zip(a, b))


def _assert_close(got, want, atol):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------------
# The hand-written reference.


def _mean_of_states(states):
  def mean(*leaves):
    if jnp.issubdtype(leaves[0].dtype, jnp.inexact):
      return jnp.asarray(np.mean(np.stack([np.asarray(x) for x in leaves]), axis=0))
    return leaves[0]

  return jax.tree.map(mean, *states)


def reference_step(model, state, xs, ys, eps, perturbed_from="incoming"):
  """One grouped AMP + SGD step by hand; ``perturbed_from="clean_new"`` is the wrong policy."""
  m = N // G
  value_and_grad = eqx.filter_value_and_grad(compute_loss, has_aux=True)
  grads_at_perturbed, new_states, norms = [], [], []
  for j in range(G):
    xj, yj = xs[j * m:(j + 1) * m], ys[j * m:(j + 1) * m]
    (_, new_state), g = value_and_grad(model, _copy(state), xj, yj)
    norm = np.sqrt(sum(np.sum(np.asarray(x) ** 2) for x in jax.tree.leaves(g)))
    scale = min(1.0, eps / norm)
    delta = jax.tree.map(lambda x, s=scale: s * x, g)
    perturbed = eqx.apply_updates(model, delta)
    start = state if perturbed_from == "incoming" else new_state
    (_, _), g_pert = value_and_grad(perturbed, _copy(start), xj, yj)
    grads_at_perturbed.append(g_pert)
    new_states.append(new_state)
    norms.append(norm)
  mean_grad = jax.tree.map(lambda *gs: sum(gs) / G, *grads_at_perturbed)
  new_model = eqx.apply_updates(model, jax.tree.map(lambda g: -LR * g, mean_grad))
  return new_model, _mean_of_states(new_states), {"norms": norms, "states": new_states}


def reference_run(mode, eps, steps=3, perturbed_from="incoming"):
  model, state = make_model(mode)
  xs, ys = make_data()
  infos = []
  for _ in range(steps):
    model, state, info = reference_step(model, state, xs, ys, eps, perturbed_from)
    infos.append(info)
  return model, state, infos


# ---------------------------------------------------------------------------------------------
# The step under test.


def helper_step(model, state, opt_state, tx, xs, ys, groups):
  (losses, state), grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(
      compute_loss, has_aux=True)(model, state, *amp_optax.group_batch((xs, ys), groups))
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
  return eqx.apply_updates(model, updates), state, opt_state, losses


def helper_run(mode, tx, step, steps=3, groups=G):
  model, state = make_model(mode)
  xs, ys = make_data()
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
  for _ in range(steps):
    model, state, opt_state, losses = step(model, state, opt_state, tx, xs, ys, groups)
    assert losses.shape == (groups,)
  return model, state, opt_state


jit_helper_step = eqx.filter_jit(helper_step)


# ---------------------------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_three_steps_match_the_hand_written_grouped_reference(x64, mode):
  """Parameters and state after 3 steps of grouped AMP + SGD equal the reference (1e-10).

  mode="ema" normalises with the running statistics in training too, so the gradient depends
  on which state each pass starts from: there the wrong policy (perturbed passes from the clean
  pass's new state) is shown to differ, so the comparison can tell the two apart."""
  eps = 0.05
  tx = optax.chain(amp_optax.grouped_amp(eps, norm="global", num_groups=G), optax.sgd(LR))
  model, state, opt_state = helper_run(mode, tx, jit_helper_step)
  ref_model, ref_state, infos = reference_run(mode, eps)
  _assert_close(_arrays(model, state), _arrays(ref_model, ref_state), atol=1e-10)

  # Not vacuous: the projection is active, and the groups' new states differ (their mean is
  # not any one group's).
  assert all(norm > eps for info in infos for norm in info["norms"])
  states = infos[0]["states"]
  assert _max_abs_diff(_arrays(None, states[0]), _arrays(None, states[1])) > 1e-3
  assert float(opt_state[0].delta_norm) > 0
  if mode == "ema":
    wrong_model, wrong_state, _ = reference_run(mode, eps, perturbed_from="clean_new")
    assert _max_abs_diff(_arrays(wrong_model, None), _arrays(ref_model, None)) > 1e-6


def test_epsilon_zero_is_ghost_batch_norm_erm_not_full_batch_erm(x64):
  """epsilon=0: the mean over groups of each group's gradient from the incoming state, and the
  mean of the groups' new states (ghost-BN ERM); the full-batch ERM step differs."""
  tx = optax.chain(amp_optax.grouped_amp(0.0, num_groups=G), optax.sgd(LR))
  model, state, _ = helper_run("batch", tx, jit_helper_step)
  ref_model, ref_state, _ = reference_run("batch", 0.0)
  _assert_close(_arrays(model, state), _arrays(ref_model, ref_state), atol=1e-10)

  erm_model, erm_state = make_model("batch")
  xs, ys = make_data()
  for _ in range(3):
    grads, erm_state = eqx.filter_grad(compute_loss, has_aux=True)(erm_model, erm_state, xs, ys)
    erm_model = eqx.apply_updates(erm_model, jax.tree.map(lambda g: -LR * g, grads))
  assert _max_abs_diff(_arrays(model, None), _arrays(erm_model, None)) > 1e-3
  assert _max_abs_diff(_arrays(None, state), _arrays(None, erm_state)) > 1e-3


def test_one_group_is_the_ungrouped_value_and_grad_step(x64):
  """G=1 (two ascent steps, so each pass needs its own copy of the State) is the ungrouped
  step of amp_eqx.value_and_grad with amp(eps), parameters and state, to float rounding."""
  base = optax.sgd(LR)
  tx = optax.chain(amp_optax.grouped_amp(0.05, inner_steps=2, num_groups=1), base)
  model, state, _ = helper_run("ema", tx, jit_helper_step, groups=1)

  @eqx.filter_jit
  def ungrouped_step(model, state, opt_state, tx, xs, ys, groups):
    del groups
    (loss, state), grads, amp_grad_fn = amp_eqx.value_and_grad(compute_loss, has_aux=True)(
        model, state, xs, ys)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return eqx.apply_updates(model, updates), state, opt_state, loss[None]

  ungrouped_tx = optax.chain(amp_optax.amp(0.05, inner_steps=2), base)
  want_model, want_state, _ = helper_run("ema", ungrouped_tx, ungrouped_step, groups=1)
  _assert_close(_arrays(model, state), _arrays(want_model, want_state), atol=1e-12)
  initial = make_model("ema")
  assert _max_abs_diff(_arrays(*initial), _arrays(model, state)) > 1e-3


def test_a_state_without_has_aux_raises_naming_has_aux_true():
  model, state = eqx.nn.make_with_state(Net)("batch", jax.random.key(0))
  xs, ys = jax.random.normal(jax.random.key(1), (N, 3)), jnp.zeros((N, 2))
  grouped = amp_optax.group_batch((xs, ys), G)
  with pytest.raises(TypeError, match=r"has_aux=True"):
    amp_eqx.grouped_value_and_grad(lambda m, s, x, y: compute_loss(m, s, x, y)[0])(
        model, state, *grouped)
  # The same loss with has_aux=True runs, and the State passed in is still usable.
  (losses, new_state), _, _ = amp_eqx.grouped_value_and_grad(compute_loss, has_aux=True)(
      model, state, *grouped)
  assert losses.shape == (G,)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  jax.tree.leaves(state)  # raises if the incoming State was invalidated


def test_aux_states_are_averaged_the_rest_stays_stacked_and_a_nested_state_is_broadcast(x64):
  model, state = make_model("batch")
  xs, ys = make_data()
  gx, gy = amp_optax.group_batch((xs, ys), G)

  def loss_with_preds(model, inputs):
    batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    preds, new_state = batch_model(inputs["xs"], inputs["state"])
    return jnp.mean((preds - inputs["ys"]) ** 2), {"state": new_state, "preds": preds}

  (losses, aux), grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(
      loss_with_preds, has_aux=True)(model, {"state": state, "xs": gx, "ys": gy})
  (want_losses, want_state), want_grads, want_grad_fn = amp_eqx.grouped_value_and_grad(
      compute_loss, has_aux=True)(model, state, gx, gy)
  assert aux["preds"].shape == (G, N // G, 2)  # stacked per group
  assert isinstance(aux["state"], eqx.nn.State)
  _assert_close(jax.tree.leaves(aux["state"]), jax.tree.leaves(want_state), atol=1e-12)
  _assert_close([losses], [want_losses], atol=1e-12)
  _assert_close(jax.tree.leaves(grads), jax.tree.leaves(want_grads), atol=1e-12)
  stacked = jax.tree.map(lambda g: 1.0 + g, grads)  # some per-group parameters
  _assert_close(jax.tree.leaves(amp_grad_fn(stacked, 0)),
                jax.tree.leaves(want_grad_fn(stacked, 0)), atol=1e-12)
  # The mean state, by hand, from the stacked per-group clean passes' states.
  stacked_states = [compute_loss(model, _copy(state), gx[j], gy[j])[1] for j in range(G)]
  _assert_close(jax.tree.leaves(aux["state"]), jax.tree.leaves(_mean_of_states(stacked_states)),
                atol=1e-12)


def test_the_step_compiles_once_under_filter_jit_and_equals_the_eager_step(x64):
  traces = []

  @eqx.filter_jit
  def step(model, state, opt_state, tx, xs, ys, groups):
    traces.append(None)
    return helper_step(model, state, opt_state, tx, xs, ys, groups)

  tx = optax.chain(amp_optax.grouped_amp(0.05, inner_steps=2, num_groups=G), optax.sgd(LR))
  model, state, opt_state = helper_run("ema", tx, step)
  assert len(traces) == 1
  eager_model, eager_state, eager_opt_state = helper_run("ema", tx, helper_step, steps=3)
  _assert_close(_arrays(model, state), _arrays(eager_model, eager_state), atol=1e-12)
  assert int(opt_state[0].count) == int(eager_opt_state[0].count) == 3
