"""Grouped ascent (m-sharpness): per-group gradients stacked on a leading axis, and their mean.

With ``amp(..., num_groups=G)`` the batch is split into ``G`` groups of ``m`` examples. The
clean gradient passed as ``updates`` and ``grad_fn``'s output hold one gradient per group,
stacked on a leading axis of size ``G`` (``jax.vmap`` over the groups computes them), and
``grad_fn`` receives the parameters stacked the same way, each group's at its own
``theta + Delta_j``. ``amp`` returns the mean over groups: a plain gradient for the rest of the
chain. The group axis can be sharded like the batch; the ascent then needs no communication
until that mean.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _inexact(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def check_stacked(what: str, leaves: list[Any], params: Any, groups: int) -> None:
  """Each leaf must be the parameter's shape with a leading group axis of size ``groups``."""
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, param), leaf in zip(with_paths, leaves):
    want = (groups,) + jnp.shape(param)
    if jnp.shape(leaf) != want:
      raise ValueError(
          f"amp(num_groups={groups}): {what} has shape {jnp.shape(leaf)} at "
          f"params{jax.tree_util.keystr(path)}, where one gradient per group is {want}: the "
          "parameter's shape with a leading group axis. Compute per-group gradients with "
          "jax.vmap over the grouped batch, e.g. amp_optax.grouped_value_and_grad(loss_fn, "
          "params, amp_optax.group_batch(batch, num_groups)).")


def mean_leaves(leaves: list[Any], groups: int) -> list[Any]:
  """The mean over the leading group axis (non-floating leaves: the first group's)."""
  del groups
  return [jnp.mean(x, axis=0).astype(x.dtype) if _inexact(x) else x[0] for x in leaves]


def mean_group_norm(leaves: list[Any], norm: Callable[[list[Any]], Any]) -> Any:
  """The mean over groups of ``norm`` of each group's leaves."""
  return jnp.mean(jax.vmap(norm)(leaves))


def mean_over_groups(updates: Any, groups: int, axis_names: tuple[str, ...] | None) -> Any:
  leaves, treedef = jax.tree.flatten(updates)
  leaves = mean_leaves(leaves, groups)
  if axis_names:
    leaves = jax.lax.pmean(leaves, axis_name=axis_names)
  return jax.tree.unflatten(treedef, leaves)


def num_groups_of(grouped_batch: Any, where: str) -> int:
  """The size of the leading group axis shared by every leaf of ``grouped_batch``."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(grouped_batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        f"{where}: every leaf of `grouped_batch` must have the same leading group axis, as "
        "amp_optax.group_batch(batch, num_groups) makes; got leading sizes "
        f"{sorted(map(str, sizes))}.")
  return int(sizes.pop())  # type: ignore[arg-type]


def group_batch(batch: Any, num_groups: int) -> Any:
  """Splits every leaf ``(N, ...)`` of ``batch`` into ``(num_groups, N // num_groups, ...)``.

  Args:
    batch: a pytree of arrays sharing their leading (example) axis.
    num_groups: ``G``, which must divide ``N``.

  Returns:
    The batch with a leading group axis; group ``j`` holds examples
    ``j*m .. (j+1)*m - 1``, ``m = N // G``.
  """
  def split(x):
    n = jnp.shape(x)[0]
    if n % num_groups:
      raise ValueError(
          f"group_batch(): a batch of {n} examples does not split into {num_groups} groups of "
          "equal size; choose num_groups dividing the batch size.")
    return jnp.reshape(x, (num_groups, n // num_groups) + jnp.shape(x)[1:])
  return jax.tree.map(split, batch)


def grouped_value_and_grad(
    loss_fn: Callable[..., Any], params: Any, grouped_batch: Any, *, has_aux: bool = False,
) -> tuple[Any, Any, Callable[[Any, Any], Any]]:
  """Per-group losses and gradients at ``params``, and the ``grad_fn`` for grouped AMP.

  Args:
    loss_fn: ``loss_fn(params, batch)`` (with ``has_aux``, returning ``(loss,
      aux)``), the mean loss over the examples of ``batch``.
    params: the parameters.
    grouped_batch: the batch with a leading group axis (:func:`group_batch`).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(out, grads, amp_grad_fn)``: ``out`` the per-group loss (or ``(loss,
    aux)``), stacked on the group axis; ``grads`` the per-group gradients
    (pass them as ``updates``); ``amp_grad_fn(stacked_params, inner_step)``
    the per-group gradients at per-group parameters (pass it as ``grad_fn``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> def loss_fn(p, b):
    ...   return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.ones((3,))}
    >>> batch = {"x": jnp.arange(24.0).reshape(8, 3) / 10, "y": jnp.ones((8,))}
    >>> tx = optax.chain(amp_optax.amp(0.05, num_groups=4), optax.sgd(0.1))
    >>> losses, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(
    ...     loss_fn, params, amp_optax.group_batch(batch, 4))
    >>> updates, opt_state = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
    >>> losses.shape, updates["w"].shape
    ((4,), (3,))
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
  out, grads = jax.vmap(value_and_grad, in_axes=(None, 0))(params, grouped_batch)
  per_group = jax.vmap(jax.grad(loss_fn, has_aux=has_aux), in_axes=(0, 0))

  def amp_grad_fn(stacked_params: Any, inner_step: Any) -> Any:
    del inner_step
    grads = per_group(stacked_params, grouped_batch)
    return grads[0] if has_aux else grads

  return out, grads, amp_grad_fn
