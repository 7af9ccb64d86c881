"""Shared by the Flax helpers (no Flax import here): policies, loss-output checks, and loss
scaling (Flax's ``DynamicScale``, used through its own methods)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from amp_optax import _common
from amp_optax._amp import AmpState

STATS_POLICIES = ("clean", "authors")
RNG_POLICIES = ("same", "fold_in")

def check_policies(stats_policy: str, rng_policy: str) -> None:
  """Raises a ValueError naming the allowed values for an unknown policy."""
  if stats_policy not in STATS_POLICIES:
    raise ValueError(
        f"`stats_policy` must be one of {STATS_POLICIES}, got {stats_policy!r}. 'clean' keeps "
        "the clean pass's batch statistics; 'authors' also applies each perturbed pass's.")
  if rng_policy not in RNG_POLICIES:
    raise ValueError(
        f"`rng_policy` must be one of {RNG_POLICIES}, got {rng_policy!r}. 'same' reuses the "
        "clean pass's RNG key (or state) in the perturbed passes; 'fold_in' folds in the inner "
        "step.")


def is_pair(out: Any) -> bool:
  return isinstance(out, (tuple, list)) and len(out) == 2


def check_loss_output(out: Any, has_aux: bool, where: str, aux_form: str) -> None:
  """Says what to change when ``loss_fn``'s output does not fit ``has_aux``.

  JAX's own error for a tuple loss without ``has_aux`` ("Gradient only
  defined for scalar-output functions") does not say what to do.
  """
  if has_aux and not is_pair(out):
    raise TypeError(
        f"{where}: has_aux=True, so loss_fn must return {aux_form}; it returned "
        f"{type(out).__name__}. Pass has_aux=False for a loss_fn that returns the loss alone.")
  if not has_aux and isinstance(out, (tuple, list)):
    raise TypeError(
        f"{where}: loss_fn returned a {type(out).__name__} of length {len(out)}, not a scalar "
        f"loss. If it returns {aux_form}, as Flax's examples do, pass has_aux=True.")


# Loss scaling -----------------------------------------------------------------------------------


def check_dynamic_scale(dynamic_scale: Any, where: str) -> None:
  """``dynamic_scale`` must be ``None`` or have Flax ``DynamicScale``'s ``value_and_grad``."""
  if dynamic_scale is not None and not callable(getattr(dynamic_scale, "value_and_grad", None)):
    raise TypeError(
        f"{where}: `dynamic_scale` must be a flax.training.dynamic_scale.DynamicScale (or None), "
        f"got {type(dynamic_scale).__name__}. Pass the scale the clean pass used, e.g. "
        "dynamic_scale=state.dynamic_scale.")


def nan_unless_finite(grads: Any, finite: jax.Array, params: Any) -> Any:
  """``grads``, or NaN in every floating leaf when a perturbed pass was not finite.

  A pass is not finite when its (unscaled) gradient is not, or when the
  parameters it was given are not: a non-finite gradient of an earlier inner
  step made Δ NaN. Filling every leaf makes sure the NaN reaches what ``amp``
  returns on every device (``batch_axis_name`` averages it in) and so its
  ``perturbed_grad_norm``, which :func:`dynamic_scale_after_amp` reads.
  """
  finite = jnp.logical_and(finite, _common.all_finite(params))

  def poisoned(g):
    if not jnp.issubdtype(jnp.result_type(g), jnp.inexact):
      return g
    return jnp.where(finite, g, jnp.asarray(jnp.nan, jnp.result_type(g)))

  return jax.tree.map(poisoned, grads)


def dynamic_scale_given(dynamic_scale: Any, finite: jax.Array) -> Any:
  """``dynamic_scale`` updated as its own ``value_and_grad`` updates it for ``finite``.

  Flax's rule (grow after ``growth_interval`` finite steps, back off on a
  non-finite one, never below ``minimum_scale``) is applied by Flax's own
  code, fed a probe whose gradient is finite exactly when ``finite`` is.
  """
  def probe(x):
    return x * jnp.where(finite, 0.0, jnp.nan)

  updated, _, _, _ = dynamic_scale.value_and_grad(probe)(jnp.zeros((), jnp.float32))
  return updated


def dynamic_scale_after_amp(
    dynamic_scale: Any, is_fin: Any, opt_state: Any, where: str = "dynamic_scale_after_amp",
) -> tuple[Any, jax.Array]:
  """The loss scale after an AMP step, and whether to apply the step (see the Flax helpers)."""
  check_dynamic_scale(dynamic_scale, where)
  if dynamic_scale is None:
    raise TypeError(f"{where}: `dynamic_scale` is None; call this only with a loss scale.")
  amp_state = _common.find_state(opt_state, AmpState, where, "amp_optax.amp (an AmpState)")
  finite = jnp.logical_and(jnp.asarray(is_fin), jnp.isfinite(amp_state.perturbed_grad_norm))
  return dynamic_scale_given(dynamic_scale, finite), finite


def keep_where_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``finite``, else ``old``, leaf by leaf (the skipped step of ``DynamicScale``)."""
  return jax.tree.map(functools.partial(jnp.where, finite), new, old)
