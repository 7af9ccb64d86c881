"""A transform that records the ``value=`` extra argument: proof that extras reach the chain."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ValueState(NamedTuple):
  value: jax.Array


def record_value() -> optax.GradientTransformationExtraArgs:
  def init_fn(params):
    del params
    return ValueState(jnp.zeros(()))

  def update_fn(updates, state, params=None, *, value, **extra):
    del state, params, extra
    return updates, ValueState(jnp.asarray(value, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
