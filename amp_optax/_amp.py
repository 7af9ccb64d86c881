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

from amp_optax import _ascent
from amp_optax import _call_checks
from amp_optax import _grouped
from amp_optax import _mapped_axes
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

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  delta_norm: jax.Array
  clean_grad_norm: jax.Array
  perturbed_grad_norm: jax.Array
  correction: Any = ()


def _check_non_negative(name: str, value: Any) -> None:
  """Rejects a negative concrete scalar, or a schedule negative at a probed step."""
  if callable(value):
    _probe_schedule(name, value)
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


def _checked_on_host(name: str, value: Any) -> Any:
  """``value``, checked >= 0 now if concrete, else by a host callback when the step runs.

  Only with ``debug_checks=True``: the callback is a device-to-host round-trip
  in every step, and a compiled step holding one can be neither cached nor
  exported.
  """
  try:
    _raise_if_negative(name, value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    jax.debug.callback(functools.partial(_raise_if_negative, name), value)
  return value


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _nan_if_negative(grad_leaves: list[Any], eps: Any, lr: Any) -> list[Any]:
  """NaN updates where a traced ``epsilon`` or ``inner_lr`` is negative (or NaN).

  Concrete values were checked when ``amp`` was built; a value traced in the
  step (a schedule's, or one set through ``optax.inject_hyperparams``) is
  checked on the device without a host round-trip: a negative one would turn
  the ascent into a descent, so the update becomes NaN instead of quietly
  different (``optax.apply_if_finite`` skips such steps; the loss shows it).
  """
  traced = [v for v in (eps, lr) if _is_traced(v)]
  if not traced:
    return grad_leaves
  valid = functools.reduce(jnp.logical_and, [jnp.asarray(v) >= 0 for v in traced])
  return [jnp.where(valid, g, jnp.nan) if _perturbable(g) else g for g in grad_leaves]


# Steps at which a schedule of epsilon or inner_lr is probed when amp is built: every step
# of a short run, then log-spaced steps of long ones.
_PROBED_STEPS = np.unique(np.concatenate([
    np.arange(1024), np.geomspace(1024, 2**24, 64).astype(np.int64)])).astype(np.int32)


def _probe_schedule(name: str, schedule: Any) -> None:
  """Raises if ``schedule`` is negative (or NaN) at a probed step; silent if it cannot be probed.

  A schedule's value is traced in the compiled step, where only a device-side
  outcome (NaN updates) is possible; most mistakes (a decay that crosses zero,
  a sign error) show within the probed steps, here, before training starts.
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
        f"amp(): the schedule given as `{name}` is {values[i]} at step {int(steps[i])}; it must "
        "be >= 0 at every step (a negative radius or step turns the ascent into descent).")


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
  if not _projection.same_structure(tree, params):
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
    debug_checks: bool = False,
    num_groups: int | None = None,
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
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1))
    >>> opt_state = tx.init(params)
    >>> grads = jax.grad(loss_fn)(params, x)
    >>> updates, opt_state = tx.update(
    ...     grads, opt_state, params,
    ...     grad_fn=jax.grad(lambda p, _: loss_fn(p, x)))
    >>> params = optax.apply_updates(params, updates)
    >>> amp_state = opt_state[0]  # AmpState: amp is first in the chain
    >>> print(int(amp_state.count), round(float(amp_state.delta_norm), 3))
    1 0.05

  Args:
    epsilon: radius of the perturbation ball, a float >= 0 or an optax
      schedule of the step count. Start from 0.05 (per tensor, absolute
      radius) and sweep x3 either side; 0.5 is the authors' value for
      PreActResNet18 on all of CIFAR-10, which over-regularises smaller models.
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
    batch_axis_name: under a named mapped axis (:func:`jax.pmap`,
      :func:`jax.shard_map`, a named :func:`jax.vmap`) with per-device
      batches, the axis (a name, or a tuple of names) over which the
      gradients returned by ``grad_fn`` are averaged (:func:`jax.lax.pmean`)
      so that all devices share one ``Delta``, as on a single device; the
      incoming ``updates`` must be averaged already (as for plain training).
      ``()`` says that ``grad_fn`` returns averaged gradients itself. Under
      :func:`jax.jit` with sharded arrays leave it ``None``: gradients are
      global already. Under a named axis ``None`` is an error, unless JAX
      shows the gradients do not vary over it (``shard_map`` with
      ``check_vma=True``, where gradients of replicated parameters come out
      summed): left out there, each device would ascend and step with its
      own gradient and the replicas would drift apart.
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

    debug_checks: also check, by a host callback in the compiled step, that
      a traced ``epsilon`` or ``inner_lr`` is >= 0, raising an error where
      it is not. Off by default: the callback is a device-to-host round-trip
      in every step, and a step that holds one cannot be stored in JAX's
      persistent compilation cache nor serialised by :mod:`jax.export`.

    num_groups: grouped ascent (m-sharpness): ``None`` (the default) shares
      one Delta over the whole batch; ``G`` splits the batch into ``G`` groups
      of ``m`` examples, each ascending from its own gradient with its own
      Delta_j (K steps, projected onto the same ball), and returns the mean
      over groups of each group's gradient at ``theta + Delta_j``. ``updates``
      then holds the groups' clean gradients stacked on a leading axis of
      size ``G``, and ``grad_fn(stacked_params, inner_step)`` gets the
      parameters stacked likewise and returns gradients stacked likewise
      (``jax.vmap`` over the groups: :func:`grouped_value_and_grad`). ``G = 1``
      is the ungrouped step exactly. The group axis may be sharded like the
      batch: the ascent then runs without communication, and only the final
      mean crosses devices (ERM's all-reduce). Under ``shard_map``/``pmap``
      give each device's number of groups and ``batch_axis_name``: the mean is
      then averaged over the axis. Memory: ``G`` gradients and (``K > 1``)
      ``G`` Deltas, divided among the devices the group axis is sharded over.

  Negative values. A negative ``epsilon`` or ``inner_lr`` would turn the
  ascent into a descent. A float is checked when ``amp`` is built; a schedule
  is evaluated then at steps 0 to 1023 and at 64 log-spaced steps up to
  2**24, and a negative value at any of them raises. A value traced in the
  step (a schedule's at other steps, or one set through
  :func:`optax.inject_hyperparams`) that is negative or NaN makes that step's
  updates NaN, without a host round-trip: :func:`optax.apply_if_finite`
  skips such steps, and the loss shows them.

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
  axis_names = _mapped_axes.normalise(batch_axis_name)
  groups = None if num_groups is None else _check_static_int(
      "num_groups", num_groups, 1, "the number G of groups, each with its own Delta",
      "Use None for one Delta shared by the whole batch.")

  def init_fn(params: optax.Params) -> AmpState:
    _mask_leaves(mask, params)  # structure errors at init, not at step 1.
    zero = jnp.zeros((), jnp.float32)
    correction: tuple[jax.Array, ...] = ()
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
      if groups is not None:  # the mean over groups: the gradient of the whole batch.
        updates = _grouped.mean_over_groups(updates, groups, axis_names)
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

    eps = _value_at(epsilon, state.count)
    lr = _value_at(inner_lr, state.count)
    if debug_checks:
      eps = _checked_on_host("epsilon", eps)
      lr = _checked_on_host("inner_lr", lr)

    param_leaves, flat_def = jax.tree.flatten(params)
    treedef: Any = flat_def  # jaxlib ships no stubs for PyTreeDef
    update_leaves = treedef.flatten_up_to(updates)
    if axis_names:
      _mapped_axes.check_bound(axis_names)
    if groups is None:
      _call_checks.check_leaves_match(
          "the gradient passed as `updates`", update_leaves, params,
          "Pass the gradient of the loss w.r.t. exactly these params.")
      _mapped_axes.check_averaged(
          "the clean gradient passed as `updates`", update_leaves, param_leaves, axis_names)
    else:
      # Per-group gradients vary between devices when the groups are spread over them; only
      # their mean, at the end, must be global.
      _grouped.check_stacked("the gradient passed as `updates`", update_leaves, params, groups)
    chosen = [i for i, (m, p) in enumerate(zip(_mask_leaves(mask, params), param_leaves))
              if m and _perturbable(p)]
    inexact = [i for i, p in enumerate(param_leaves) if _perturbable(p)]
    first = [jnp.asarray(u) for u in update_leaves]
    # Before the ascent, so the clean gradient need not be kept for it. With groups: the mean
    # of the groups' norms (a scalar: no gradient crosses devices for a diagnostic).
    clean_grad_norm = (_inexact_norm(first) if groups is None
                       else _grouped.mean_group_norm(first, _inexact_norm))

    def clean_mean():  # only where needed: with groups, a mean over (possibly sharded) groups
      return first if groups is None else _grouped.mean_leaves(first, groups)

    def grads_at(perturbed_leaves, inner_step):
      assert grad_fn is not None  # checked above for every step that ascends
      try:
        grads = grad_fn(jax.tree.unflatten(treedef, perturbed_leaves), inner_step)
      except Exception as e:
        _call_checks.note_grad_fn_failure(e)
        raise
      _check_same_structure(
          "grad_fn's output", grads, params,
          "grad_fn(params, inner_step) must return gradients w.r.t. its "
          "first argument, e.g. jax.grad(lambda p, _: loss_fn(p, batch)).")
      grad_leaves = treedef.flatten_up_to(grads)
      if groups is not None:
        _grouped.check_stacked("grad_fn's output", grad_leaves, params, groups)
        return grad_leaves
      _call_checks.check_leaves_match(
          "grad_fn's output", grad_leaves, params,
          "grad_fn(params, inner_step) must return the gradient w.r.t. its first argument.")
      if axis_names:
        grad_leaves = jax.lax.pmean(grad_leaves, axis_name=axis_names)
      _mapped_axes.check_averaged("grad_fn's output", grad_leaves, param_leaves, axis_names)
      return grad_leaves

    def with_ascent():
      # The ball here, so steps without an ascent do not compute the parameters' norms.
      ball = _ascent.make_ball([param_leaves[i] for i in chosen], eps, norm, radius)
      grad_leaves, delta_norm = _ascent.ascend(
          param_leaves, first, grads_at, chosen=chosen, ball=ball, inner_lr=lr,
          num_steps=num_steps, unroll=_resolve_unroll(unroll), groups=groups)
      if groups is not None:  # the mean over groups of each group's adversarial gradient
        grad_leaves = _grouped.mean_leaves(grad_leaves, groups)
        delta_norm = jnp.mean(delta_norm)
      correction = state.correction
      if reuse:
        clean = clean_mean()
        correction = tuple(grad_leaves[i] - clean[i] for i in inexact)
      return grad_leaves, delta_norm, correction

    def without_ascent():
      grad_leaves = list(clean_mean())
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

    if groups is not None:
      if axis_names:  # groups spread over devices: the mean over all of them
        grad_leaves = jax.lax.pmean(grad_leaves, axis_name=axis_names)
      _mapped_axes.check_averaged("the mean over groups", grad_leaves, param_leaves, axis_names)
    grad_leaves = _nan_if_negative(grad_leaves, eps, lr)
    new_updates = jax.tree.unflatten(treedef, grad_leaves)
    new_state = AmpState(
        count=count,
        delta_norm=delta_norm,
        clean_grad_norm=clean_grad_norm,
        perturbed_grad_norm=_inexact_norm(grad_leaves),
        correction=correction,
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
