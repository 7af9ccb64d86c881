"""Grouped ascent (m-sharpness): :func:`grouped_amp`, one Delta per group of examples.

With ``grouped_amp(epsilon, num_groups=G)`` the batch is split into ``G`` groups of ``m``
examples. The clean gradient passed as ``updates`` and ``grad_fn``'s output hold one gradient
per group, stacked on a leading axis of size ``G`` (``jax.vmap`` over the groups computes them),
and ``grad_fn`` receives the parameters stacked the same way, each group's at its own
``theta + Delta_j``. The transform returns the mean over groups: a plain gradient for the rest
of the chain. The group axis can be sharded like the batch; the ascent then needs no communication
until that mean.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amp_optax import _amp
from amp_optax import _ascent
from amp_optax import _call_checks
from amp_optax import _common
from amp_optax import _mapped_axes
from amp_optax._common import GradFn
from amp_optax._common import MaskOrFn
from amp_optax._common import ScalarOrSchedule

WHERE = "grouped_amp()"


def check_stacked(what: str, leaves: list[Any], params: Any, groups: int,
                  devices: int = 1) -> None:
  """Each leaf must be the parameter's shape with a leading group axis of size ``groups``."""
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, param), leaf in zip(with_paths, leaves):
    want = (groups,) + jnp.shape(param)
    if jnp.shape(leaf) != want:
      per_device = "" if devices == 1 else (
          f" num_groups={groups * devices} counts the groups over all {devices} devices of "
          f"batch_axis_name, so each device holds {groups}: split each device's batch with "
          f"group_batch(local_batch, {groups}). (The same num_groups then means the same m on "
          "any number of devices.)")
      raise ValueError(
          f"grouped_amp(num_groups={groups * devices}): {what} has shape {jnp.shape(leaf)} at "
          f"params{jax.tree_util.keystr(path)}, where one gradient per group is {want}: the "
          "parameter's shape with a leading group axis." + per_device + " Compute per-group "
          "gradients with jax.vmap over the grouped batch, e.g. "
          "amp_optax.grouped_value_and_grad(loss_fn)(params, amp_optax.group_batch(batch, G)).")


def groups_per_device(groups: int, axis_names: tuple[str, ...] | None) -> tuple[int, int]:
  """``(groups on each device, number of devices)`` along ``batch_axis_name``."""
  if not axis_names:
    return groups, 1
  devices = 1
  for name in axis_names:
    size = getattr(jax.lax, "axis_size", None)  # public since jax 0.6; psum(1) before it
    devices *= int(size(name) if size is not None else jax.lax.psum(1, name))
  if groups % devices:
    raise ValueError(
        f"grouped_amp(num_groups={groups}): num_groups counts the groups over all devices, and "
        f"the {devices} devices along batch_axis_name={axis_names!r} must hold the same number "
        f"each: choose a num_groups divisible by {devices}.")
  return groups // devices, devices


def check_varying(what: str, leaves: list[Any], axis_names: tuple[str, ...] | None) -> None:
  """Per-group gradients spread over devices must differ between them (shard_map's check_vma).

  Under ``shard_map(check_vma=True)`` the gradient with respect to replicated parameters comes
  out summed over the devices: each device's group ``j`` would hold the sum of every device's
  group ``j`` (its loss times ``n``), silently.
  """
  if not axis_names or not _mapped_axes.varying_axes_tracked():
    return
  for leaf in leaves:
    axes = _mapped_axes.varying_axes(leaf)
    if axes is not None and not set(axis_names) <= axes:
      raise ValueError(
          f"grouped_amp(): {what} does not vary over batch_axis_name={axis_names!r}: under "
          "shard_map with check_vma=True the gradient with respect to replicated parameters "
          "is summed over the devices, so each device's per-group gradients became sums over "
          "all devices. Take them with respect to device-varying parameters, "
          f"jax.lax.pcast(params, {axis_names!r}, to='varying') (amp_optax's "
          "grouped_value_and_grad helpers do), or use shard_map(..., check_vma=False).")


