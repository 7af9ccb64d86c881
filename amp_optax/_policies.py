"""BatchNorm and RNG policies shared by the Flax helpers (no Flax import here)."""

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
