"""What :func:`amp`, :func:`grouped_amp` and :func:`drop_in_amp` share.

Argument checks (with the constructor's name in each message), leaf selection
(which parameter arrays are perturbed), schedule evaluation, the device-side
guard for a traced negative ``epsilon``, and finding a transform's state in an
optimiser state. Nothing here knows about one transform in particular.
"""

from collections.abc import Callable
import functools
import numbers
from typing import Any
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
MaskOrFn = Union[Any, Callable[[optax.Params], Any], None]
GradFn = Callable[[optax.Params, Any], optax.Updates]

NORMS = ("per_tensor", "global")


def inexact(leaf: Any) -> bool:
  """Whether ``leaf`` is a floating (or complex) array: the only kind AMP perturbs."""
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def value_at(value: ScalarOrSchedule, count: jax.Array) -> Any:
  """A hyper-parameter at step ``count``: the schedule's value, or the constant itself."""
  return value(count) if callable(value) else value


# Argument checks -------------------------------------------------------------------------------


def check_non_negative(where: str, name: str, value: Any) -> None:
  """Rejects a negative concrete scalar, or a schedule negative at a probed step."""
  if callable(value):
    _probe_schedule(where, name, value)
    return
  message = (f"{where}: `{name}` must be a non-negative float or an optax schedule (a function "
             f"of the step count); got {value!r}.")
  if isinstance(value, (str, bytes, bool, np.bool_)) or (
      hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.number)):
    raise TypeError(message)
  try:
    number = float(np.asarray(value))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced, e.g. a hyper-parameter injected by optax.inject_hyperparams.
  except (TypeError, ValueError) as e:
    raise TypeError(message) from e
  if not number >= 0:  # also rejects NaN
    raise ValueError(
        f"{where}: `{name}` must be >= 0, got {number}. AMP ascends the loss, so `{name}` is a "
        "size, not a signed step.")
  if not np.isfinite(number):
    raise ValueError(
        f"{where}: `{name}` must be finite, got {number}. An unbounded ball or step is no "
        "regulariser (and inf * 0 is NaN); for SAM-like steps to the ball's edge use a finite "
        "epsilon with a large finite inner_lr, e.g. 1e6.")


# Steps at which a schedule of epsilon or inner_lr is probed when a transform is built: every
# step of a short run, then log-spaced steps of long ones.
_PROBED_STEPS = np.unique(np.concatenate([
    np.arange(1024), np.geomspace(1024, 2**24, 64).astype(np.int64)])).astype(np.int32)


def _probe_schedule(where: str, name: str, schedule: Any) -> None:
  """Raises if ``schedule`` is negative (or NaN) at a probed step; silent if it cannot be probed.

  A schedule's value is traced in the compiled step, where only a device-side
  outcome (NaN updates, :func:`nan_if_negative`) is possible; most mistakes
  (a decay that crosses zero, a sign error) show within the probed steps,
  here, before training starts.
  """
  try:
    with jax.ensure_compile_time_eval():
      values = np.asarray(schedule(jnp.asarray(_PROBED_STEPS)), np.float64)
    if values.shape != _PROBED_STEPS.shape:
      raise ValueError("not elementwise")
    steps = _PROBED_STEPS
  except Exception:  # a schedule written for scalar counts only: probe fewer steps.
    steps = _PROBED_STEPS[:64]
    try:
      with jax.ensure_compile_time_eval():
        values = np.array([float(np.asarray(schedule(jnp.asarray(c)))) for c in steps])
    except Exception:
      return  # it cannot be evaluated outside the step; the device-side check remains.
  bad = np.flatnonzero(~(values >= 0))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
        f"{where}: the schedule given as `{name}` is {values[i]} at step {int(steps[i])}; it "
        "must be >= 0 at every step (a negative radius or step turns the ascent into descent).")


