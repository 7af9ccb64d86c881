"""A property of every composition: amp and drop_in_amp in any position of a chain of optax's
common transforms either raise at the first update, naming the fix, or compute exactly what
the documented composition computes.

The reference is written from the algorithm: Delta from the clean gradient by NumPy (float64),
the gradient at theta + Delta, and then the other transforms applied by optax to that gradient
(for ``amp``: ``chain(amp, rest)`` means ``rest`` sees the adversarial gradient), or the base
chain stepping theta with it (for ``drop_in_amp``: the second call's destination).
"""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

X = np.linspace(-1.0, 1.0, 24).reshape(8, 3)
Y = np.sin(np.arange(8.0))
BATCH = (jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32))
EPSILON = 0.05


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["w"]) + params["b"] - y) ** 2)


GRAD = jax.grad(loss_fn)
AMP_GRAD_FN = jax.grad(lambda p, _: loss_fn(p, BATCH))

# Optax's common transforms, by name (built fresh for each example).
TRANSFORMS = {
    "clip": lambda: optax.clip(0.05),
    "clip_by_global_norm": lambda: optax.clip_by_global_norm(0.1),
    "add_decayed_weights": lambda: optax.add_decayed_weights(0.3),
    "scale_by_adam": optax.scale_by_adam,
    "scale_by_schedule": lambda: optax.scale_by_schedule(lambda count: 0.5 / (1.0 + count)),
    "sgd": lambda: optax.sgd(0.1),
    "injected_sgd": lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
}
WRAPPERS = ("none", "apply_if_finite", "inject_hyperparams")


def params0():
  return {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}


def adversarial_gradient(params):
  """The gradient at theta + Delta_1, Delta_1 per tensor by NumPy in float64."""
  clean = {k: np.asarray(v, np.float64) for k, v in GRAD(params, BATCH).items()}
  delta = {k: g * min(1.0, EPSILON / max(float(np.linalg.norm(g)), 1e-30))
           for k, g in clean.items()}
  return GRAD({k: params[k] + jnp.asarray(delta[k], jnp.float32) for k in params}, BATCH), delta


def chain_of(names):
  return optax.chain(*[TRANSFORMS[n]() for n in names]) if names else optax.identity()


def assert_tree_close(actual, expected, rtol=2e-5, atol=1e-7):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


names_strategy = st.lists(st.sampled_from(sorted(TRANSFORMS)), min_size=0, max_size=3)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True)
@given(names=names_strategy, data=st.data(), wrapper=st.sampled_from(WRAPPERS))
def test_amp_at_any_position(names, data, wrapper):
  position = data.draw(st.integers(0, len(names)), label="position")
  if wrapper == "inject_hyperparams":
    amp_tx = optax.inject_hyperparams(amp_optax.amp, static_args=("inner_steps",))(EPSILON)
  else:
    amp_tx = amp_optax.amp(EPSILON)
  parts = [TRANSFORMS[n]() for n in names]
  tx = optax.chain(*parts[:position], amp_tx, *parts[position:])
  if wrapper == "apply_if_finite":
    tx = optax.apply_if_finite(tx, 3)
  params = params0()
  state = tx.init(params)
  grads = GRAD(params, BATCH)
  if position > 0:
    with pytest.raises(ValueError, match="must be\\s+first"):
      tx.update(grads, state, params, grad_fn=AMP_GRAD_FN)
    return
  updates, _ = tx.update(grads, state, params, grad_fn=AMP_GRAD_FN)
  rest = chain_of(names)
  adv, _ = adversarial_gradient(params)
  expected, _ = rest.update(adv, rest.init(params), params)
  assert_tree_close(updates, expected)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, derandomize=True)
@given(base_names=st.lists(st.sampled_from(sorted(TRANSFORMS)), min_size=1, max_size=2),
       after_names=names_strategy, wrapper=st.sampled_from(("none", "apply_if_finite")))
def test_drop_in_amp_at_any_position(base_names, after_names, wrapper):
  base = chain_of(base_names)
  inner = amp_optax.drop_in_amp(base, EPSILON)
  if wrapper == "apply_if_finite":
    inner = optax.apply_if_finite(inner, 3)
  tx = optax.chain(inner, *[TRANSFORMS[n]() for n in after_names])
  params = params0()
  state = tx.init(params)
  if after_names:
    with pytest.raises(ValueError, match="must be\\s+last"):
      tx.update(GRAD(params, BATCH), state, params)
    return
  # Call 1 moves to theta + Delta_1; call 2 to theta + base(gradient there).
  updates, state = tx.update(GRAD(params, BATCH), state, params)
  perturbed = optax.apply_updates(params, updates)
  adv, delta = adversarial_gradient(params)
  assert_tree_close({k: perturbed[k] - params[k] for k in params}, delta, atol=1e-7)
  updates, state = tx.update(GRAD(perturbed, BATCH), state, perturbed)
  after = optax.apply_updates(perturbed, updates)
  base_updates, _ = base.update(adv, base.init(params), params)
  assert_tree_close(after, optax.apply_updates(params, base_updates), atol=1e-6)
  assert_tree_close(amp_optax.unperturbed_params(after, state), after, atol=0)


@pytest.mark.parametrize("inside", ["multisteps", "lookahead"])
def test_wrappers_that_cannot_hold_amp_raise(inside):
  params = params0()
  if inside == "multisteps":
    tx = optax.MultiSteps(optax.chain(amp_optax.amp(EPSILON), optax.sgd(0.1)), 2)
    match = "MultiSteps"
    state = tx.init(params)
    call = lambda: tx.update(GRAD(params, BATCH), state, params, grad_fn=AMP_GRAD_FN)
  else:
    tx = optax.lookahead(amp_optax.drop_in_amp(optax.sgd(0.1), EPSILON), 2, 0.5)
    match = "lookahead"
    synced = optax.LookaheadParams.init_synced(params)
    state = tx.init(synced)
    call = lambda: tx.update(GRAD(params, BATCH), state, synced)
  with pytest.raises(ValueError, match=match):
    call()