class HelperGradFn:
  """A per-group ``grad_fn`` made by a ``grouped_value_and_grad`` helper.

  It remembers the clean per-group gradients the helper returned beside it, so
  that :func:`grouped_amp` can check, under ``batch_axis_name``, that
  ``updates`` are those gradients unchanged (see :func:`check_unchanged`).
  """

  def __init__(self, fn: GradFn, clean_grads: Any):
    self.fn = fn
    self.clean_ids = frozenset(map(id, jax.tree.leaves(clean_grads)))
    self._keep = jax.tree.leaves(clean_grads)  # keeps the ids above from being reused

  def __call__(self, stacked_params: Any, inner_step: Any) -> Any:
    return self.fn(stacked_params, inner_step)


def check_unchanged(leaves: list[Any], grad_fn: Any, axis_names: tuple[str, ...] | None) -> None:
  """Under ``batch_axis_name``, ``updates`` must be the helper's per-group gradients as returned.

  The data-parallel habit ``grads = jax.lax.pmean(grads, axis_name)`` before ``tx.update``
  would make each device's group ``j`` the mean of every device's group ``j``: the step would
  still run, as a different (coarser) ascent. Nothing in the values or (under ``pmap``) their
  types tells that apart, so the helper's ``grad_fn`` records which arrays it returned and
  anything else is refused.
  """
  clean_ids = getattr(grad_fn, "clean_ids", None)
  if not axis_names or clean_ids is None or {id(x) for x in leaves} == clean_ids:
    return
  raise ValueError(
      "grouped_amp(): the per-group gradients passed as `updates` are not the ones "
      "grouped_value_and_grad returned with this grad_fn (were they averaged over the devices, "
      f"jax.lax.pmean(grads, {axis_names[0]!r}), as plain data-parallel training does?). Each "
      "device's groups are its own until the end of the step: grouped_amp averages the update "
      f"over batch_axis_name={axis_names!r} itself, after the ascent. Pass `grads` to tx.update "
      "exactly as the helper returned them.")


# Collectives through which one device's value depends on the others' (by primitive name).
_MIXING_COLLECTIVES = frozenset({
    "psum", "pmax", "pmin", "ppermute", "pshuffle", "all_gather", "all_to_all",
    "ragged_all_to_all", "reduce_scatter", "psum_scatter", "psum_invariant",
    "all_gather_invariant"})


def _named_axes(value: Any) -> set[str]:
  values = value if isinstance(value, (tuple, list)) else (value,)
  return {a for a in values if isinstance(a, str)}


def _sub_jaxprs(eqn: Any) -> list[Any]:
  subs = []
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr's Jaxpr, or a Jaxpr
      if hasattr(inner, "eqns") and hasattr(inner, "outvars"):
        subs.append(inner)
  return subs


def _collective_axes(jaxpr: Any, used_only: bool) -> set[str]:
  """Named axes of the mixing collectives ``jaxpr``'s outputs depend on.

  ``used_only`` follows the top level's data dependencies backwards from the outputs (a
  ``lax.pmean`` of a metric in a loss's aux, which ``grad_fn`` drops, is not counted); inside
  a nested jaxpr every equation counts.
  """
  needed = {v for v in jaxpr.outvars if not hasattr(v, "val")}  # Literals have .val
  found: set[str] = set()
  for eqn in reversed(jaxpr.eqns):
    if used_only and not any(v in needed for v in eqn.outvars):
      continue
    needed |= {v for v in eqn.invars if not hasattr(v, "val")}
    if eqn.primitive.name in _MIXING_COLLECTIVES:
      found |= _named_axes(eqn.params.get("axes", ())) | _named_axes(
          eqn.params.get("axis_name", ()))
    for sub in _sub_jaxprs(eqn):
      found |= _collective_axes(sub, used_only=False)
  return found