def check_static_int(where: str, name: str, value: Any, minimum: int, meaning: str,
                     hint: str) -> int:
  """A Python int >= ``minimum`` (fixed at trace time), or an error that says what to pass."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    static = ""
    if isinstance(value, (jax.Array, np.ndarray)):
      names = "('inner_steps',)" if name == "inner_steps" else f"('inner_steps', '{name}')"
      static = (" Under optax.inject_hyperparams, mark it static: "
                f"inject_hyperparams(..., static_args={names}).")
    raise TypeError(
        f"{where}: `{name}` must be a Python int >= {minimum} ({meaning}, fixed at trace "
        f"time); got {value!r}." + static)
  if value < minimum:
    raise ValueError(f"{where}: `{name}` must be >= {minimum}, got {value}. {hint}")
  return int(value)


def check_bool(where: str, name: str, value: Any, meaning: str) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{where}: `{name}` must be True or False ({meaning}); got {value!r}.")
  return bool(value)


def check_unroll(where: str, unroll: Any) -> int | bool | None:
  if isinstance(unroll, (bool, np.bool_)):
    return bool(unroll)
  if isinstance(unroll, (jax.Array, np.ndarray)):
    raise TypeError(
        f"{where}: `unroll` must be a Python bool or int, fixed at trace time; got {unroll!r}. "
        "Under optax.inject_hyperparams mark it static: static_args=('inner_steps', 'unroll').")
  if unroll is not None and (not isinstance(unroll, numbers.Integral) or unroll < 1):
    raise ValueError(
        f"{where}: `unroll` must be None, a bool or an int >= 1, got {unroll!r}. Use "
        "unroll=True to unroll the K inner steps (faster on CPU), 1 to keep one loop body.")
  return unroll if unroll is None else int(unroll)


def check_ascent_args(where: str, *, epsilon: Any, inner_lr: Any, inner_steps: Any, norm: Any,
                      relative: Any, mask: Any) -> int:
  """Checks the arguments every AMP constructor takes; returns ``K``."""
  check_non_negative(where, "epsilon", epsilon)
  check_non_negative(where, "inner_lr", inner_lr)
  num_steps = check_static_int(
      where, "inner_steps", inner_steps, 0, "the number K of ascent steps",
      "Use 0 to switch AMP off (the base optimiser's update, unchanged).")
  if norm not in NORMS:
    raise ValueError(
        f"{where}: `norm` must be one of {NORMS}, got {norm!r}. 'per_tensor' bounds each "
        "parameter array (the authors' code); 'global' bounds all parameters together (the "
        "paper's formula).")
  check_bool(where, "relative", relative,
             "True: the radius is epsilon times the norm of the parameters it bounds")
  check_mask_argument(where, mask)
  return num_steps


# Leaf selection -------------------------------------------------------------------------------


def check_mask_argument(where: str, mask: Any) -> None:
  """A mask must be a pytree of bools or a function of the params; checked at build time."""
  if isinstance(mask, (bool, np.bool_, jax.Array, np.ndarray)):
    raise TypeError(
        f"{where}: `mask` must be a pytree of bools shaped like the params, or a function of "
        f"the params returning one; got the single value {mask!r}. (Under "
        "optax.inject_hyperparams a callable mask is taken for a schedule and called with the "
        "step count: list it in static_args, static_args=('inner_steps', 'mask').) To switch "
        "AMP off use inner_steps=0.")
  if mask is not None and not callable(mask):
    for leaf in jax.tree.leaves(mask):
      _mask_bool(where, leaf)  # a malformed mask fails here, not mid-training.


def _mask_bool(where: str, leaf: Any) -> bool:
  """A mask leaf as a Python bool: a bool, or a concrete 0-d bool array; nothing else."""
  if isinstance(leaf, (bool, np.bool_)):
    return bool(leaf)
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jnp.bool_) and np.ndim(leaf) == 0:
    try:
      return bool(leaf)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
      raise TypeError(
          f"{where}: `mask` leaves must be known at trace time; got a traced value. Under "
          "optax.inject_hyperparams a mask (and a callable mask, which it takes for a "
          "schedule) must be static: static_args=('inner_steps', 'mask').") from e
  raise TypeError(
      f"{where}: each `mask` leaf must be True or False, one per parameter array (AMP perturbs "
      f"whole arrays); got {leaf!r}. Build the mask from the params, e.g. "
      "mask = jax.tree.map(lambda p: p.ndim > 1, params).")


def mask_leaves(where: str, mask: MaskOrFn, params: Any) -> list[bool]:
  """Resolves ``mask`` to one Python bool per leaf of ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  if mask is None:
    return [True] * len(leaves)
  if callable(mask):
    mask = mask(params)
  try:
    # A mask leaf may stand for a whole subtree (an optax-style prefix mask).
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{where}: `mask` must have the structure of params (or a prefix of it), with a bool "
        "for each leaf. Build it from the params, e.g.\n"
        "    mask = jax.tree.map(lambda p: p.ndim > 1, params)\n"
        f"or pass a function of params.\nmask structure:   {jax.tree.structure(mask)}\n"
        f"params structure: {treedef}") from e
  out = [_mask_bool(where, m) for m in jax.tree.leaves(full)]
  if len(out) != len(leaves):
    raise ValueError(
        f"{where}: `mask` gives {len(out)} bools for {len(leaves)} params leaves; give one bool "
        "per parameter array.")
  return out


def chosen_leaves(where: str, mask: MaskOrFn, params: Any) -> list[int]:
  """Indices of the leaves of ``params`` that are perturbed: masked in and floating."""
  leaves = jax.tree.leaves(params)
  return [i for i, (m, p) in enumerate(zip(mask_leaves(where, mask, params), leaves))
          if m and inexact(p)]


# In the compiled step ---------------------------------------------------------------------------


def nan_if_negative(leaves: list[Any], eps: Any, lr: Any) -> list[Any]:
  """NaN in every floating leaf where a traced ``epsilon`` or ``inner_lr`` is negative (or NaN).

  Concrete values were checked when the transform was built; a value traced
  in the step (a schedule's, or one set through ``optax.inject_hyperparams``)
  is checked on the device without a host round-trip: a negative one would
  turn the ascent into a descent, so the update becomes NaN instead of
  quietly different (``optax.apply_if_finite`` skips such steps; the loss
  shows it).
  """
  traced = [v for v in (eps, lr) if isinstance(v, jax.core.Tracer)]
  if not traced:
    return leaves
  valid = functools.reduce(jnp.logical_and, [jnp.asarray(v) >= 0 for v in traced])
  return [jnp.where(valid, g, jnp.nan) if inexact(g) else g for g in leaves]


def all_finite(leaves: Any) -> jax.Array:
  """Whether every floating leaf is finite (a bool array; True when there are none)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(leaves) if inexact(x)]
  return functools.reduce(jnp.logical_and, checks, jnp.array(True))


def find_state(opt_state: Any, state_type: type, where: str, what: str) -> Any:
  """The one ``state_type`` inside ``opt_state`` (any Optax state), or an error saying why not."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
           if isinstance(s, state_type)]
  if len(found) != 1:
    raise ValueError(
        f"{where}: `opt_state` must hold the state of exactly one {what} (the optimiser state "
        f"after the step); found {len(found)}.")
  return found[0]
