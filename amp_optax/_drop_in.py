"""AMP for train steps that cannot change: the optimiser moves the parameters itself.

:func:`drop_in_amp` wraps a base optimiser. The user's step is the plain one
(gradient at the current parameters, ``tx.update``, ``apply_updates``); the
updates it returns move the parameters to the perturbed points and back, so
that the step's gradient is the one AMP needs. Two ascents:

* ``ascent="gradient"``: exact AMP over ``K + 1`` calls (``K`` ascent calls
  that move the parameters to ``theta + Delta_1 ... Delta_K``, then one
  descent call that moves them to ``theta + base_update(g_K)``);
* ``ascent="momentum"``: one call per step: the parameters are kept at
  ``theta + Delta`` with ``Delta`` from a running average of past gradients
  (after Momentum-SAM), so AMP costs ERM's one gradient.
"""

from typing import Any
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import optax

from amp_optax import _ascent
from amp_optax import _call_checks
from amp_optax import _common
from amp_optax import _projection

ASCENTS = ("gradient", "momentum")


class DropInAmpState(NamedTuple):
  """State of :func:`drop_in_amp`.

  Attributes:
    count: descent steps done (calls of the base optimiser).
    phase: with ``ascent="gradient"``, the calls made in the current AMP step,
      ``0 .. K`` (0: the parameters are at theta; ``k``: at theta + Delta_k);
      with ``ascent="momentum"``, 0 before the first call and 1 after it (the
      parameters are held at theta + Delta).
    theta: the unperturbed parameters of the current step (at phase 0 of the
      gradient ascent, the parameters themselves are theta).
    delta: the perturbation Delta_k (``K > 1`` only), in at least float32;
      else ``()``.
    momentum: the running average of gradients (``ascent="momentum"``), in
      at least float32; else ``()``.
    delta_norm: global L2 norm of the perturbation the last call moved to, as
      the parameters hold it (after rounding to their dtype).
    inner_state: the base optimiser's state.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  phase: jax.Array
  theta: Any
  delta: Any
  momentum: Any
  delta_norm: jax.Array
  inner_state: Any


def drop_in_amp(
    optimizer: optax.GradientTransformation,
    epsilon: Any,
    *,
    inner_lr: Any = 1.0,
    inner_steps: int = 1,
    norm: str = "per_tensor",
    relative: bool = False,
    mask: Any = None,
    ascent: str = "gradient",
    momentum: float = 0.9,
) -> optax.GradientTransformationExtraArgs:
  r"""AMP for a train step that is not changed at all (no ``grad_fn``).

  Replace the optimiser, keep the step::

    tx = amp_optax.drop_in_amp(optax.sgd(0.1, momentum=0.9), epsilon=0.05)
    # the step, unchanged:
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

  With ``ascent="gradient"`` one AMP step takes ``K + 1`` calls: the first
  ``K`` return updates that move the parameters to :math:`\theta +
  \Delta_1, \dots, \theta + \Delta_K`, each :math:`\Delta_{k+1} =
  \Pi_\epsilon(\Delta_k + \eta\, g_k)` from the gradient the step just
  computed (as :func:`amp`), and the last moves them to :math:`\theta +
  u`, ``u`` the base optimiser's update for :math:`g_K`. Fed the same batch
  ``K + 1`` times this is :func:`amp`'s step exactly; fed successive batches
  (the usual loop) each gradient is on a new batch, the variant that
  ``optax.contrib.sam``'s default mode computes. A run of ``N`` AMP steps
  takes ``N (K + 1)`` calls; the base optimiser's state, step count and
  schedules advance on the descent calls only (``state.count``).

  With ``ascent="momentum"`` every call is a descent step and costs one
  gradient: the parameters stay at :math:`\tilde\theta = \theta + \Delta`,
  the step's gradient is taken there, the base optimiser steps
  :math:`\theta`, and the next :math:`\Delta = \Pi_\epsilon(-\eta\, m)` with
  :math:`m` a running average of the gradients (``momentum`` its decay): the
  perturbation points along the direction training moves, as in
  Momentum-SAM, whose sign we keep.

  Evaluate and checkpoint :func:`unperturbed_params`, not the parameters
  the step holds between calls. Everything the step does besides the
  gradient follows it on every call: BatchNorm statistics are updated by
  the passes at the perturbed points too (the authors' policy), and each call
  draws its own dropout masks.

  Args:
    optimizer: the base optimiser (any Optax transformation).
    epsilon: the ball's radius, a float >= 0 or a schedule of the descent
      step count.
    inner_lr: the ascent's step size, a float >= 0 or a schedule.
    inner_steps: ``K`` (``ascent="gradient"``), a Python int >= 0; 0 gives the
      base optimiser unchanged. Must be 1 with ``ascent="momentum"``.
    norm: ``"per_tensor"`` or ``"global"``, as in :func:`amp`.
    relative: as in :func:`amp`.
    mask: which parameters to perturb, as in :func:`amp`.
    ascent: ``"gradient"`` or ``"momentum"``.
    momentum: the decay of the running average of gradients
      (``ascent="momentum"``).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`DropInAmpState`. Extra keyword arguments (``grad_fn`` included)
    are passed to the base optimiser on descent calls.

  References:
    Zheng, Zhang and Mao, `Regularizing Neural Networks via Adversarial Model
    Perturbation <https://arxiv.org/abs/2010.04925>`_, CVPR 2021.

    Becker, Altrock and Risse, `Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
  """
  where = "drop_in_amp()"
  num_steps = _common.check_ascent_args(
      where, epsilon=epsilon, inner_lr=inner_lr, inner_steps=inner_steps, norm=norm,
      relative=relative, mask=mask)
  if ascent not in ASCENTS:
    raise ValueError(f"drop_in_amp(): `ascent` must be one of {ASCENTS}, got {ascent!r}.")
  if ascent == "momentum" and inner_steps != 1:
    raise ValueError("drop_in_amp(): ascent='momentum' takes one gradient per step; leave "
                     f"inner_steps=1 (got {inner_steps}).")
  try:
    in_range = 0.0 <= float(momentum) < 1.0
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    in_range = True  # traced (optax.inject_hyperparams): used as a value in the step.
  if not in_range:
    raise ValueError(f"drop_in_amp(): `momentum` must be in [0, 1), got {momentum}.")
  optimizer = optax.with_extra_args_support(optimizer)

  def chosen_of(params):
    return _common.chosen_leaves(where, mask, params)

  def init_fn(params):
    if ascent == "gradient" and num_steps:
      warn_step_accounting(num_steps)
    leaves = jax.tree.leaves(params)
    chosen = chosen_of(params)
    delta = tuple(_ascent.zeros([leaves[i] for i in chosen])) if (
        num_steps > 1 or ascent == "momentum") else ()
    avg = tuple(_ascent.zeros([leaves[i] for i in chosen])) if ascent == "momentum" else ()
    return DropInAmpState(
        count=jnp.zeros((), jnp.int32), phase=jnp.zeros((), jnp.int32),
        theta=jax.tree.map(jnp.array, params), delta=delta, momentum=avg,
        delta_norm=jnp.zeros((), jnp.float32), inner_state=optimizer.init(params))

  def moved_to(target_leaves, param_leaves, treedef):
    """The updates that take the parameters to ``target``."""
    return jax.tree.unflatten(treedef, [
        (t - p).astype(p.dtype) for t, p in zip(target_leaves, param_leaves)])

  def update_fn(updates, state, params=None, **extra_args):
    _call_checks.check_last_in_chain(where)
    if params is None:
      raise ValueError("drop_in_amp(): update() needs `params`: tx.update(grads, opt_state, "
                       "params).")
    if num_steps == 0:
      base_updates, inner = optimizer.update(updates, state.inner_state, params, **extra_args)
      return base_updates, state._replace(count=optax.safe_increment(state.count),
                                          inner_state=inner)
    param_leaves, flat_def = jax.tree.flatten(params)
    treedef: Any = flat_def  # jaxlib ships no stubs for PyTreeDef
    grad_leaves = treedef.flatten_up_to(updates)
    _call_checks.check_leaves_match(
        where, "the gradient passed as `updates`", grad_leaves, params,
        "Pass the gradient of the loss w.r.t. exactly these params.")
    chosen = chosen_of(params)
    eps = _common.value_at(epsilon, state.count)
    lr = _common.value_at(inner_lr, state.count)
    theta_leaves = treedef.flatten_up_to(state.theta)
    # The parameters must be where the last call moved them (theta + Delta): a run resumed from
    # the unperturbed parameters (or from any others) holds them elsewhere, and this call's
    # gradient was taken there. The distance from theta is compared with the one the last call
    # applied; a mismatch restarts the AMP step from the parameters as they are.
    held = _applied_norm(param_leaves, theta_leaves, chosen)
    displaced = jnp.logical_and(
        state.phase > 0,
        jnp.abs(held - state.delta_norm) > 1e-2 * state.delta_norm + 1e-12)
    finite = _common.all_finite(grad_leaves)

    def descend(theta):
      """The base optimiser's step from theta with this call's gradient."""
      base_updates, inner = optimizer.update(updates, state.inner_state, theta, **extra_args)
      return optax.apply_updates(theta, base_updates), inner

    if ascent == "momentum":
      def momentum_call():
        new_theta, inner = descend(state.theta)
        new_theta_leaves = treedef.flatten_up_to(new_theta)
        # A non-finite gradient reaches the base optimiser (optax.apply_if_finite skips it)
        # but never the running average, which would keep it for good.
        avg = [jnp.where(finite, momentum * m + (1.0 - momentum) * grad_leaves[i].astype(m.dtype),
                         m) for m, i in zip(state.momentum, chosen)]
        ball = _ascent.make_ball([new_theta_leaves[i] for i in chosen], eps, norm, relative)
        delta = _ascent.project(ball, [-lr * m for m in avg])
        target = _ascent.perturb(new_theta_leaves, delta, chosen)
        return (moved_to(target, param_leaves, treedef), state._replace(
            count=optax.safe_increment(state.count), phase=jnp.ones((), jnp.int32),
            theta=new_theta, delta=tuple(delta), momentum=tuple(avg),
            delta_norm=_applied_norm(target, new_theta_leaves, chosen), inner_state=inner))

      def back_to_perturbed():
        # This call's gradient is not at theta + Delta: no descent, the parameters go back.
        target = _ascent.perturb(theta_leaves, list(state.delta), chosen)
        return moved_to(target, param_leaves, treedef), state

      new_updates, new_state = jax.lax.cond(displaced, back_to_perturbed, momentum_call)
      return _nan_if_negative(new_updates, eps, lr), new_state

    def first_call():
      # The parameters are theta; Delta_1 from the clean gradient.
      ball = _ascent.make_ball([param_leaves[i] for i in chosen], eps, norm, relative)
      delta = _ascent.step(ball, lr, _ascent.zeros([param_leaves[i] for i in chosen]),
                           [grad_leaves[i] for i in chosen])
      target = _ascent.perturb(param_leaves, delta, chosen)
      theta = jax.tree.map(jnp.array, params)
      kept = tuple(delta) if num_steps > 1 else ()
      return (moved_to(target, param_leaves, treedef),
              state._replace(phase=jnp.ones((), jnp.int32), theta=theta, delta=kept,
                             delta_norm=_applied_norm(target, param_leaves, chosen)))

    def middle_call():
      ball = _ascent.make_ball([theta_leaves[i] for i in chosen], eps, norm, relative)
      delta = _ascent.step(ball, lr, list(state.delta), [grad_leaves[i] for i in chosen])
      target = _ascent.perturb(theta_leaves, delta, chosen)
      return (moved_to(target, param_leaves, treedef),
              state._replace(phase=state.phase + 1, delta=tuple(delta),
                             delta_norm=_applied_norm(target, theta_leaves, chosen)))

    def descent_call():
      # From theta; at phase 0 (a non-finite clean gradient) the parameters themselves are theta.
      at_theta = state.phase == 0
      theta = jax.tree.map(lambda p, t: jnp.where(at_theta, p, t), params, state.theta)
      new_theta, inner = descend(theta)
      kept = tuple(jnp.zeros_like(d) for d in state.delta)
      return (moved_to(treedef.flatten_up_to(new_theta), param_leaves, treedef),
              state._replace(count=optax.safe_increment(state.count),
                             phase=jnp.zeros((), jnp.int32), theta=new_theta, delta=kept,
                             delta_norm=jnp.zeros((), jnp.float32), inner_state=inner))

    branches = [first_call, middle_call, descent_call] if num_steps > 1 else [
        first_call, descent_call]
    last = len(branches) - 1
    index = jnp.where(state.phase == 0, 0, jnp.where(state.phase == num_steps, last, 1))
    # A non-finite gradient goes to the base optimiser at once, as it would without AMP (so
    # optax.apply_if_finite around the base sees and skips it, and the parameters return to
    # theta); never into Delta.
    index = jnp.where(finite, index, last)
    index = jnp.where(displaced, 0, index)
    new_updates, new_state = jax.lax.switch(index, branches)
    return _nan_if_negative(new_updates, eps, lr), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def warn_step_accounting(num_steps: int) -> None:
  """Says, at init, that an AMP step takes ``K + 1`` calls: an unchanged loop trains less.

  Nothing in a loop's calls tells a switched-to ``drop_in_amp`` from a planned one, and a loop
  kept as it was makes ``N / (K + 1)`` descent steps from ``N`` calls.
  """
  calls = num_steps + 1
  warnings.warn(
      f"drop_in_amp(): one AMP step takes inner_steps + 1 = {calls} calls of update, each with "
      f"a gradient; the base optimiser, its step count and schedules advance once every {calls} "
      f"calls, so a loop of N calls makes N // {calls} steps. To train as long as the same "
      f"loop with the base optimiser, give it {calls}x the calls (or pass a grad_fn to "
      "amp_optax.amp, one call per step). Silence this with warnings.filterwarnings('ignore', "
      "'.*one AMP step takes').", stacklevel=3)


def _applied_norm(target_leaves: list[Any], theta_leaves: list[Any],
                  chosen: list[int]) -> jax.Array:
  """The norm of the perturbation as the parameters hold it (``target - theta`` in their dtype).

  In bfloat16 or float16 much of a small Delta rounds away when it is added to theta; this is
  what the loss actually sees, and what ``delta_norm`` reports.
  """
  wide = [_projection.accumulation_dtype(theta_leaves[i].dtype) for i in chosen]
  diffs = [target_leaves[i].astype(w) - theta_leaves[i].astype(w) for i, w in zip(chosen, wide)]
  return _projection.global_l2_norm(diffs).astype(jnp.float32)


def _nan_if_negative(updates: Any, eps: Any, lr: Any) -> Any:
  """NaN updates for a negative traced epsilon or inner_lr, as :func:`amp` gives."""
  leaves, treedef = jax.tree.flatten(updates)
  return jax.tree.unflatten(treedef, _common.nan_if_negative(leaves, eps, lr))


def unperturbed_params(params: optax.Params, opt_state: Any) -> optax.Params:
  """The parameters theta without the perturbation, for evaluation and checkpoints.

  Args:
    params: the parameters the train step holds now (possibly perturbed).
    opt_state: the optimiser state, a :class:`DropInAmpState` or any Optax
      state that contains one.

  Returns:
    theta: ``params`` where the step holds them unperturbed (phase 0 of the
    gradient ascent), else the unperturbed parameters kept in the state.
  """
  state = _common.find_state(opt_state, DropInAmpState, "unperturbed_params()",
                             "amp_optax.drop_in_amp (a DropInAmpState)")
  at_theta = state.phase == 0  # the parameters are theta (before any perturbation)
  # Leaf by leaf, in the structure of ``params``: the state may hold theta in another container
  # type (an NNX optimiser keeps its state's variables as OptVariable, the model's as Param).
  param_leaves, treedef = jax.tree.flatten(params)
  theta_leaves = jax.tree.leaves(state.theta)
  if len(theta_leaves) != len(param_leaves):
    raise ValueError(
        f"unperturbed_params(): params has {len(param_leaves)} arrays but the drop_in_amp state "
        f"holds {len(theta_leaves)}: pass the parameters the optimiser was built for (with NNX, "
        "nnx.state(model, nnx.Param)).")
  return jax.tree.unflatten(treedef, [jnp.where(at_theta, p, t)
                                      for p, t in zip(param_leaves, theta_leaves)])