def check_passes_stay_local(grad_fn: GradFn | None, probe: Any, axis_names: tuple[str, ...] | None,
                            ) -> None:
  """The per-group passes must not reduce over ``batch_axis_name`` (e.g. BatchNorm synced there).

  A group's loss that averages statistics over the devices (Flax's
  ``BatchNorm(axis_name=...)``, a ``lax.pmean`` in the loss) depends on every device's
  examples: a group is no longer ``m`` examples, and the same ``num_groups`` gives different
  results on different device counts. Traced once, at trace time, from ``grad_fn``'s jaxpr
  (``probe``: stacked parameters shaped and typed like the perturbed ones).
  """
  if not axis_names or grad_fn is None:
    return
  reduced = _collective_axes(jax.make_jaxpr(grad_fn)(probe, 0).jaxpr, used_only=True)
  crossed = sorted(reduced & set(axis_names))
  if crossed:
    raise ValueError(
        f"grouped_amp(): grad_fn's per-group passes reduce over batch_axis_name {crossed[0]!r} "
        "(a collective such as jax.lax.pmean over it, e.g. from BatchNorm(axis_name="
        f"{crossed[0]!r}) or a cross-device average in the loss): each group's gradient would "
        "depend on every device's examples, so a group would not be m examples and the same "
        "num_groups would give different results on different device counts. Keep the "
        "per-group passes on their device: build the model of the grouped step with "
        "BatchNorm(axis_name=None) (each group's own statistics: ghost batch norm) and average "
        "metrics outside the loss.")


def mean_leaves(leaves: list[Any], groups: int) -> list[Any]:
  """The mean over the leading group axis (non-floating leaves: the first group's)."""
  del groups
  return [jnp.mean(x, axis=0).astype(x.dtype) if _common.inexact(x) else x[0] for x in leaves]


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


def _loop_over_groups(fn: Callable[..., Any], one_group: list[Any]) -> bool:
  """Whether per-group passes run as an unrolled loop rather than one ``jax.vmap``.

  On CPU, when one group's pass holds a convolution: under ``vmap`` the groups' convolutions
  with per-group kernels become grouped convolutions, which XLA:CPU runs slowly (a two-layer
  CNN at batch 128: 1.2-1.3x the ungrouped AMP step with G = 4 or 16, against 0.45-0.55x for
  the loop; on TinyCNN ``lax.map``, a loop body, was 2.7-5.3x, jax#12868). Without one,
  ``vmap`` is as fast or faster (an MLP 768-256-256-10 with BatchNorm: 0.91x / 0.93x the loop's
  time at G = 4 / 16).
  On GPU and TPU one vmapped pass keeps compile time flat in G. Decided at trace time, from the
  backend and a jaxpr of the first group's pass (``one_group``: its arguments), as ``unroll``
  is; ``python -m benchmarks.grouped_passes`` times the three.
  """
  return jax.default_backend() == "cpu" and _has_convolution(fn, one_group)


def _has_convolution(fn: Callable[..., Any], args: list[Any]) -> bool:
  leaves, treedef = jax.tree.flatten(args)
  arrays = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

  def on_arrays(*values: Any) -> Any:  # other leaves (Python objects) stay as they are
    new = list(leaves)
    for i, v in zip(arrays, values):
      new[i] = v
    return fn(*jax.tree.unflatten(treedef, new))

  jaxpr = jax.make_jaxpr(on_arrays)(*(leaves[i] for i in arrays)).jaxpr
  return "conv_general_dilated" in _primitives(jaxpr)


def _primitives(jaxpr: Any) -> set[str]:
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in _sub_jaxprs(eqn):
      names |= _primitives(sub)
  return names


def _take_group(arg: Any, axes: Any, j: int) -> Any:
  """Group ``j`` of ``arg``: index the leading axis where ``axes`` (a vmap in_axes prefix) is 0."""
  if axes is None:
    # Broadcast to every group: a fresh copy of its Python objects for each pass (an
    # eqx.nn.State cannot be used by two passes).
    leaves, treedef = jax.tree.flatten(arg)
    return jax.tree.unflatten(treedef, leaves)
  if isinstance(axes, int):
    return jax.tree.map(lambda x: x[j], arg)
  return jax.tree.map(lambda ax, sub: _take_group(sub, ax, j), axes, arg,
                      is_leaf=lambda x: x is None or isinstance(x, int))


