"""Named mapped axes (``jax.pmap``, ``shard_map``, named ``vmap``) and gradient averaging.

Under a named mapped axis each device (or mapped instance) holds its own batch,
so the gradients a ``grad_fn`` returns are per-device unless they are averaged
over the axis. Left unaveraged, every device ascends and steps with its own
gradient and the replicas drift apart: a different result, not an error. So
``amp`` makes the averaging an explicit choice wherever it cannot see that the
gradients are already global. Everything here runs at trace time.
"""

from typing import Any

import jax

AxisNames = tuple[str, ...]


def bound_axis_names() -> AxisNames:
  """The named axes in scope where this is traced (empty under plain ``jit``)."""
  try:
    from jax._src import core  # no public API reads the axis environment
    return tuple(core.get_axis_env().axis_names())
  except (ImportError, AttributeError):
    getter = getattr(jax.core, "unsafe_get_axis_names_DO_NOT_USE", None)
    return tuple(getter()) if getter is not None else ()


def varying_axes_tracked() -> bool:
  """True inside ``shard_map(check_vma=True)``, where avals record the axes a value varies over."""
  try:
    from jax._src import config  # no public API says whether check_vma is on where traced
    flag = getattr(config, "_check_vma", None)
    return bool(flag is not None and flag.value)
  except ImportError:
    return False


def varying_axes(x: Any) -> frozenset[str] | None:
  """The mapped axes ``x`` varies over, or ``None`` where JAX does not track them."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return None if vma is None else frozenset(vma)


def normalise(batch_axis_name: Any, where: str = "amp()") -> AxisNames | None:
  """``None``, a name, or a tuple of names, as a tuple (``None`` stays ``None``)."""
  if batch_axis_name is None:
    return None
  if isinstance(batch_axis_name, str):
    return (batch_axis_name,)
  if isinstance(batch_axis_name, (tuple, list)) and all(
      isinstance(n, str) for n in batch_axis_name):
    return tuple(batch_axis_name)
  raise TypeError(
      f"{where}: `batch_axis_name` must be None, an axis name (a str) or a tuple of axis names "
      f"(() for none); got {batch_axis_name!r}.")


def _unaveraged_axes(grad_leaves: list[Any], param_leaves: list[Any]) -> frozenset[str] | None:
  """Axes some gradient varies over though its parameter does not; None if not tracked."""
  if not varying_axes_tracked():
    return None
  extra: frozenset[str] = frozenset()
  for g, p in zip(grad_leaves, param_leaves):
    g_axes, p_axes = varying_axes(g), varying_axes(p)
    if g_axes is None or p_axes is None:
      return None
    extra |= g_axes - p_axes
  return extra


def _names(axes: Any) -> str:
  return ", ".join(repr(a) for a in sorted(axes))


def check_bound(axis_names: AxisNames, where: str = "amp()") -> None:
  """An explicit ``batch_axis_name`` must name axes that are in scope."""
  missing = [n for n in axis_names if n not in bound_axis_names()]
  if missing:
    raise ValueError(
        f"{where}: batch_axis_name names {_names(missing)}, but no mapped axis of that name is in "
        f"scope here (bound: {_names(bound_axis_names()) or 'none'}). Under jax.jit with sharded "
        "arrays gradients are already global: leave batch_axis_name=None. Under jax.pmap or "
        "jax.shard_map give the axis_name your step maps over.")


def check_averaged(what: str, grad_leaves: list[Any], param_leaves: list[Any],
                   batch_axis_name: AxisNames | None, where: str = "amp()") -> None:
  """Raises unless ``grad_leaves`` are known to be averaged over every mapped axis in scope.

  Args:
    what: which gradient, for the message ("grad_fn's output", "the clean gradient").
    grad_leaves: the gradient, flattened like the parameters.
    param_leaves: the parameters.
    batch_axis_name: ``amp``'s argument, normalised; ``None`` when not given.
  """
  bound = bound_axis_names()
  if not bound:
    return
  unaveraged = _unaveraged_axes(grad_leaves, param_leaves)
  if unaveraged is None:  # JAX does not say whether the gradients vary: the user must.
    if batch_axis_name is not None:
      return
    raise ValueError(
        f"{where}: it runs under the named mapped axis {_names(bound)} (jax.pmap, jax.shard_map "
        "or a named vmap), where it cannot tell whether the gradients are averaged over it. "
        "Without averaging, each device would ascend and step with its own gradient and the "
        "replicas would drift apart silently. Say which:\n"
        f"  * {where[:-2]}(..., batch_axis_name={bound[0]!r}): grad_fn returns per-device "
        "gradients; amp averages them (lax.pmean) so that all devices share one Delta, as on "
        "one device. Average the clean gradient you pass as `updates` yourself, as for plain "
        f"training (grads = jax.lax.pmean(grads, {bound[0]!r})).\n"
        f"  * {where[:-2]}(..., batch_axis_name=()): your grad_fn already returns gradients "
        "averaged over the devices (it calls lax.pmean itself): amp averages nothing.")
  if unaveraged:
    fix = (f"pass batch_axis_name={sorted(unaveraged)[0]!r} to {where[:-2]}"
           if batch_axis_name is None
           else f"average it over {_names(unaveraged)} too")
    raise ValueError(
        f"{where}: {what} varies over the mapped axis {_names(unaveraged)} (shard_map sees it "
        "differ between devices) though the parameters do not: it is a per-device gradient, and "
        f"the replicas would drift apart. To average it, {fix}; for the clean gradient passed as "
        f"`updates`, average it yourself before tx.update (jax.lax.pmean).")
