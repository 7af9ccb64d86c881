"""Adversarial Model Perturbation (AMP) as an Optax gradient transformation."""

from typing import Any
from typing import NamedTuple
import warnings

import jax
import jax.numpy as jnp
import optax

from amp_optax import _ascent
from amp_optax import _call_checks
from amp_optax import _common
from amp_optax import _mapped_axes
from amp_optax import _projection
from amp_optax._common import GradFn
from amp_optax._common import MaskOrFn
from amp_optax._common import ScalarOrSchedule


class AmpState(NamedTuple):
  """State of :func:`amp` and :func:`grouped_amp`: a step count and the last step's diagnostics.

  Attributes:
    count: number of updates done so far; schedules of ``epsilon`` and
      ``inner_lr`` are evaluated at it.
    delta_norm: global L2 norm of the final perturbation Delta_K; with
      groups, the mean over groups.
    clean_grad_norm: global L2 norm of the incoming (clean) gradient.
    perturbed_grad_norm: global L2 norm of the returned gradient at
      ``params + Delta_K``.
    correction: with ``reuse_correction=True``, the adversarial minus the
      clean gradient of the last ascent step, one array per floating
      parameter leaf; otherwise ``()``.

  With ``inner_steps=0`` only ``count`` advances; the diagnostics stay 0. On
  steps without an ascent (``ascend=False``) ``delta_norm`` is 0.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  delta_norm: jax.Array
  clean_grad_norm: jax.Array
  perturbed_grad_norm: jax.Array
  correction: Any = ()


def resolve_unroll(unroll: int | bool | None) -> int | bool:
  """``unroll=None`` means: unroll on CPU, one loop body elsewhere.

  XLA:CPU runs convolutions inside a loop body many times slower than outside
  one (jax#12868), while on GPU and TPU a loop keeps compile time flat in K at
  little cost. Decided at trace time from the backend jit compiles for.
  """
  if unroll is not None:
    return unroll
  return True if jax.default_backend() == "cpu" else 1


def inexact_norm(leaves: list[Any]) -> jax.Array:
  norm = _projection.global_l2_norm([x for x in leaves if _common.inexact(x)])
  return norm.astype(jnp.float32)


def check_same_structure(where: str, what: str, tree: Any, params: Any, fix: str) -> None:
  if not _projection.same_structure(tree, params):
    raise ValueError(
        f"{where}: {what} does not have the structure of params. {fix}\n"
        f"{what}: {jax.tree.structure(tree)}\n"
        f"params: {jax.tree.structure(params)}")


def amp(
    epsilon: ScalarOrSchedule,
    *,
    inner_lr: ScalarOrSchedule = 1.0,
    inner_steps: int = 1,
    norm: str = "per_tensor",
    relative: bool = False,
    mask: MaskOrFn = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
    unroll: int | bool | None = None,
    reuse_correction: bool = False,
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

  Put ``amp`` first in an :func:`optax.chain`: later transforms (clipping,
  weight decay, momentum, learning-rate schedules) see the unperturbed
  parameters and the adversarial gradient. For one Delta per group of
  examples (m-sharpness) use :func:`grouped_amp`; for a train step that
  cannot pass ``grad_fn``, :func:`drop_in_amp`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> def loss_fn(params, x):
    ...   return jnp.sum((params["w"] * x - 1.0) ** 2)
    >>> params = {"w": jnp.array([2.0, 1.0])}
    >>> x = jnp.array([1.0, 0.5])
    >>> tx = optax.chain(amp_optax.amp(0.05), optax.sgd(0.1))
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
    epsilon: radius of the perturbation ball, a finite float >= 0 or an
      optax schedule of the step count. Start from 0.05 (per tensor) and
      sweep x3 either side; 0.5 is the authors' value for PreActResNet18 on
      all of CIFAR-10, which over-regularises smaller models.
    inner_lr: step size of the inner ascent, a float >= 0 or a schedule.
    inner_steps: number ``K`` of ascent steps, a Python int >= 0. ``K = 0``
      returns ``updates`` untouched and never calls ``grad_fn``. Under
      :func:`optax.inject_hyperparams` list it in ``static_args``.
    norm: ``"per_tensor"`` bounds the L2 norm of each parameter array's
      perturbation by ``epsilon`` (what the authors' code does, and what their
      published ``epsilon`` assumes); ``"global"`` bounds the L2 norm over all
      perturbed parameters (the paper's formula).
    relative: ``False`` (the paper's setting): the ball's radius is
      ``epsilon``. ``True``: it is ``epsilon`` times the norm of the
      parameters it bounds (per array with ``norm="per_tensor"``, over all
      perturbed parameters with ``"global"``), so ``epsilon`` is a fraction
      that means the same for small and large models (the study's best 40k
      CNN setting: 0.01 relative, global). A zero array is not perturbed.
    mask: which parameters to perturb: a pytree of bools with the structure
      of the params (or a prefix of it), or a function of the params
      returning one. Unmasked parameters keep ``Delta = 0`` and do not count
      towards the global norm. Non-floating leaves are never perturbed. Use
      this, not :func:`optax.masked` or :func:`optax.multi_transform` around
      ``amp``: those hide the other parameters from ``grad_fn``.
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
    reuse_correction: on steps called with ``ascend=False`` (no ``grad_fn``
      evaluation), return the clean gradient plus the last ascent step's
      correction (its adversarial minus its clean gradient, one buffer the
      size of the parameters) instead of the clean gradient alone, after
      LookSAM. Measured: ascending on every 8th step with reuse kept 95 %
      [47, 138] of AMP's gain on the study's 40k CNN at 1.11x ERM's step time
      (``benchmarks/results/study_cheap.md``). A non-finite correction is
      never stored: the last finite one is kept.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state is an
    :class:`AmpState`. Its ``update`` takes ``(updates, state, params, *,
    grad_fn, ascend=True, **extra_args)``: ``updates`` is the clean gradient
    at ``params`` and ``grad_fn(params, inner_step)`` returns the gradient at
    other parameters, with the signature of the ``grad_fn`` of
    ``optax.contrib.sam(..., opaque_mode=True)``. ``inner_step`` counts
    ascent steps from 0: a Python int when ``K == 1``, a traced int32 inside
    the loop when ``K > 1``. ``ascend=False`` (a Python bool, e.g. a static
    argument of the jitted step: ``ascend=step % k == 0``) returns the clean
    gradient (see ``reuse_correction``) without calling ``grad_fn``: two
    compiled steps, the cheap form on every backend. Other keyword arguments
    are accepted and ignored.

  Negative values. A negative ``epsilon`` or ``inner_lr`` would turn the
  ascent into a descent. A float is checked when ``amp`` is built; a schedule
  is evaluated then at steps 0 to 1023 and at 64 log-spaced steps up to
  2**24, and a negative value at any of them raises. A value traced in the
  step (a schedule's at other steps, or one set through
  :func:`optax.inject_hyperparams`) that is negative or NaN makes that step's
  updates NaN, without a host round-trip: :func:`optax.apply_if_finite`
  skips such steps, and the loss shows them.

  References:
    Zheng, Zhang and Mao, `Regularizing Neural Networks via Adversarial Model
    Perturbation <https://arxiv.org/abs/2010.04925>`_, CVPR 2021.
  """
  where = "amp()"
  num_steps = _common.check_ascent_args(
      where, epsilon=epsilon, inner_lr=inner_lr, inner_steps=inner_steps, norm=norm,
      relative=relative, mask=mask)
  reuse = _common.check_bool(where, "reuse_correction", reuse_correction,
                             "whether steps with ascend=False reuse the last correction")
  unroll = _common.check_unroll(where, unroll)
  axis_names = _mapped_axes.normalise(batch_axis_name)

  def init_fn(params: optax.Params) -> AmpState:
    warn_if_low_precision(where, params, _common.chosen_leaves(where, mask, params))
    correction: tuple[jax.Array, ...] = ()
    if reuse and num_steps > 0:
      correction = tuple(jnp.zeros_like(p) for p in jax.tree.leaves(params)
                         if _common.inexact(p))
    return init_state(correction)

  def update_fn(
      updates: optax.Updates,
      state: AmpState,
      params: optax.Params | None = None,
      *args: Any,
      grad_fn: GradFn | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, AmpState]:
    ascend = _call_checks.check_ascend(where, extra_args.get("ascend"))
    _call_checks.check_first_in_chain(where)
    count = optax.safe_increment(state.count)
    if num_steps == 0:
      return updates, state._replace(count=count)
    _call_checks.check_update_call(where, args, params, grad_fn if ascend else None, ascend)
    check_same_structure(where, "updates", updates, params,
                         "Pass the gradient of the loss w.r.t. exactly these params.")
    eps = _common.value_at(epsilon, state.count)
    lr = _common.value_at(inner_lr, state.count)
    param_leaves, flat_def = jax.tree.flatten(params)
    treedef: Any = flat_def  # jaxlib ships no stubs for PyTreeDef
    first = [jnp.asarray(u) for u in treedef.flatten_up_to(updates)]
    if axis_names:
      _mapped_axes.check_bound(axis_names)
    _call_checks.check_leaves_match(
        where, "the gradient passed as `updates`", first, params,
        "Pass the gradient of the loss w.r.t. exactly these params.")
    _mapped_axes.check_averaged(
        "the clean gradient passed as `updates`", first, param_leaves, axis_names)
    chosen = _common.chosen_leaves(where, mask, params)
    inexact = [i for i, p in enumerate(param_leaves) if _common.inexact(p)]
    # Before the ascent, so the clean gradient need not be kept for it.
    clean_grad_norm = inexact_norm(first)

    if ascend:
      def grads_at(perturbed_leaves, inner_step):
        assert grad_fn is not None  # checked above for every step that ascends
        grad_leaves = call_grad_fn(where, grad_fn, treedef, perturbed_leaves, inner_step, params)
        _call_checks.check_leaves_match(
            where, "grad_fn's output", grad_leaves, params,
            "grad_fn(params, inner_step) must return the gradient w.r.t. its first argument.")
        if axis_names:
          grad_leaves = jax.lax.pmean(grad_leaves, axis_name=axis_names)
        _mapped_axes.check_averaged("grad_fn's output", grad_leaves, param_leaves, axis_names)
        return grad_leaves

      ball = _ascent.make_ball([param_leaves[i] for i in chosen], eps, norm, relative)
      grad_leaves, delta_norm = _ascent.ascend(
          param_leaves, first, grads_at, chosen=chosen, ball=ball, inner_lr=lr,
          num_steps=num_steps, unroll=resolve_unroll(unroll))
      # NaN here for a traced negative epsilon, so that such a step stores no correction.
      grad_leaves = _common.nan_if_negative(grad_leaves, eps, lr)
      correction = state.correction
      if reuse:
        new = tuple(grad_leaves[i] - first[i] for i in inexact)
        finite = _common.all_finite(new)
        correction = tuple(jnp.where(finite, n, c.astype(n.dtype)).astype(c.dtype)
                           for n, c in zip(new, state.correction))
    else:
      grad_leaves = list(first)
      if reuse:
        for i, c in zip(inexact, state.correction):
          grad_leaves[i] = grad_leaves[i] + c.astype(grad_leaves[i].dtype)
      delta_norm, correction = jnp.zeros((), jnp.float32), state.correction

    grad_leaves = _common.nan_if_negative(grad_leaves, eps, lr)
    new_state = AmpState(
        count=count, delta_norm=delta_norm, clean_grad_norm=clean_grad_norm,
        perturbed_grad_norm=inexact_norm(grad_leaves), correction=correction)
    return jax.tree.unflatten(treedef, grad_leaves), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def warn_if_low_precision(where: str, params: Any, chosen: list[int]) -> None:
  """Warns once, at init, that a 16-bit parameter rounds much of a small Delta away."""
  leaves = jax.tree.leaves(params)
  if _ascent.low_precision(leaves, chosen):
    names = sorted({str(jnp.dtype(leaves[i].dtype)) for i in chosen
                    if jnp.finfo(leaves[i].dtype).bits < 32})
    warnings.warn(
        f"{where}: some perturbed parameters are {', '.join(names)}: theta + Delta is formed in "
        "their dtype, where much of a small Delta rounds away (bfloat16 keeps 8 bits: an "
        "element moves only if its Delta is more than ~1/256 of its value), so the loss sees "
        "a smaller perturbation, in another direction. AmpState.delta_norm reports the one "
        "applied. Keep float32 master parameters (cast to the low-precision dtype inside the "
        "model, e.g. Flax's dtype=jnp.bfloat16 with param_dtype=jnp.float32), or leave these "
        "parameters out with mask=.", stacklevel=3)


def init_state(correction: Any = ()) -> AmpState:
  zero = jnp.zeros((), jnp.float32)
  return AmpState(count=jnp.zeros((), jnp.int32), delta_norm=zero, clean_grad_norm=zero,
                  perturbed_grad_norm=zero, correction=correction)


def call_grad_fn(where: str, grad_fn: GradFn, treedef: Any, perturbed_leaves: list[Any],
                 inner_step: Any, params: Any) -> list[Any]:
  """``grad_fn`` at the perturbed parameters, flattened like ``params``, with errors that help."""
  try:
    grads = grad_fn(jax.tree.unflatten(treedef, perturbed_leaves), inner_step)
  except Exception as e:
    _call_checks.note_grad_fn_failure(e)
    raise
  check_same_structure(
      where, "grad_fn's output", grads, params,
      "grad_fn(params, inner_step) must return gradients w.r.t. its first argument, e.g. "
      "jax.grad(lambda p, _: loss_fn(p, batch)).")
  return treedef.flatten_up_to(grads)
