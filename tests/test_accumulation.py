"""Gradient accumulation with AMP, both ways, against a float64 NumPy reference.

* Per-micro-batch AMP: each micro-batch ascends from its own clean gradient, the perturbed
  gradients are averaged, then the base optimiser steps: ``chain(amp, MultiSteps(base))``.
* Full-batch AMP with micro-batched gradients: the ascent starts from the gradient of the whole
  batch and ``grad_fn`` averages over all micro-batches (``optax.microbatching``).
* ``MultiSteps(chain(amp, base))`` mixes the two (accumulated clean gradient, last micro-batch's
  ``grad_fn``): it raises, and the escape hatch for a ``grad_fn`` that does cover the whole
  accumulated batch computes full-batch AMP.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_reference import jax_loss
from test_reference import make_problem
from test_reference import np_loss_and_grad
from test_reference import np_project

import amp_optax

EPS, INNER_LR, LR, MICRO = 0.05, 0.7, 0.1, 4


def np_amp_gradient(params, x, y, eps, k_steps, norm):
  """The AMP gradient of one batch: K projected ascent steps from its own clean gradient."""
  _, g = np_loss_and_grad(params, x, y)
  delta = {k: np.zeros_like(v) for k, v in params.items()}
  for _ in range(k_steps):
    delta = np_project({k: delta[k] + INNER_LR * g[k] for k in delta}, eps, norm)
    _, g = np_loss_and_grad({k: params[k] + delta[k] for k in params}, x, y)
  return g


def np_sgd(params, grads):
  return {k: params[k] - LR * grads[k] for k in params}


def micro_batches(x, y):
  return list(zip(np.split(x, MICRO), np.split(y, MICRO)))


def as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def assert_close(got, want):
  for k in want:
    assert got[k].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
@pytest.mark.parametrize("k_steps", [1, 2])
def test_per_micro_batch_amp_outside_multisteps(x64, norm, k_steps):  # noqa: F811
  params, x, y = make_problem()
  # Reference: the mean over micro-batches of each micro-batch's own AMP gradient, one SGD step.
  per_micro = [np_amp_gradient(params, xb, yb, EPS, k_steps, norm)
               for xb, yb in micro_batches(x, y)]
  want = np_sgd(params, {k: np.mean([g[k] for g in per_micro], axis=0) for k in params})

  # MultiSteps accumulates in float32 unless told otherwise.
  accumulate = optax.MultiSteps(optax.sgd(LR), every_k_schedule=MICRO,
                                accumulator_dtype=jnp.float64)
  tx = optax.chain(amp_optax.amp(EPS, inner_lr=INNER_LR, inner_steps=k_steps, norm=norm),
                   accumulate.gradient_transformation())

  @jax.jit
  def step(p, state, xb, yb):
    grads = jax.grad(jax_loss)(p, xb, yb)
    updates, state = tx.update(grads, state, p, grad_fn=jax.grad(lambda q, _: jax_loss(q, xb, yb)))
    return optax.apply_updates(p, updates), state

  p = as_jax(params)
  state = tx.init(p)
  for i, (xb, yb) in enumerate(micro_batches(x, y)):
    p, state = step(p, state, jnp.asarray(xb), jnp.asarray(yb))
    if i < MICRO - 1:  # only accumulating
      assert_close(p, params)
  assert bool(accumulate.has_updated(state[1]))
  assert_close(p, want)
  # Guard: per-micro-batch AMP differs from full-batch AMP here, so the test can tell them apart.
  full = np_sgd(params, np_amp_gradient(params, x, y, EPS, k_steps, norm))
  assert max(np.max(np.abs(full[k] - want[k])) for k in params) > 1e-8


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_full_batch_amp_with_microbatched_gradients(x64, norm):  # noqa: F811
  params, x, y = make_problem()
  want = np_sgd(params, np_amp_gradient(params, x, y, EPS, 2, norm))

  mean_grad = optax.microbatching.microbatch(
      jax.grad(jax_loss), argnums=(1, 2), microbatch_size=x.shape[0] // MICRO,
      accumulator=optax.microbatching.AccumulationType.MEAN)
  tx = optax.chain(amp_optax.amp(EPS, inner_lr=INNER_LR, inner_steps=2, norm=norm),
                   optax.sgd(LR))

  @jax.jit
  def step(p, state, x, y):
    grads = mean_grad(p, x, y)
    updates, state = tx.update(grads, state, p, grad_fn=lambda q, _: mean_grad(q, x, y))
    return optax.apply_updates(p, updates), state

  p = as_jax(params)
  p, _ = step(p, tx.init(p), jnp.asarray(x), jnp.asarray(y))
  assert_close(p, want)


def _multisteps_step(grad_fn_for):
  tx = optax.MultiSteps(optax.chain(amp_optax.amp(EPS, inner_lr=INNER_LR), optax.sgd(LR)),
                        every_k_schedule=MICRO, accumulator_dtype=jnp.float64)

  def step(p, state, xb, yb, i):
    grads = jax.grad(jax_loss)(p, xb, yb)
    updates, state = tx.update(grads, state, p, grad_fn=grad_fn_for(xb, yb, i))
    return optax.apply_updates(p, updates), state

  return tx, jax.jit(step, static_argnums=4)


def test_amp_inside_multisteps_raises_with_both_fixes():
  params, x, y = make_problem()
  tx, step = _multisteps_step(lambda xb, yb, i: jax.grad(lambda q, _: jax_loss(q, xb, yb)))
  p = as_jax(params)
  with pytest.raises(ValueError) as info:
    step(p, tx.init(p), jnp.asarray(x[:4]), jnp.asarray(y[:4]), 0)
  message = str(info.value)
  assert "optax.MultiSteps" in message
  assert "optax.chain(amp_optax.amp(eps), accumulate)" in message
  assert "microbatching" in message
  assert "covers_accumulated_batch" in message


@pytest.mark.slow
def test_marked_grad_fn_inside_multisteps_is_full_batch_amp(x64):  # noqa: F811
  """The escape hatch: a grad_fn over every micro-batch seen so far gives full-batch AMP."""
  params, x, y = make_problem()
  want = np_sgd(params, np_amp_gradient(params, x, y, EPS, 1, "per_tensor"))
  xs, ys = jnp.asarray(x), jnp.asarray(y)
  rows = x.shape[0] // MICRO

  def grad_fn_for(xb, yb, i):
    seen_x, seen_y = xs[:(i + 1) * rows], ys[:(i + 1) * rows]  # the micro-batches so far
    return amp_optax.covers_accumulated_batch(
        jax.grad(lambda q, _: jax_loss(q, seen_x, seen_y)))

  tx, step = _multisteps_step(grad_fn_for)
  p = as_jax(params)
  state = tx.init(p)
  for i, (xb, yb) in enumerate(micro_batches(x, y)):
    p, state = step(p, state, jnp.asarray(xb), jnp.asarray(yb), i)
  assert_close(p, want)
