"""Shared by the Flax helpers (no Flax import here): policies, loss-output checks, import help."""

from typing import Any

STATS_POLICIES = ("clean", "authors")
RNG_POLICIES = ("same", "fold_in")

FLAX_EXTRA_HELP = (
    'pip install -e ".[flax]" from the amp_optax checkout (or pip install "flax>=0.12.8")')


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


def missing_flax(module: str, error: ModuleNotFoundError) -> ModuleNotFoundError:
  """The error to raise when ``module`` is imported without Flax installed."""
  if error.name is None or error.name.split(".")[0] != "flax":
    return error  # something else is missing: let its own error through.
  return ModuleNotFoundError(
      f"{module} needs Flax, which is not installed ({error}). Install the extra: "
      f"{FLAX_EXTRA_HELP}. The core transform, amp_optax.amp, needs no Flax.", name="flax")


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
