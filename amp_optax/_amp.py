"""Adversarial Model Perturbation (AMP) as an Optax gradient transformation."""

from collections.abc import Callable
import functools
import numbers
from typing import Any
from typing import NamedTuple
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amp_optax import _call_checks
from amp_optax import _projection

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
MaskOrFn = Union[Any, Callable[[optax.Params], Any], None]
GradFn = Callable[[optax.Params, Any], optax.Updates]

NORMS = ("per_tensor", "global")
RADII = ("absolute", "relative")
BETWEEN_ASCENTS = ("clean", "reuse")

class AmpState(NamedTuple):
  """State of :func:`amp`: a step count and diagnostics of the last step.

  Attributes:
    count: number of updates done so far; schedules of ``epsilon`` and
      ``inner_lr`` are evaluated at it.
    delta_norm: global L2 norm of the final perturbation Delta_K.
    clean_grad_norm: global L2 norm of the incoming (clean) gradient.
    perturbed_grad_norm: global L2 norm of the returned gradient at
      ``params + Delta_K``.

    correction: with ``between_ascents="reuse"``, the difference between the
      adversarial and the clean gradient at the last ascent step, one array
      per floating parameter leaf; otherwise ``()``.

  With ``inner_steps=0`` only ``count`` advances; the diagnostics stay 0. On
  steps without an ascent (``ascent_every > 1``) ``delta_norm`` is 0.
  """

  count: jax.Array
  delta_norm: jax.Array
  clean_grad_norm: jax.Array
  perturbed_grad_norm: jax.Array
  correction: Any = ()


def _check_non_negative(name: str, value: Any) -> None:
  """Rejects a negative concrete scalar; schedules and tracers pass through."""
  if callable(value):
    return
  if isinstance(value, (str, bytes, bool, np.bool_)) or (
      hasattr(value, "dtype") and not jnp.issubdtype(value.dtype, jnp.number)):
    raise TypeError(
        f"amp(): `{name}` must be a non-negative float or an optax schedule "
        f"(a function of the step count); got {value!r}.")
  try:
    number = float(np.asarray(value))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced, e.g. a hyper-parameter injected by optax.inject_hyperparams.
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"amp(): `{name}` must be a non-negative float or an optax schedule "
        f"(a function of the step count); got {value!r}."
    ) from e
  if not number >= 0:  # also rejects NaN
    raise ValueError(
        f"amp(): `{name}` must be >= 0, got {number}. AMP ascends the loss, so "
        f"`{name}` is a size, not a signed step."
    )


def _check_static_int(name: str, value: Any, minimum: int, meaning: str, hint: str) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    static = ""
    if isinstance(value, (jax.Array, np.ndarray)):
      static = (" Under optax.inject_hyperparams, mark it static: "
                f"inject_hyperparams(amp, static_args=('inner_steps', '{name}')).")
    raise TypeError(
        f"amp(): `{name}` must be a Python int >= {minimum} ({meaning}, fixed at trace "
        f"time); got {value!r}." + static)
  if value < minimum:
    raise ValueError(f"amp(): `{name}` must be >= {minimum}, got {value}. {hint}")
  return int(value)


def _check_inner_steps(inner_steps: Any) -> int:
  return _check_static_int(
      "inner_steps", inner_steps, 0, "the number K of ascent steps",
      "Use 0 to switch AMP off (the base optimiser's update, unchanged).")


def _check_choice(name: str, value: Any, choices: tuple[str, ...], meaning: str) -> None:
  if value not in choices:
    raise ValueError(f"amp(): `{name}` must be one of {choices}, got {value!r}. {meaning}")


def _value_at(value: ScalarOrSchedule, count: jax.Array) -> Any:
  return value(count) if callable(value) else value


def _raise_if_negative(name: str, value: Any) -> None:
  if not np.asarray(value) >= 0:  # also NaN
    raise ValueError(
        f"amp(): `{name}` evaluated to {np.asarray(value)} at this step; it must be >= 0 "
        "(a negative radius or step turns the ascent into descent). Check the schedule or "
        "the value set through optax.inject_hyperparams.")


