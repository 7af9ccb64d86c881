"""Tests of amp_optax.flax_linen: TrainState forwarding, BatchNorm and RNG policies."""

import functools
import subprocess
import sys
from typing import Any

import flax.linen as nn
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from value_recorder import record_value

import amp_optax
from amp_optax import flax_linen

EPS = 0.3
LR = 0.1


class Net(nn.Module):
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


def _data(n=96, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 4)) * 2.0
  labels = rng.integers(0, 3, size=n)
  x = centres[labels] + rng.normal(size=(n, 4))
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def _setup(dropout=0.0, epsilon=EPS, inner_steps=1, base=None, amp=True):
  model = Net(dropout)
  x, y = _data()
  variables = model.init(jax.random.key(0), x, train=False)
  base = optax.sgd(LR) if base is None else base
  tx = optax.chain(amp_optax.amp(epsilon, inner_steps=inner_steps), base) if amp else base
  state = flax_linen.TrainState.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=tx)

  def loss_fn(params, batch_stats, batch, rng):
    xb, yb = batch
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, xb, train=True,
        mutable=["batch_stats"], rngs=None if rng is None else {"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return loss, updates["batch_stats"]

  return state, loss_fn, (x, y)


def _allclose(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.slow
def test_import_amp_optax_does_not_import_flax():
  code = "import amp_optax, sys; assert 'flax' not in sys.modules, 'flax imported'"
  subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_amp_step_trains_a_batchnorm_dropout_model():
  state, loss_fn, batch = _setup(dropout=0.1, base=optax.sgd(0.2, momentum=0.9))
  step = jax.jit(functools.partial(flax_linen.amp_step, loss_fn=loss_fn))
  losses = []
  for i in range(40):
    state, loss = step(state, batch=batch, rng=jax.random.key(i))
    losses.append(float(loss))
  assert int(state.step) == 40
  assert losses[-1] < 0.3 * losses[0], losses
  # The running statistics moved away from their initial values.
  assert float(jnp.abs(state.batch_stats["BatchNorm_0"]["mean"]).max()) > 0.1


@pytest.mark.slow
def test_clean_policy_keeps_the_clean_pass_statistics():
  state, loss_fn, batch = _setup(inner_steps=2)
  new_state, loss = jax.jit(flax_linen.amp_step, static_argnames="loss_fn")(
      state, loss_fn=loss_fn, batch=batch)
  clean_loss, clean_stats = loss_fn(state.params, state.batch_stats, batch, None)
  _allclose(new_state.batch_stats, clean_stats, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(loss, clean_loss, rtol=1e-6)
  # The perturbed passes would have given other statistics.
  assert _max_abs_diff(new_state.batch_stats, state.batch_stats) > 1e-3


def _manual_amp(loss_fn, params, batch_stats, batch, inner_steps):
  """AMP by hand (per-tensor ball, inner_lr=1) with sequential statistics."""
  grad = jax.grad(loss_fn, has_aux=True)
  g, stats = grad(params, batch_stats, batch, None)
  delta = jax.tree.map(jnp.zeros_like, params)
  for _ in range(inner_steps):
    delta = amp_optax.project_per_tensor(jax.tree.map(lambda d, gi: d + gi, delta, g), EPS)
    g, stats = grad(jax.tree.map(lambda p, d: p + d, params, delta), stats, batch, None)
  new_params = jax.tree.map(lambda p, gi: p - LR * gi, params, g)
  return new_params, stats


@pytest.mark.slow
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_authors_policy_equals_sequential_updates(inner_steps):
  state, loss_fn, batch = _setup(inner_steps=inner_steps)
  new_state, _ = jax.jit(
      functools.partial(flax_linen.amp_step, loss_fn=loss_fn, stats_policy="authors"))(
          state, batch=batch)
  want_params, want_stats = jax.jit(_manual_amp, static_argnums=(0, 4))(
      loss_fn, state.params, state.batch_stats, batch, inner_steps)
  _allclose(new_state.params, want_params, rtol=1e-5, atol=1e-6)
  _allclose(new_state.batch_stats, want_stats, rtol=1e-5, atol=1e-6)
  # The perturbed passes did change the statistics beyond the clean pass.
  _, clean_stats = loss_fn(state.params, state.batch_stats, batch, None)
  assert _max_abs_diff(new_state.batch_stats, clean_stats) > 1e-4


@pytest.mark.slow
def test_stats_policies_give_the_same_parameters():
  state, loss_fn, batch = _setup(inner_steps=2)
  step = functools.partial(flax_linen.amp_step, loss_fn=loss_fn, batch=batch)
  clean, _ = jax.jit(step)(state)
  authors, _ = jax.jit(functools.partial(step, stats_policy="authors"))(state)
  # Train-mode BatchNorm normalises with the batch's statistics, so the
  # running statistics the perturbed passes see do not change the gradient.
  _allclose(clean.params, authors.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_grad_fn_is_forwarded_and_epsilon_zero_is_erm():
  state, loss_fn, batch = _setup()
  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, batch, None)
  amp_grad_fn = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch)
  amp_state = state.apply_gradients(grads=grads, grad_fn=amp_grad_fn, batch_stats=stats)
  erm_state, _, _ = _setup(amp=False)
  erm_state = erm_state.apply_gradients(grads=grads, batch_stats=stats)
  assert _max_abs_diff(amp_state.params, erm_state.params) > 1e-4
  _allclose(amp_state.batch_stats, erm_state.batch_stats)
  assert int(amp_state.step) == 1
  assert float(amp_state.opt_state[0].delta_norm) > 0.0

  zero_state, _, _ = _setup(epsilon=0.0)
  zero_state = zero_state.apply_gradients(grads=grads, grad_fn=amp_grad_fn)
  _allclose(zero_state.params, erm_state.params, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_without_grad_fn_amp_raises_and_flax_train_state_cannot_forward():
  state, loss_fn, batch = _setup()
  grads = jax.grad(loss_fn, has_aux=True)(state.params, state.batch_stats, batch, None)[0]
  with pytest.raises(ValueError, match="grad_fn"):
    state.apply_gradients(grads=grads)
  flax_state = flax_train_state.TrainState.create(
      apply_fn=state.apply_fn, params=state.params, tx=state.tx)
  # Flax calls tx.update without grad_fn (taking it for a field to replace); amp's error names
  # the TrainState that forwards it.
  with pytest.raises(ValueError, match=r"amp_optax\.flax_linen\.TrainState"):
    flax_state.apply_gradients(grads=grads, grad_fn=lambda p, _: grads)


def test_plain_apply_gradients_matches_flax():
  state, loss_fn, batch = _setup(amp=False, base=optax.adam(1e-2))
  grads = jax.grad(loss_fn, has_aux=True)(state.params, state.batch_stats, batch, None)[0]
  flax_state = flax_train_state.TrainState.create(
      apply_fn=state.apply_fn, params=state.params, tx=state.tx)
  ours, theirs = state.apply_gradients(grads=grads), flax_state.apply_gradients(grads=grads)
  _allclose(ours.params, theirs.params, rtol=0, atol=0)
  _allclose(ours.opt_state, theirs.opt_state, rtol=0, atol=0)
  assert ours.tx is state.tx and type(ours) is flax_linen.TrainState


def test_value_extra_arg_passes_through():
  state, loss_fn, batch = _setup(base=optax.chain(record_value(), optax.sgd(LR)))
  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, batch, None)
  amp_grad_fn = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch)
  new_state = state.apply_gradients(grads=grads, grad_fn=amp_grad_fn, tx_kwargs={"value": loss},
                                    batch_stats=stats)
  recorded: Any = new_state.opt_state[1][0]
  np.testing.assert_allclose(recorded.value, loss)
  # The same through amp_step.
  new_state, loss2 = flax_linen.amp_step(state, loss_fn, batch, tx_kwargs={"value": 7.0})
  assert float(new_state.opt_state[1][0].value) == 7.0
  with pytest.raises(TypeError, match="once"):
    state.apply_gradients(grads=grads, grad_fn=amp_grad_fn, tx_kwargs={"grad_fn": amp_grad_fn})


def test_tx_without_extra_args_is_rejected():
  state, loss_fn, batch = _setup(amp=False)
  plain = optax.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))
  state = state.replace(tx=plain, opt_state=())
  grads = jax.grad(loss_fn, has_aux=True)(state.params, state.batch_stats, batch, None)[0]
  with pytest.raises(TypeError, match="extra arguments"):
    state.apply_gradients(grads=grads, grad_fn=lambda p, _: grads)