def map_over_groups(fn: Callable[..., Any], in_axes: tuple[Any, ...], *args: Any) -> Any:
  """``jax.vmap(fn, in_axes)(*args)`` over the leading group axis, or the same as a loop.

  Every framework's per-group passes (clean and perturbed) go through this, so that the
  choice between one vmapped pass and ``G`` ordinary ones is made in one place.
  """
  grouped = [x for a, ax in zip(args, in_axes) if ax is not None
             for x, x_ax in _leaves_with_axes(a, ax) if x_ax == 0]
  # A group axis sharded over devices (jax.jit with explicit shardings) stays one vmapped
  # pass: each device computes its own groups, and a loop would slice across devices.
  if any(map(_sharded_on_leading_axis, grouped)) or not _loop_over_groups(
      fn, [_take_group(a, ax, 0) for a, ax in zip(args, in_axes)]):
    return jax.vmap(fn, in_axes=in_axes)(*args)
  sizes = {jnp.shape(x)[0] for x in grouped}
  if len(sizes) != 1:
    raise ValueError(f"per-group arguments with different group sizes: {sorted(sizes)}.")
  groups = sizes.pop()
  outs = [fn(*[_take_group(a, ax, j) for a, ax in zip(args, in_axes)]) for j in range(groups)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _sharded_on_leading_axis(x: Any) -> bool:
  spec: Any = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return bool(spec) and spec[0] is not None


def _leaves_with_axes(arg: Any, axes: Any) -> list[tuple[Any, Any]]:
  if axes is None or isinstance(axes, int):
    return [(x, axes) for x in jax.tree.leaves(arg)]
  pairs: list[tuple[Any, Any]] = []
  jax.tree.map(lambda ax, sub: pairs.extend(_leaves_with_axes(sub, ax)), axes, arg,
               is_leaf=lambda x: x is None or isinstance(x, int))
  return pairs


def varying_like(params: Any, grouped_args: Any) -> Any:
  """``params`` made device-varying over the mapped axes the batch varies over (check_vma).

  So that, under ``shard_map(check_vma=True)``, the per-group gradients are each device's own
  rather than sums over the devices; elsewhere ``params`` unchanged.
  """
  if not _mapped_axes.varying_axes_tracked():
    return params
  batch_axes: set[str] = set()
  for x in jax.tree.leaves(grouped_args):
    batch_axes |= _mapped_axes.varying_axes(x) or frozenset()

  def cast(p: Any) -> Any:
    missing = tuple(sorted(batch_axes - (_mapped_axes.varying_axes(p) or frozenset())))
    return jax.lax.pcast(p, missing, to="varying") if missing else p

  return jax.tree.map(cast, params)


def group_batch(batch: Any, num_groups: int) -> Any:
  """Splits every leaf ``(N, ...)`` of ``batch`` into ``(num_groups, N // num_groups, ...)``.

  Args:
    batch: a pytree of arrays sharing their leading (example) axis.
    num_groups: ``G``, which must divide ``N``.

  Returns:
    The batch with a leading group axis; group ``j`` holds examples
    ``j*m .. (j+1)*m - 1``, ``m = N // G``.
  """
  _common.check_static_int("group_batch()", "num_groups", num_groups, 1,
                           "the number G of groups", "Use 1 for the whole batch in one group.")

  def split(x):
    if not jnp.ndim(x):
      raise ValueError(
          "group_batch(): every leaf of `batch` needs a leading example axis to split; got a "
          "0-d leaf. Keep scalars out of the batch (close over them in the loss).")
    n = jnp.shape(x)[0]
    if n % num_groups:
      raise ValueError(
          f"group_batch(): a batch of {n} examples does not split into {num_groups} groups of "
          "equal size; choose num_groups dividing the batch size.")
    return jnp.reshape(x, (num_groups, n // num_groups) + jnp.shape(x)[1:])
  return jax.tree.map(split, batch)


def grouped_value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False,
) -> Callable[..., tuple[Any, Any, GradFn]]:
  """Per-group losses and gradients, and the ``grad_fn`` for :func:`grouped_amp`.

  The same contract as every framework's ``grouped_value_and_grad``
  (:mod:`amp_optax.flax_linen`, :mod:`amp_optax.flax_nnx`,
  :mod:`amp_optax.equinox`): ``grouped_value_and_grad(loss_fn, has_aux=...)``
  returns a function of ``(params, *grouped_args)`` whose result is ``(out,
  grads, amp_grad_fn)``.

  Args:
    loss_fn: ``loss_fn(params, *args)`` (with ``has_aux``, returning ``(loss,
      aux)``), the mean loss over the examples of ``args``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A function of ``(params, *grouped_args)``, every argument after
    ``params`` with a leading group axis (:func:`group_batch`), returning
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
    >>> tx = optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1))
    >>> losses, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
    ...     params, amp_optax.group_batch(batch, 4))
    >>> updates, opt_state = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
    >>> losses.shape, updates["w"].shape
    ((4,), (3,))
  """
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
  grad = jax.grad(loss_fn, has_aux=has_aux)

  def value_grads_and_grad_fn(params: Any, *grouped_args: Any) -> tuple[Any, Any, GradFn]:
    num_groups_of(grouped_args, "grouped_value_and_grad")
    params = varying_like(params, grouped_args)
    out, grads = map_over_groups(
        value_and_grad, (None,) + (0,) * len(grouped_args), params, *grouped_args)

    def amp_grad_fn(stacked_params: Any, inner_step: Any) -> Any:
      del inner_step
      grads = map_over_groups(grad, (0,) * (1 + len(grouped_args)), stacked_params,
                              *grouped_args)
      return grads[0] if has_aux else grads

    return out, grads, HelperGradFn(amp_grad_fn, grads)

  return value_grads_and_grad_fn


def grouped_amp(
    epsilon: ScalarOrSchedule,
    *,
    num_groups: int,
    inner_lr: ScalarOrSchedule = 1.0,
    inner_steps: int = 1,
    norm: str = "per_tensor",
    relative: bool = False,
    mask: MaskOrFn = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    unroll: int | bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Grouped AMP (m-sharpness): one Delta per group of ``m`` examples, from stacked inputs.

  The batch is split into ``G = num_groups`` groups (:func:`group_batch`).
  Each group ascends from its own clean gradient with its own Delta_j (``K``
  steps of :func:`amp`'s projected ascent, onto the same ball), and the
  update is the mean over groups of each group's gradient at
  :math:`\theta + \Delta_j`. ``G = 1`` is :func:`amp`'s step exactly.

  The contract differs from :func:`amp` in what ``update`` takes:
  ``updates`` holds the groups' clean gradients stacked on a leading axis of
  size ``G``, and ``grad_fn(stacked_params, inner_step)`` gets the
  parameters stacked likewise (group ``j``'s at :math:`\theta + \Delta_j`)
  and returns gradients stacked likewise. Every framework's
  ``grouped_value_and_grad`` computes both (:func:`grouped_value_and_grad`
  for plain JAX). What ``update`` returns is a plain gradient, the mean over
  groups, for the rest of the chain.

  Devices: ``num_groups`` counts the groups over all devices, so the same
  ``G`` gives the same ``m`` and the same result on any number of devices.
  Under :func:`jax.jit` the group axis may be sharded like the batch; the
  ascent then runs without communication and only the final mean crosses
  devices (ERM's all-reduce). Under ``shard_map``/``pmap`` pass
  ``batch_axis_name``: each of the ``n`` devices then holds ``G / n`` groups
  of its own batch (``group_batch(local_batch, G // n)``; a mismatch is an
  error), and the mean is averaged over the axis. Under ``shard_map`` with
  ``check_vma=True`` per-group gradients taken w.r.t. replicated parameters
  come out summed over the devices: an error (the ``grouped_value_and_grad``
  helpers take them w.r.t. device-varying parameters).

  Args:
    epsilon: the ball's radius, as in :func:`amp`.
    num_groups: ``G``, the size of the leading group axis of ``updates`` and
      of ``grad_fn``'s input and output (a Python int >= 1).
    inner_lr: as in :func:`amp`.
    inner_steps: as in :func:`amp`.
    norm: as in :func:`amp`; each group's Delta is projected separately.
    relative: as in :func:`amp`.
    mask: as in :func:`amp`.
    batch_axis_name: under ``shard_map``/``pmap``, the axis (or axes) the
      groups are spread over: each device holds ``num_groups / n`` of them,
      and the mean over groups is averaged over the axis.
    unroll: as in :func:`amp`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AmpState` (``delta_norm`` and ``clean_grad_norm`` are means over
    groups). Memory: ``G`` gradients and (``K > 1``) ``G`` Deltas, divided
    among the devices the group axis is sharded over.

  References:
    Foret, Kleiner, Mobahi and Neyshabur, `Sharpness-Aware Minimization for
    Efficiently Improving Generalization <https://arxiv.org/abs/2010.01412>`_,
    ICLR 2021 (m-sharpness).
  """
  num_steps = _common.check_ascent_args(
      WHERE, epsilon=epsilon, inner_lr=inner_lr, inner_steps=inner_steps, norm=norm,
      relative=relative, mask=mask)
  groups = _common.check_static_int(
      WHERE, "num_groups", num_groups, 1, "the number G of groups, each with its own Delta",
      "Use amp() for one Delta shared by the whole batch.")
  unroll = _common.check_unroll(WHERE, unroll)
  axis_names = _mapped_axes.normalise(batch_axis_name, WHERE)

  def init_fn(params: optax.Params) -> _amp.AmpState:
    _amp.warn_if_low_precision(WHERE, params, _common.chosen_leaves(WHERE, mask, params))
    return _amp.init_state()

  def update_fn(
      updates: optax.Updates,
      state: _amp.AmpState,
      params: optax.Params | None = None,
      *args: Any,
      grad_fn: GradFn | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, _amp.AmpState]:
    if extra_args.get("ascend") is not None:
      raise TypeError(f"{WHERE}: `ascend` is an argument of amp()'s update only.")
    _call_checks.check_first_in_chain(WHERE)
    count = optax.safe_increment(state.count)
    if num_steps == 0:  # the mean over groups: the gradient of the whole batch.
      return mean_over_groups(updates, groups, axis_names), state._replace(count=count)
    _call_checks.check_update_call(WHERE, args, params, grad_fn, True)
    _amp.check_same_structure(WHERE, "updates", updates, params,
                              "Pass the per-group gradients w.r.t. exactly these params.")
    eps = _common.value_at(epsilon, state.count)
    lr = _common.value_at(inner_lr, state.count)
    param_leaves, flat_def = jax.tree.flatten(params)
    treedef: Any = flat_def  # jaxlib ships no stubs for PyTreeDef
    first = [jnp.asarray(u) for u in treedef.flatten_up_to(updates)]
    if axis_names:
      _mapped_axes.check_bound(axis_names, WHERE)
    # Per-group gradients vary between devices when the groups are spread over them; only
    # their mean, at the end, must be global.
    local, devices = groups_per_device(groups, axis_names)
    check_stacked("the gradient passed as `updates`", first, params, local, devices)
    check_varying("the gradient passed as `updates`", first, axis_names)
    check_unchanged(treedef.flatten_up_to(updates), grad_fn, axis_names)
    check_passes_stay_local(grad_fn, jax.tree.unflatten(treedef, [
        g.astype(p.dtype) for g, p in zip(first, param_leaves)]), axis_names)
    chosen = _common.chosen_leaves(WHERE, mask, params)
    # A scalar: no gradient crosses devices for a diagnostic.
    clean_grad_norm = mean_group_norm(first, _amp.inexact_norm)

    def grads_at(perturbed_leaves, inner_step):
      assert grad_fn is not None
      grad_leaves = _amp.call_grad_fn(WHERE, grad_fn, treedef, perturbed_leaves, inner_step,
                                      params)
      check_stacked("grad_fn's output", grad_leaves, params, local, devices)
      check_varying("grad_fn's output", grad_leaves, axis_names)
      return grad_leaves

    ball = _ascent.make_ball([param_leaves[i] for i in chosen], eps, norm, relative)
    grad_leaves, delta_norms = _ascent.ascend(
        param_leaves, first, grads_at, chosen=chosen, ball=ball, inner_lr=lr,
        num_steps=num_steps, unroll=_amp.resolve_unroll(unroll), groups=local)
    grad_leaves = mean_leaves(grad_leaves, local)
    delta_norm = jnp.mean(delta_norms)
    if axis_names:  # groups spread over devices: the mean over all of them (diagnostics in the
      # same all-reduce, so that every device's state is the same and no op is added)
      grad_leaves, delta_norm, clean_grad_norm = jax.lax.pmean(
          (grad_leaves, delta_norm, clean_grad_norm), axis_name=axis_names)
    _mapped_axes.check_averaged("the mean over groups", grad_leaves, param_leaves, axis_names,
                                WHERE)
    grad_leaves = _common.nan_if_negative(grad_leaves, eps, lr)
    new_state = _amp.AmpState(
        count=count, delta_norm=delta_norm, clean_grad_norm=clean_grad_norm,
        perturbed_grad_norm=_amp.inexact_norm(grad_leaves))
    return jax.tree.unflatten(treedef, grad_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