def _checked_at_runtime(name: str, value: Any) -> Any:
  """``value``, checked >= 0 now if concrete, else when the compiled step runs.

  A schedule's value or an injected hyper-parameter is traced, so a negative
  one can only be caught on the device; a host callback raises it there.
  """
  try:
    _raise_if_negative(name, value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    jax.debug.callback(functools.partial(_raise_if_negative, name), value)
  return value


def _resolve_unroll(unroll: int | bool | None) -> int | bool:
  """``unroll=None`` means: unroll on CPU, one loop body elsewhere.

  XLA:CPU runs convolutions inside a loop body many times slower than outside
  one (jax#12868), while on GPU and TPU a loop keeps compile time flat in K at
  little cost. Decided at trace time from the backend jit compiles for.
  """
  if unroll is not None:
    return unroll
  return True if jax.default_backend() == "cpu" else 1


def _perturbable(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _inexact_norm(leaves: list[Any]) -> jax.Array:
  norm = _projection.global_l2_norm([x for x in leaves if _perturbable(x)])
  return norm.astype(jnp.float32)


def _mask_leaves(mask: MaskOrFn, params: Any) -> list[bool]:
  """Resolves ``mask`` to one Python bool per leaf of ``params``."""
  leaves, treedef = jax.tree.flatten(params)
  if mask is None:
    return [True] * len(leaves)
  if callable(mask):
    mask = mask(params)
  try:
    # A mask leaf may stand for a whole subtree (an optax-style prefix mask).
    full = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "amp(): `mask` must have the structure of params (or a prefix of it),"
        " with a bool for each leaf. Build it from the params, e.g.\n"
        "    mask = jax.tree.map(lambda p: p.ndim > 1, params)\n"
        f"or pass a function of params.\nmask structure:   "
        f"{jax.tree.structure(mask)}\nparams structure: {treedef}") from e
  out = []
  for m in jax.tree.leaves(full):
    try:
      out.append(bool(m))
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
      raise TypeError(
          "amp(): `mask` leaves must be Python bools (or concrete bool "
          f"arrays), known at trace time; got {m!r}. Under optax.inject_hyperparams a "
          "mask (and a callable mask, which it takes for a schedule) must be static: "
          "inject_hyperparams(amp, static_args=('inner_steps', 'mask')).") from e
  if len(out) != len(leaves):
    raise ValueError(
        f"amp(): `mask` gives {len(out)} bools for {len(leaves)} params "
        "leaves; give one bool per parameter array.")
  return out


def _check_same_structure(what: str, tree: Any, params: Any, fix: str) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
        f"amp(): {what} does not have the structure of params. {fix}\n"
        f"{what}: {jax.tree.structure(tree)}\n"
        f"params: {jax.tree.structure(params)}")