@pytest.mark.slow
def test_rng_policies():
  state, loss_fn, batch = _setup(dropout=0.5)
  rng = jax.random.key(3)
  grads = jax.grad(loss_fn, has_aux=True)(state.params, state.batch_stats, batch, rng)[0]
  same = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng)
  folded = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng,
                                   rng_policy="fold_in")
  # At the unperturbed point "same" reproduces the clean pass (same dropout mask).
  _allclose(jax.jit(same)(state.params, 0), grads, rtol=1e-5, atol=1e-6)
  assert _max_abs_diff(folded(state.params, 0), grads) > 1e-3
  assert _max_abs_diff(folded(state.params, 0), folded(state.params, 1)) > 1e-3
  with pytest.raises(ValueError, match="rng_policy"):
    flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng, rng_policy="new")
  with pytest.raises(ValueError, match="stats_policy"):
    flax_linen.amp_step(state, loss_fn, batch, rng, stats_policy="perturbed")


def test_has_aux():
  state, loss_fn, batch = _setup(inner_steps=2)

  def loss_with_aux(params, batch_stats, batch, rng):
    loss, stats = loss_fn(params, batch_stats, batch, rng)
    return loss, (stats, {"twice": 2 * loss})

  @jax.jit
  def both(state):
    with_aux = flax_linen.amp_step(state, loss_with_aux, batch, has_aux=True,
                                   stats_policy="authors")
    return with_aux, flax_linen.amp_step(state, loss_fn, batch, stats_policy="authors")

  (new_state, (loss, aux)), (ref_state, ref_loss) = both(state)
  np.testing.assert_allclose(aux["twice"], 2 * loss, rtol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _allclose(new_state.params, ref_state.params, rtol=1e-6, atol=1e-7)
  _allclose(new_state.batch_stats, ref_state.batch_stats, rtol=1e-6, atol=1e-7)