def amp(
    epsilon: ScalarOrSchedule,
    inner_lr: ScalarOrSchedule = 1.0,
    inner_steps: int = 1,
    norm: str = "per_tensor",
    mask: MaskOrFn = None,
    batch_axis_name: str | None = None,
    unroll: int | bool | None = None,
    radius: str = "absolute",
    ascent_every: int | None = None,
    between_ascents: str = "clean",
) -> optax.GradientTransformationExtraArgs:
  r"""Adversarial Model Perturbation: gradient at the worst point of a ball.

  AMP minimises the AMP loss :math:`\max_{\|\Delta\| \le \epsilon}
  L(\theta + \Delta)` instead of :math:`L(\theta)`. Each update approximates
  the inner maximisation by ``K = inner_steps`` steps of projected gradient
  ascent started from :math:`\Delta = 0`,

  .. math::
    \Delta \leftarrow \Pi_\epsilon(\Delta + \eta\, g), \qquad
    g \leftarrow \nabla L(\theta + \Delta),

  where the first :math:`g` is the clean gradient passed in as ``updates`` (no
  extra pass), and replaces ``updates`` with :math:`\nabla L(\theta +
  \Delta_K)`. A step therefore costs ``1 + K`` gradient evaluations, ``K`` of
  them through ``grad_fn``.

  Put ``amp`` first in an :func:`optax.chain`: later transforms (weight
  decay, momentum, learning-rate schedules) see the unperturbed parameters
  and the adversarial gradient.

  Compositions:

  * Gradient accumulation: ``optax.MultiSteps(optax.chain(amp(...), base))``
    would ascend from the accumulated gradient but evaluate only the last
    micro-batch's ``grad_fn``, so ``amp`` raises an error there. Per
    micro-batch AMP is ``optax.chain(amp(...), optax.MultiSteps(base,
    k).gradient_transformation())``; full-batch AMP computes the clean
    gradient and ``grad_fn`` over all micro-batches (e.g. with
    ``optax.microbatching.microbatch``) in one step, or marks such a
    ``grad_fn`` with :func:`covers_accumulated_batch`.
  * :func:`optax.masked`, :func:`optax.multi_transform`: put ``amp``
    outside them and choose the perturbed parameters with ``mask``.
  * :func:`optax.apply_if_finite` around the whole chain skips steps whose
    clean gradient is not finite; only one inside, around the transforms
    after ``amp``, also sees a non-finite gradient at the perturbed point.
  * Low precision: the ascent (step, norms, projection) runs in at least
    float32 and ``Delta`` is cast to each parameter's dtype when added, so
    float16 parameters do not overflow on ``inner_lr * g``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> def loss_fn(params, x):
    ...   return jnp.sum((params["w"] * x - 1.0) ** 2)
    >>> params = {"w": jnp.array([2.0, 1.0])}
    >>> x = jnp.array([1.0, 0.5])
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.5), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x)
    >>> updates, opt_state = tx.update(
    ...     grads, opt_state, params,
    ...     grad_fn=jax.grad(lambda p, _: loss_fn(p, x)))
    >>> params = optax.apply_updates(params, updates)
    >>> amp_state = opt_state[0]  # AmpState: amp is first in the chain
    >>> print(int(amp_state.count), round(float(amp_state.delta_norm), 3))
    1 0.5

  Args:
    epsilon: radius of the perturbation ball, a float >= 0 or an optax
      schedule of the step count. With ``norm="per_tensor"`` the authors'
      CIFAR value is 0.5.
    inner_lr: step size of the inner ascent, a float >= 0 or a schedule.
    inner_steps: number ``K`` of ascent steps, a Python int >= 0. ``K = 0``
      returns ``updates`` untouched and never calls ``grad_fn``. ``K > 1``
      runs in a :func:`jax.lax.fori_loop`, unrolled or not as ``unroll``
      says. Under :func:`optax.inject_hyperparams`
      list it in ``static_args``: ``inject_hyperparams(amp,
      static_args=("inner_steps",))``.
    norm: ``"per_tensor"`` bounds the L2 norm of each parameter array's
      perturbation by ``epsilon`` (what the authors' code does, and what their
      published ``epsilon`` assumes); ``"global"`` bounds the L2 norm over all
      perturbed parameters (the paper's formula).
    mask: which parameters to perturb: a pytree of bools with the structure
      of the params (or a prefix of it), or a function of the params
      returning one. Unmasked parameters keep ``Delta = 0`` and do not count
      towards the global norm. Non-floating leaves are never perturbed. Use
      this, not :func:`optax.masked` or :func:`optax.multi_transform` around
      ``amp``: those hide the other parameters from ``grad_fn``. Under
      :func:`optax.inject_hyperparams` list ``"mask"`` in ``static_args``.
    batch_axis_name: under :func:`jax.pmap` or :func:`jax.shard_map` with
      per-device batches, the axis over which the gradients returned by
      ``grad_fn`` are averaged (:func:`jax.lax.pmean`) so that all devices
      share one ``Delta``, as on a single device. The incoming ``updates``
      are taken as already averaged. Under :func:`jax.jit` with sharded
      arrays leave it ``None``: gradients are global already. In a
      ``shard_map`` with ``check_vma=True``, gradients of replicated
      parameters come out already summed over the axis; averaging them again
      here is wrong, so either divide your loss by the axis size and leave
      this ``None``, or compute gradients of per-device losses.
    unroll: the ``unroll`` of the ``K > 1`` :func:`jax.lax.fori_loop`: an
      int >= 1 or a bool (``True`` unrolls all ``K`` steps). The default,
      ``None``, decides by :func:`jax.default_backend` when the step is
      traced: on CPU all ``K`` steps are unrolled, because XLA:CPU runs
      convolutions inside a loop body many times slower than outside one
      (jax#12868; measured 10x and more on a small CNN); on GPU and TPU one
      loop body is kept (``1``), so compile time is flat in ``K``.
    radius: ``"absolute"`` (the paper's and the authors' setting): the ball's
      radius is ``epsilon``. ``"relative"``: it is ``epsilon`` times the norm
      of the parameters it bounds (each array's ``epsilon * ||theta_i||``
      with ``norm="per_tensor"``, ``epsilon * ||theta||`` over the perturbed
      parameters with ``norm="global"``), so ``epsilon`` is a fraction that
      means the same for small and large tensors and models. A zero
      parameter array is not perturbed per tensor.
    ascent_every: ascend on every ``k``-th step only (steps 0, k, 2k, ...),
      and return the clean gradient (see ``between_ascents``) on the others,
      where ``grad_fn`` is not called: a step then costs ``1 + K / k``
      gradient evaluations on average. ``None`` (the default) means 1. A
      :func:`jax.lax.cond` chooses the branch; under :func:`jax.vmap` it
      becomes a select and both run.
    between_ascents: with ``ascent_every > 1``, what steps without an ascent
      return: ``"clean"``, the clean gradient; ``"reuse"``, the clean
      gradient plus the last ascent step's correction (its adversarial minus
      its clean gradient, kept in the state: one buffer the size of the
      parameters), after LookSAM's reuse of SAM's direction. On CPU, where
      XLA runs convolutions inside a ``lax.cond`` branch as slowly as inside
      a loop (measured: an ascent step about 10x slower), decide in Python
      instead: ``update(..., ascend=step % k == 0)`` with ``ascend`` a static
      argument of the jitted step (two compiled steps, no ``lax.cond``).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`. Its ``update`` takes
    ``(updates, state, params, *, grad_fn, **extra_args)``: ``updates`` is
    the clean gradient at ``params`` and ``grad_fn(params, inner_step)``
    returns the gradient at other parameters, with the signature of the
    ``grad_fn`` of ``optax.contrib.sam(..., opaque_mode=True)``.
    ``inner_step`` counts ascent steps from 0: a Python int when ``K == 1``,
    a traced int32 inside the loop when ``K > 1``. An optional
    ``ascend=True/False`` (a Python bool) makes this step an ascent step or
    not, overriding ``ascent_every`` (``grad_fn`` may be omitted with
    ``ascend=False``). Other keyword arguments are accepted and ignored.

  References:
    Zheng, Zhang and Mao, `Regularizing Neural Networks via Adversarial Model
    Perturbation <https://arxiv.org/abs/2010.04925>`_, CVPR 2021.
  """
  _check_non_negative("epsilon", epsilon)
  _check_non_negative("inner_lr", inner_lr)
  num_steps = _check_inner_steps(inner_steps)
  _check_choice("norm", norm, NORMS,
                "'per_tensor' bounds each parameter array (the authors' code); "
                "'global' bounds all parameters together (the paper's formula).")
  _check_choice("radius", radius, RADII,
                "'absolute': the ball's radius is epsilon; 'relative': epsilon times the norm "
                "of the parameters it bounds.")
  _check_choice("between_ascents", between_ascents, BETWEEN_ASCENTS,
                "'clean' returns the clean gradient on steps without an ascent; 'reuse' adds "
                "the last ascent's correction to it.")
  # None (not 1) by default, so that optax.inject_hyperparams leaves it static.
  every = 1 if ascent_every is None else _check_static_int(
      "ascent_every", ascent_every, 1, "ascend on every k-th step",
      "Use 1 to ascend on every step, inner_steps=0 never to.")
  reuse = between_ascents == "reuse"
  if reuse and every == 1:
    raise ValueError(
        "amp(): between_ascents='reuse' needs ascent_every > 1 (with ascent_every=1 every "
        "step ascends and there is nothing to reuse).")
  if isinstance(unroll, (bool, np.bool_)):
    unroll = bool(unroll)
  elif isinstance(unroll, (jax.Array, np.ndarray)):
    raise TypeError(
        f"amp(): `unroll` must be a Python bool or int, fixed at trace time; got {unroll!r}. "
        "Under optax.inject_hyperparams mark it static: inject_hyperparams(amp, "
        "static_args=('inner_steps', 'unroll')).")
  elif unroll is not None and (not isinstance(unroll, numbers.Integral) or unroll < 1):
    raise ValueError(
        f"amp(): `unroll` must be None, a bool or an int >= 1, got {unroll!r}. Use unroll=True "
        "to unroll the K inner steps (faster on CPU), 1 to keep one loop body.")
  if isinstance(mask, (bool, np.bool_, jax.Array, np.ndarray)):
    raise TypeError(
        f"amp(): `mask` must be a pytree of bools shaped like the params, or a function of "
        f"the params returning one; got the single value {mask!r}. (Under "
        "optax.inject_hyperparams a callable mask is taken for a schedule and called with the "
        "step count: list it in static_args, inject_hyperparams(amp, static_args=("
        "'inner_steps', 'mask')).) To switch AMP off use inner_steps=0.")
  if mask is not None and not callable(mask):
    jax.tree.leaves(mask)  # a malformed mask fails here, not mid-training.
  project = (_projection.project_per_tensor if norm == "per_tensor"
             else _projection.project_global)

  def init_fn(params: optax.Params) -> AmpState:
    _mask_leaves(mask, params)  # structure errors at init, not at step 1.
    zero = jnp.zeros((), jnp.float32)
    correction = ()
    if reuse and num_steps > 0:
      correction = tuple(jnp.zeros_like(p) for p in jax.tree.leaves(params) if _perturbable(p))
    return AmpState(count=jnp.zeros((), jnp.int32), delta_norm=zero,
                    clean_grad_norm=zero, perturbed_grad_norm=zero, correction=correction)

  def update_fn(
      updates: optax.Updates,
      state: AmpState,
      params: optax.Params | None = None,
      *args: Any,
      grad_fn: GradFn | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, AmpState]:
    ascend_now = extra_args.get("ascend")
    if ascend_now is not None and not isinstance(ascend_now, (bool, np.bool_)):
      raise TypeError(
          f"amp(): `ascend` must be a Python bool, known when the step is traced; got "
          f"{ascend_now!r}. Make it a static argument of your jitted step, e.g. "
          "jax.jit(train_step, static_argnames='ascend').")
    del extra_args
    if args:
      raise TypeError(
          "amp(): update() takes grad_fn as a keyword argument, not positionally: "
          "tx.update(grads, opt_state, params, grad_fn=grad_fn).")
    count = optax.safe_increment(state.count)
    if num_steps == 0:
      return updates, state._replace(count=count)
    if grad_fn is None and ascend_now is not False:
      raise _call_checks.missing_grad_fn_error()
    if params is None:
      raise ValueError(
          "amp(): update() needs `params` (the point the ascent starts "
          "from): tx.update(grads, opt_state, params, grad_fn=...).")
    _call_checks.check_no_masked_nodes(params)
    if grad_fn is not None:
      _call_checks.check_not_in_multisteps(grad_fn)
      _call_checks.check_grad_fn_signature(grad_fn)
    _check_same_structure(
        "updates", updates, params,
        "Pass the gradient of the loss w.r.t. exactly these params.")

    eps = _checked_at_runtime("epsilon", _value_at(epsilon, state.count))
    lr = _checked_at_runtime("inner_lr", _value_at(inner_lr, state.count))

    param_leaves, treedef = jax.tree.flatten(params)
    update_leaves = treedef.flatten_up_to(updates)
    _call_checks.check_leaves_match(
        "the gradient passed as `updates`", update_leaves, params,
        "Pass the gradient of the loss w.r.t. exactly these params.")
    chosen = [m and _perturbable(p)
              for m, p in zip(_mask_leaves(mask, params), param_leaves)]
    idx = [i for i, c in enumerate(chosen) if c]

    def ball_radius():
      if radius == "absolute":
        return eps
      if norm == "per_tensor":
        return [eps * _projection.l2_norm(param_leaves[i]) for i in idx]
      return eps * _projection.global_l2_norm([param_leaves[i] for i in idx])

    def ascend(delta, grad_leaves, ball):
      # In at least float32 (Delta is carried so): an fp16 step inner_lr * g may overflow
      # before the projection brings it back into the ball.
      stepped = [d + lr * grad_leaves[i].astype(d.dtype) for d, i in zip(delta, idx)]
      return project(stepped, ball)

    def perturbed_grad(delta, step):
      leaves = list(param_leaves)
      for d, i in zip(delta, idx):
        leaves[i] = leaves[i] + d.astype(leaves[i].dtype)
      try:
        grads = grad_fn(jax.tree.unflatten(treedef, leaves), step)
      except Exception as e:
        _call_checks.note_grad_fn_failure(e)
        raise
      _check_same_structure(
          "grad_fn's output", grads, params,
          "grad_fn(params, inner_step) must return gradients w.r.t. its "
          "first argument, e.g. jax.grad(lambda p, _: loss_fn(p, batch)).")
      grad_leaves = treedef.flatten_up_to(grads)
      _call_checks.check_leaves_match(
          "grad_fn's output", grad_leaves, params,
          "grad_fn(params, inner_step) must return the gradient w.r.t. its first argument.")
      if batch_axis_name is not None:
        grad_leaves = jax.lax.pmean(grad_leaves, axis_name=batch_axis_name)
      return grad_leaves

    def keep_dtypes(new, old):
      # A loop carry must keep its dtypes, whatever grad_fn returns.
      return [n.astype(o.dtype) if _perturbable(o) else n
              for n, o in zip(new, old)]

    first = [jnp.asarray(u) for u in update_leaves]
    inexact = [i for i, p in enumerate(param_leaves) if _perturbable(p)]

    def with_ascent():
      ball = ball_radius()  # here, so steps without an ascent do not compute norms

      def body(step, carry):
        delta, grad_leaves = carry
        delta = ascend(delta, grad_leaves, ball)
        return delta, keep_dtypes(perturbed_grad(delta, step), grad_leaves)

      # zeros_like keeps the parameters' shardings (a loop carry must not change type).
      delta0 = [jnp.zeros_like(param_leaves[i], _projection.accumulation_dtype(
          param_leaves[i].dtype)) for i in idx]
      if num_steps == 1:
        delta, grad_leaves = body(0, (delta0, first))
      else:
        delta, grad_leaves = jax.lax.fori_loop(
            0, num_steps, body, (delta0, first), unroll=_resolve_unroll(unroll))
      correction = state.correction
      if reuse:
        correction = tuple(grad_leaves[i] - first[i] for i in inexact)
      delta_norm = _projection.global_l2_norm(delta).astype(jnp.float32)
      return grad_leaves, delta_norm, correction

    def without_ascent():
      grad_leaves = list(first)
      if reuse:
        for i, c in zip(inexact, state.correction):
          grad_leaves[i] = grad_leaves[i] + c.astype(grad_leaves[i].dtype)
      return grad_leaves, jnp.zeros((), jnp.float32), state.correction

    if ascend_now is not None:  # the caller decides, in Python: no lax.cond.
      grad_leaves, delta_norm, correction = with_ascent() if ascend_now else without_ascent()
    elif every == 1:
      grad_leaves, delta_norm, correction = with_ascent()
    else:
      # Only the taken branch runs (grad_fn is called on ascent steps only), except under
      # vmap, where lax.cond becomes a select that evaluates both.
      grad_leaves, delta_norm, correction = jax.lax.cond(
          state.count % every == 0, with_ascent, without_ascent)

    new_updates = jax.tree.unflatten(treedef, grad_leaves)
    new_state = AmpState(
        count=count,
        delta_norm=delta_norm,
        clean_grad_norm=_inexact_norm(update_leaves),
        perturbed_grad_norm=_inexact_norm(grad_leaves),
        correction=correction,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
