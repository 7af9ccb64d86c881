"""AMP with Flax Linen: a ``TrainState`` that forwards ``grad_fn``, BatchNorm, loss scaling.

Flax's :class:`flax.training.train_state.TrainState` calls
``tx.update(grads, opt_state, params)`` with no extra arguments, so
:func:`amp_optax.amp` never receives its ``grad_fn``. This module provides:

* :class:`TrainState`: a drop-in for Flax's train state (a subclass, with a
  keyword-only ``batch_stats`` field that defaults to ``None``, so it can be
  subclassed as Flax's is, e.g. with ``batch_stats: Any`` and
  ``dynamic_scale: DynamicScale``), whose ``apply_gradients`` forwards
  ``grad_fn=`` and other extra arguments to ``tx.update``;
* :func:`make_grad_fn`: builds ``grad_fn(params, inner_step)``, bound to
  ``amp_grad_fn`` in the examples (Flax's own steps use ``grad_fn`` for
  ``jax.value_and_grad``), from Flax's closure ``loss_fn(params)`` or from a
  loss that takes and returns mutable collections (BatchNorm's
  ``batch_stats``) and an RNG key (dropout), for a step in one
  :func:`jax.jit` or :func:`jax.pmap`; with ``dynamic_scale=`` the perturbed
  passes are loss-scaled as the clean one;
* :func:`dynamic_scale_after_amp`: the loss scale after the step and whether
  to apply it, counting the perturbed passes' gradients as Flax's
  ``DynamicScale`` counts the clean one;
* :func:`apply_amp_gradients`: ``state.apply_gradients`` with AMP, built
  from the batch and RNG key rather than a ``grad_fn``, for a step split in
  two jits as in Flax's MNIST example (``apply_model`` computes the
  gradients, ``update_model`` applies them): a ``grad_fn`` is a Python
  function and cannot be returned from one jit into another, the data can
  (named so as not to shadow Flax's ``TrainState.apply_gradients``, which
  :class:`TrainState` extends);
* :func:`amp_step`: a whole training step (clean pass, AMP ascent, update,
  new ``batch_stats``, and the loss scale of a ``state.dynamic_scale``) with a
  choice of BatchNorm policy;
* :func:`grouped_value_and_grad`: grouped ascent
  (:func:`amp_optax.grouped_amp`, m-sharpness): per-group clean gradients,
  new statistics and the per-group ``grad_fn``, from the loss and a batch
  split by :func:`amp_optax.group_batch`.

Grouped ascent and BatchNorm. Each group's pass (clean and perturbed) is the
loss on that group's ``m`` examples alone, under :func:`jax.vmap` over the
groups: BatchNorm normalises with the group's own batch statistics ("ghost
batch norm" with ``m`` examples), every group starting from the same incoming
``batch_stats``. The running statistics kept after the step are the mean over
groups of the clean passes' new statistics (for the usual exponential moving
average, the update by the mean of the groups' batch means and variances),
and the perturbed passes' are discarded (the ``"clean"`` policy). So with
``epsilon=0`` grouped AMP is exactly an ERM step on the ghost-BN loss (the
mean over groups of the group losses), with those statistics. RNG: group
``j``'s passes get ``jax.random.fold_in(rng, j)`` (every leaf of ``rng``), so
the groups draw independent dropout masks, as the examples of one ungrouped
batch do; ``rng_policy`` then applies within each group.

Loss functions. :func:`make_grad_fn` takes Flax's closure, ``loss_fn(params)``
reading the state's statistics, the batch and the key from the enclosing step
(Flax's ImageNet example returns ``(loss, (new_model_state, logits))``: pass
``has_aux=True``). All helpers take ``loss_fn(params, batch_stats, batch,
rng)``: the model applied in training mode with ``mutable=["batch_stats"]``.
It returns ``(loss, new_batch_stats)``, or with ``has_aux=True`` either
``(loss, (aux, new_batch_stats))`` (Flax's usual order, e.g. ``(loss,
(logits, updates))``) or ``(loss, (new_batch_stats, aux))``: the element
structured like ``batch_stats`` is the new statistics, and it may be Linen's
updates dict ``{"batch_stats": ...}`` itself. An output that fits none of
these raises an error that lists them. ``batch_stats`` may be any pytree of
non-trainable collections (or ``None`` when there are none; the loss may then
return the loss alone, or ``(loss, aux)`` with ``has_aux``), and ``rng`` any
pytree of PRNG keys (or ``None``).

BatchNorm policies (``stats_policy``):

* ``"clean"`` (default): the running statistics after a step are those of the
  clean pass at ``params``; the ``K`` perturbed passes' statistics are
  discarded. Each perturbed pass sees the same incoming ``batch_stats`` as the
  clean pass, so it evaluates the same function of the parameters: with
  ``epsilon=0`` AMP's update equals the plain (ERM) one.
* ``"authors"``: what the authors' PyTorch code does (every forward pass in
  train mode updates the running statistics): the clean pass updates them,
  then each perturbed pass updates them again, in order, starting from the
  previous pass's result. :func:`amp` returns only gradients, so the perturbed
  passes' statistics are carried out of ``tx.update`` through JAX mutable
  array references (:func:`jax.new_ref`) created inside the step: jit-safe
  for any ``inner_steps`` (also inside AMP's :func:`jax.lax.fori_loop`) and
  with no state outside the step. This policy needs a JAX with
  ``jax.new_ref``.

RNG policies (``rng_policy``): ``"same"`` (default) gives every perturbed pass
the clean pass's key, so dropout masks are shared and AMP perturbs only the
weights; ``"fold_in"`` gives perturbed pass ``k`` the key
``jax.random.fold_in(rng, k)`` (every leaf of ``rng``).

Loss scaling (float16): with Flax's
:class:`~flax.training.dynamic_scale.DynamicScale`, give the scale the clean
pass used to :func:`make_grad_fn` (``dynamic_scale=state.dynamic_scale``):
each perturbed pass is then computed by ``dynamic_scale.value_and_grad``, as
the clean one (the loss multiplied by the scale, the gradient divided by it,
in float32), and a non-finite one makes the gradient ``amp`` returns NaN on
every device. :func:`dynamic_scale_after_amp` reads that from the new
optimiser state: the step is skipped and the scale backs off when the clean
gradient or any perturbed one is not finite, as ``DynamicScale`` does for the
clean gradient alone. :func:`amp_step` does all of it for a state with a
``dynamic_scale`` field. Under :func:`jax.pmap` the perturbed gradients are
averaged by ``amp(..., batch_axis_name=...)``; do not pass ``axis_name`` for
them (only the clean pass's ``value_and_grad`` takes it).
"""

from collections.abc import Callable
from collections.abc import Mapping
import functools
import inspect
from typing import Any

from amp_optax import _extras
from amp_optax import _grouped
from amp_optax import _policies

try:
  from flax import struct
  from flax.training import train_state
except ModuleNotFoundError as e:
  raise _extras.missing_extra(
      "amp_optax.flax_linen", e, package="flax", display_name="Flax", extra="flax",
      requirement="flax>=0.12.8") from e
import jax
import jax.numpy as jnp
import optax

from amp_optax._policies import RNG_POLICIES
from amp_optax._policies import STATS_POLICIES
from amp_optax._policies import check_policies

__all__ = (
    "STATS_POLICIES", "RNG_POLICIES", "TrainState", "amp_step", "apply_amp_gradients",
    "dynamic_scale_after_amp", "grouped_value_and_grad", "make_grad_fn")

LossFn = Callable[..., Any]
GradFn = Callable[[optax.Params, Any], optax.Updates]

# The attribute make_grad_fn sets on its grad_fn: whether its perturbed passes are loss-scaled.
_LOSS_SCALED = "amp_loss_scaled"


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` with ``batch_stats``, forwarding extra args to ``tx``.

  ``apply_gradients`` behaves as Flax's (``tx.update``, then
  :func:`optax.apply_updates`, ``step + 1``, fields replaced from
  ``**kwargs``), but also passes ``grad_fn`` and ``tx_kwargs`` on to
  ``tx.update``, which :func:`amp_optax.amp` needs. It delegates to Flax's
  ``apply_gradients`` with those arguments bound to ``tx.update``, so Flax's
  special cases carry over (with fp8 ``OVERWRITE_WITH_GRADIENT`` params,
  ``grad_fn`` takes and returns the ``params["params"]`` subtree, as ``tx``
  does).

  It subclasses as Flax's does: ``batch_stats`` is keyword-only with a
  default, so a subclass may add fields without defaults, and may declare
  ``batch_stats: Any`` again to make it required, as Flax's ImageNet example
  declares its own state::

    class TrainState(flax_linen.TrainState):
      batch_stats: Any
      dynamic_scale: flax.training.dynamic_scale.DynamicScale

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> import flax.linen as nn
    >>> from amp_optax.flax_linen import TrainState
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1))
    >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    >>> def loss_fn(params):
    ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    >>> grads = jax.grad(loss_fn)(state.params)
    >>> state = state.apply_gradients(
    ...     grads=grads, grad_fn=lambda p, _: jax.grad(loss_fn)(p))
    >>> int(state.step)
    1

  Attributes:
    batch_stats: non-trainable collections (e.g. BatchNorm's running
      statistics), or ``None``. Pass ``batch_stats=...`` to :meth:`create`.
  """

  # A default factory, not a default: dataclasses would keep a plain default as a class
  # attribute, and a subclass that declares `batch_stats: Any` again would inherit it.
  batch_stats: Any = struct.field(default_factory=lambda: None, kw_only=True)

  def apply_gradients(
      self,
      *,
      grads: optax.Updates,
      grad_fn: GradFn | None = None,
      tx_kwargs: dict[str, Any] | None = None,
      **kwargs: Any,
  ) -> "TrainState":
    """Applies ``grads`` through ``tx``, forwarding ``grad_fn`` and ``tx_kwargs``.

    Args:
      grads: gradients of the loss at ``self.params`` (for AMP, the clean
        gradient).
      grad_fn: ``grad_fn(params, inner_step) -> grads``, passed to
        ``tx.update`` as ``grad_fn=``; see :func:`make_grad_fn`.
      tx_kwargs: further keyword arguments for ``tx.update``, e.g.
        ``{"value": loss}`` for a transform that wants the loss value.
      **kwargs: fields to replace in the returned state, e.g.
        ``batch_stats=new_batch_stats``.

    Returns:
      The state with ``step`` incremented, ``params`` and ``opt_state``
      updated, and the fields in ``kwargs`` replaced.
    """
    extra = dict(tx_kwargs or {})
    if (getattr(self, "dynamic_scale", None) is not None
        and getattr(grad_fn, _LOSS_SCALED, None) is False):
      raise ValueError(
          "flax_linen.TrainState.apply_gradients(): this state has a dynamic_scale, so its "
          "clean pass is loss-scaled, but amp_grad_fn was built without one: its perturbed "
          "passes would run unscaled in low precision (float16 gradients underflow), and even "
          "epsilon=0 would differ from the plain step. Build it with the scale the clean pass "
          "used: flax_linen.make_grad_fn(loss_fn, ..., dynamic_scale=state.dynamic_scale), or "
          "use flax_linen.amp_step, which does.")
    if grad_fn is not None:
      if "grad_fn" in extra:
        raise TypeError(
            "flax_linen.TrainState.apply_gradients(): give `grad_fn` once, not also in "
            "`tx_kwargs`.")
      extra["grad_fn"] = grad_fn
    if not extra:
      return super().apply_gradients(grads=grads, **kwargs)
    tx = self.tx
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
      raise TypeError(
          "flax_linen.TrainState.apply_gradients(): `tx` does not take extra arguments such "
          "as grad_fn; "
          "build it with optax.chain, e.g. "
          "optax.chain(amp_optax.amp(epsilon), optax.sgd(lr)).")
    # Let Flax's apply_gradients do the rest, with the extra arguments bound to
    # tx.update; the original tx is put back so the state's static fields (and
    # so its pytree structure) do not change.
    bound = optax.GradientTransformationExtraArgs(tx.init, functools.partial(tx.update, **extra))
    new_state = super(TrainState, self.replace(tx=bound)).apply_gradients(grads=grads, **kwargs)
    return new_state.replace(tx=tx)


def _perturbed_rng(rng: Any, inner_step: Any, rng_policy: str) -> Any:
  if rng_policy == "same" or rng is None:
    return rng
  return jax.tree.map(lambda key: jax.random.fold_in(key, inner_step), rng)


def _layout(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
  """Paths and shapes of a pytree's leaves (dict and FrozenDict alike)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(path), tuple(jnp.shape(x))) for path, x in leaves]


def _as_stats(x: Any, batch_stats: Any) -> tuple[bool, Any]:
  """Whether ``x`` is new statistics for ``batch_stats``: the same pytree, or
  Linen's ``mutable=["batch_stats"]`` updates ``{"batch_stats": ...}``."""
  want = _layout(batch_stats)
  if _layout(x) == want:
    return True, x
  if isinstance(x, Mapping) and list(x.keys()) == ["batch_stats"]:
    if _layout(x["batch_stats"]) == want:
      return True, x["batch_stats"]
  return False, None


_FORMS = (
    "loss_fn(params, batch_stats, batch, rng) must return\n"
    "  (loss, new_batch_stats)                 with has_aux=False, or\n"
    "  (loss, (aux, new_batch_stats))          with has_aux=True (Flax's usual order, e.g.\n"
    "                                          (loss, (logits, updates)) with updates from\n"
    "                                          model.apply(..., mutable=['batch_stats'])), or\n"
    "  (loss, (new_batch_stats, aux))          with has_aux=True.\n"
    "new_batch_stats may be the statistics themselves (structured like batch_stats) or Linen's\n"
    "updates dict {'batch_stats': ...}.")

_CLOSURE_AUX_FORM = "(loss, aux), e.g. Flax's (loss, (new_model_state, logits))"


def _split_output(out: Any, batch_stats: Any, has_aux: bool, where: str) -> tuple[Any, Any]:
  """``loss_fn``'s output as ``(loss, (new_batch_stats, aux))``."""
  no_stats = not _layout(batch_stats)
  if not _policies.is_pair(out):
    if no_stats and not has_aux:
      return out, (batch_stats, None)  # a model without statistics: the loss alone.
    raise TypeError(f"{where}: loss_fn returned {type(out).__name__}.\n{_FORMS}")
  loss, second = out
  if not has_aux:
    ok, stats = _as_stats(second, batch_stats)
    if ok:
      return loss, (stats, None)
    if no_stats or (_policies.is_pair(second)
                    and any(_as_stats(x, batch_stats)[0] for x in second)):
      raise TypeError(
          f"{where}: loss_fn returned (loss, aux) with aux besides the statistics: pass "
          f"has_aux=True.\n{_FORMS}")
    raise ValueError(
        f"{where}: the second element of loss_fn's output is not structured like batch_stats."
        f"\n{_FORMS}\nbatch_stats: {_layout(batch_stats)}\ngot:         {_layout(second)}")
  if _policies.is_pair(second):
    first_ok, first_stats = _as_stats(second[0], batch_stats)
    if first_ok:
      return loss, (first_stats, second[1])
    last_ok, last_stats = _as_stats(second[1], batch_stats)
    if last_ok:
      return loss, (last_stats, second[0])
  if no_stats:
    return loss, (batch_stats, second)  # a model without statistics: all of it is aux.
  raise ValueError(
      f"{where}: with has_aux=True, neither element of loss_fn's (loss, (a, b)) is structured "
      f"like batch_stats.\n{_FORMS}\nbatch_stats: {_layout(batch_stats)}")


def _normalised(loss_fn: LossFn, has_aux: bool, where: str) -> LossFn:
  """``loss_fn`` as a function returning ``(loss, (new_batch_stats, aux))``."""

  def wrapped(params, batch_stats, batch, rng):
    return _split_output(loss_fn(params, batch_stats, batch, rng), batch_stats, has_aux, where)

  return wrapped


def _new_refs(tree: Any) -> Any:
  if not hasattr(jax, "new_ref"):
    raise NotImplementedError(
        "stats_policy='authors' carries the perturbed passes' statistics out of tx.update in "
        f"mutable array references (jax.new_ref), which JAX {jax.__version__} lacks. Upgrade "
        "JAX or use stats_policy='clean'.")
  return jax.tree.map(jax.new_ref, tree)


def _read_refs(refs: Any) -> Any:
  return jax.tree.map(lambda ref: ref[...], refs)


def _write_refs(refs: Any, values: Any) -> None:
  for ref, value in zip(jax.tree.leaves(refs), jax.tree.leaves(values), strict=True):
    ref[...] = value


def _perturbed_pass(full_loss: LossFn, dynamic_scale: Any) -> Callable[..., tuple[Any, Any]]:
  """``(params, batch_stats, batch, rng) -> (grads, new_batch_stats)`` of one perturbed pass.

  With a loss scale, the pass is ``dynamic_scale.value_and_grad``'s, as the
  clean pass's is, and a non-finite one returns NaN gradients.
  """
  if dynamic_scale is None:
    grad = jax.grad(full_loss, has_aux=True)

    def unscaled(params, *args):
      grads, (new_stats, _) = grad(params, *args)
      return grads, new_stats

    return unscaled
  scaled_value_and_grad = dynamic_scale.value_and_grad(full_loss, has_aux=True)

  def scaled(params, *args):
    _, finite, (_, (new_stats, _)), grads = scaled_value_and_grad(params, *args)
    return _policies.nan_unless_finite(grads, finite, params), new_stats

  return scaled


def _grad_fn(full_loss: LossFn, batch_stats: Any, batch: Any, rng: Any, rng_policy: str,
             dynamic_scale: Any) -> GradFn:
  perturbed_pass = _perturbed_pass(full_loss, dynamic_scale)

  def grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
    grads, _ = perturbed_pass(params, batch_stats, batch,
                              _perturbed_rng(rng, inner_step, rng_policy))
    return grads

  return grad_fn


def _closure_grad_fn(loss_fn: LossFn, has_aux: bool, dynamic_scale: Any) -> GradFn:
  """AMP's ``grad_fn`` for Flax's closure ``loss_fn(params)``; its aux is discarded."""
  where = "flax_linen.make_grad_fn"

  def checked_loss(params):
    out = loss_fn(params)
    _policies.check_loss_output(out, has_aux, where, _CLOSURE_AUX_FORM)
    return out

  if dynamic_scale is None:
    grad = jax.grad(checked_loss, has_aux=has_aux)

    def grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
      return grad(params)[0] if has_aux else grad(params)

    return grad_fn
  scaled_value_and_grad = dynamic_scale.value_and_grad(checked_loss, has_aux=has_aux)

  def scaled_grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
    _, finite, _, grads = scaled_value_and_grad(params)
    return _policies.nan_unless_finite(grads, finite, params)

  return scaled_grad_fn


class _ClosedOver:
  """The default of ``make_grad_fn``'s ``batch_stats`` and ``batch``: the closure form."""

  def __repr__(self) -> str:
    return "<closed over by loss_fn>"


_CLOSED_OVER = _ClosedOver()


def _binds(loss_fn: LossFn, num_args: int) -> bool | None:
  """Whether ``loss_fn`` can be called with ``num_args`` positional arguments; None if unknown."""
  try:
    signature = inspect.signature(loss_fn)
  except (TypeError, ValueError):  # no signature to read: let the call decide.
    return None
  try:
    signature.bind(*([None] * num_args))
  except TypeError:
    return False
  return True


def _check_form(loss_fn: LossFn, closure: bool, batch_stats: Any, batch: Any, rng: Any,
                rng_policy: str) -> None:
  where = "flax_linen.make_grad_fn"
  if (batch_stats is _CLOSED_OVER) != (batch is _CLOSED_OVER):
    raise TypeError(
        f"{where}: pass both `batch_stats` and `batch` (for loss_fn(params, batch_stats, batch, "
        "rng)), or neither (for Flax's closure loss_fn(params), which reads them itself).")
  if closure:
    if rng is not None:
      raise TypeError(
          f"{where}: `rng` given without `batch_stats` and `batch`. A closure loss_fn(params) "
          "reads its key itself: make_grad_fn(loss_fn, has_aux=...); a loss_fn(params, "
          "batch_stats, batch, rng) takes all three: make_grad_fn(loss_fn, state.batch_stats, "
          "batch, rng, has_aux=...).")
    if _binds(loss_fn, 1) is False:
      raise TypeError(
          f"{where}: loss_fn{inspect.signature(loss_fn)} needs more than params, so pass what it "
          "takes: make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=...) for "
          "loss_fn(params, batch_stats, batch, rng); make_grad_fn(loss_fn, has_aux=...) is for "
          "Flax's closure loss_fn(params).")
    if rng_policy != "same":
      raise ValueError(
          f"{where}: rng_policy={rng_policy!r} needs the key as an argument, and a closure "
          "loss_fn(params) holds its own: write it as loss_fn(params, batch_stats, batch, rng) "
          "and pass make_grad_fn(loss_fn, state.batch_stats, batch, rng, ...).")
  elif _binds(loss_fn, 1) and _binds(loss_fn, 4) is False:
    raise TypeError(
        f"{where}: loss_fn{inspect.signature(loss_fn)} takes params only (Flax's closure form), "
        "so it reads the batch statistics, batch and key itself: call make_grad_fn(loss_fn, "
        "has_aux=...) without batch_stats, batch and rng.")


def make_grad_fn(
    loss_fn: LossFn,
    batch_stats: Any = _CLOSED_OVER,
    batch: Any = _CLOSED_OVER,
    rng: Any = None,
    *,
    has_aux: bool = False,
    rng_policy: str = "same",
    dynamic_scale: Any = None,
) -> GradFn:
  """Builds AMP's ``grad_fn`` for a Linen loss, as Flax writes it or with explicit inputs.

  The returned ``grad_fn(params, inner_step)`` is pure: it evaluates the loss
  at the perturbed ``params``, with the same batch statistics, batch and key
  as the clean pass, and returns the gradient with respect to ``params``. The
  statistics the perturbed pass computes are discarded (the ``"clean"``
  BatchNorm policy): keep those of the clean pass, as in the example. For the
  authors' policy use :func:`amp_step`. Bind it to ``amp_grad_fn``, not
  ``grad_fn``, a name Flax's steps use for ``jax.value_and_grad``.

  Two forms of ``loss_fn``:

  * Flax's closure, ``make_grad_fn(loss_fn, has_aux=True)`` with
    ``loss_fn(params)`` as in Flax's ImageNet example: it reads
    ``state.batch_stats`` (the statistics the clean pass starts from), the
    batch and the key from the enclosing step, and returns the loss, or
    ``(loss, aux)`` with ``has_aux`` (e.g. ``(loss, (new_model_state,
    logits))``; ``aux`` is discarded). The same function serves the clean
    pass and AMP.
  * ``make_grad_fn(loss_fn, batch_stats, batch, rng)`` with
    ``loss_fn(params, batch_stats, batch, rng)``, needed for
    ``rng_policy="fold_in"`` and by :func:`apply_amp_gradients` and
    :func:`amp_step`.

  A ``grad_fn`` is a Python function: it cannot be returned from one
  :func:`jax.jit` and passed into another. When the step is split in two
  jits, as in Flax's MNIST example, use :func:`apply_amp_gradients` in the
  second.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> import flax.linen as nn
    >>> from amp_optax import flax_linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> state = flax_linen.TrainState.create(
    ...     apply_fn=model.apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1)))
    >>> @jax.jit
    ... def train_step(state, batch, rng):
    ...   def loss_fn(params):  # Flax's closure form
    ...     logits, new_model_state = state.apply_fn(
    ...         {"params": params, "batch_stats": state.batch_stats},
    ...         batch["image"], train=True, mutable=["batch_stats"],
    ...         rngs={"dropout": rng})
    ...     loss = optax.softmax_cross_entropy_with_integer_labels(
    ...         logits, batch["label"]).mean()
    ...     return loss, (new_model_state, logits)
    ...   grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    ...   (loss, (new_model_state, logits)), grads = grad_fn(state.params)
    ...   amp_grad_fn = flax_linen.make_grad_fn(loss_fn, has_aux=True)
    ...   return state.apply_gradients(
    ...       grads=grads, grad_fn=amp_grad_fn,
    ...       batch_stats=new_model_state["batch_stats"])
    >>> state = train_step(state, {"image": x, "label": y}, jax.random.key(1))
    >>> int(state.step)
    1

  Args:
    loss_fn: Flax's closure ``loss_fn(params)``, or ``loss_fn(params,
      batch_stats, batch, rng)``, the model applied in training mode with
      ``mutable=["batch_stats"]``, returning ``(loss, new_batch_stats)``, or
      with ``has_aux`` either ``(loss, (aux, new_batch_stats))`` (Flax's
      usual order, e.g. ``(loss, (logits, updates))``) or ``(loss,
      (new_batch_stats, aux))``; the element structured like ``batch_stats``
      is taken as the new statistics, and ``new_batch_stats`` may also be
      Linen's updates dict ``{"batch_stats": ...}``. Without statistics
      (``batch_stats=None``) it may return the loss alone, or ``(loss, aux)``
      with ``has_aux``.
    batch_stats: the statistics the clean pass started from (not the ones it
      returned), or ``None``; omitted with the closure form.
    batch: the clean pass's batch; omitted with the closure form.
    rng: the clean pass's PRNG key, a pytree of keys, or ``None``; omitted
      with the closure form.
    has_aux: whether ``loss_fn`` returns ``aux`` besides the loss (and the
      statistics).
    rng_policy: ``"same"`` passes ``rng`` to every perturbed pass;
      ``"fold_in"`` passes ``jax.random.fold_in(rng, inner_step)`` (not with
      the closure form, whose key is its own).
    dynamic_scale: the :class:`~flax.training.dynamic_scale.DynamicScale`
      the clean pass used (``state.dynamic_scale``, before the step), or
      ``None``. Each perturbed pass is then ``dynamic_scale.value_and_grad``'s
      (scaled loss, unscaled float32 gradient, without ``axis_name``:
      ``amp``'s ``batch_axis_name`` averages it), and a non-finite one
      returns NaN gradients; decide the step with
      :func:`dynamic_scale_after_amp`.

  Returns:
    ``grad_fn(params, inner_step) -> grads``, for ``tx.update(...,
    grad_fn=amp_grad_fn)`` or :meth:`TrainState.apply_gradients`.
  """
  check_policies("clean", rng_policy)
  _policies.check_dynamic_scale(dynamic_scale, "flax_linen.make_grad_fn")
  closure = batch_stats is _CLOSED_OVER and batch is _CLOSED_OVER
  _check_form(loss_fn, closure, batch_stats, batch, rng, rng_policy)
  if closure:
    grad_fn = _closure_grad_fn(loss_fn, has_aux, dynamic_scale)
  else:
    full_loss = _normalised(loss_fn, has_aux, "flax_linen.make_grad_fn")
    grad_fn = _grad_fn(full_loss, batch_stats, batch, rng, rng_policy, dynamic_scale)
  # Read by TrainState.apply_gradients: a state with a loss scale needs scaled perturbed passes.
  setattr(grad_fn, _LOSS_SCALED, dynamic_scale is not None)
  return grad_fn


def dynamic_scale_after_amp(
    dynamic_scale: Any, is_fin: Any, opt_state: optax.OptState,
) -> tuple[Any, jax.Array]:
  """The loss scale after an AMP step, and whether to apply the step.

  Flax's :class:`~flax.training.dynamic_scale.DynamicScale` decides from the
  clean gradient alone; AMP's update is the gradient of the perturbed passes.
  This joins them: the step is applied only if the clean gradient
  (``is_fin``) and every perturbed gradient are finite, and the scale is
  updated by ``DynamicScale``'s own rule (grow after ``growth_interval``
  finite steps, back off otherwise) from that joint answer. The perturbed
  passes' answer is read from ``opt_state``: with
  ``make_grad_fn(..., dynamic_scale=...)`` a non-finite pass makes the
  gradient ``amp`` returns NaN, after ``batch_axis_name`` averaged it, so
  every device decides alike.

  Use it where Flax's ImageNet example skips non-finite steps::

    if dynamic_scale:
      dynamic_scale, is_fin = flax_linen.dynamic_scale_after_amp(
          state.dynamic_scale, is_fin, new_state.opt_state)
      new_state = new_state.replace(...)  # the example's skip, unchanged

  Args:
    dynamic_scale: the scale before the step (``state.dynamic_scale``), the
      one the clean and the perturbed passes used; not the one
      ``value_and_grad`` returned.
    is_fin: whether the clean gradient is finite, as ``value_and_grad``
      returned it.
    opt_state: the optimiser state after the step (``new_state.opt_state``),
      holding the state of one :func:`amp_optax.amp`.

  Returns:
    ``(dynamic_scale, is_fin)``: the new scale, and whether the clean and all
    perturbed gradients were finite (apply the step only then).
  """
  return _policies.dynamic_scale_after_amp(dynamic_scale, is_fin, opt_state,
                                           "flax_linen.dynamic_scale_after_amp")


def apply_amp_gradients(
    state: TrainState,
    *,
    grads: optax.Updates,
    loss_fn: LossFn,
    batch: Any,
    rng: Any = None,
    has_aux: bool = False,
    rng_policy: str = "same",
    dynamic_scale: Any = None,
    tx_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TrainState:
  """``state.apply_gradients`` with AMP, from the data: for a step split in two jits.

  Flax's MNIST example computes the gradients in one jitted function
  (``apply_model``) and applies them in another (``update_model``). A
  ``grad_fn`` cannot cross from one to the other (it is a Python function,
  not an array), so the second takes what ``grad_fn`` is made from: the batch
  and the RNG key. This builds ``make_grad_fn(loss_fn, state.batch_stats,
  batch, rng)``, the statistics the clean pass started from, and calls
  ``state.apply_gradients(grads=grads, grad_fn=..., **kwargs)``: pass the
  clean pass's new statistics as ``batch_stats=``. (A function of the
  module, not a method: :meth:`TrainState.apply_gradients` is Flax's, with
  ``grad_fn`` forwarded.)

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> import flax.linen as nn
    >>> from amp_optax import flax_linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(3)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 2, 0])
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> state = flax_linen.TrainState.create(
    ...     apply_fn=model.apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1)))
    >>> def loss_fn(params, batch_stats, batch, rng):
    ...   logits, updates = model.apply(
    ...       {"params": params, "batch_stats": batch_stats}, batch["image"],
    ...       train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, batch["label"]).mean()
    ...   return loss, (logits, updates)
    >>> @jax.jit
    ... def apply_model(state, batch, rng):
    ...   (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...       state.params, state.batch_stats, batch, rng)
    ...   return grads, updates, loss
    >>> @jax.jit
    ... def update_model(state, grads, updates, batch, rng):
    ...   return flax_linen.apply_amp_gradients(
    ...       state, grads=grads, loss_fn=loss_fn, batch=batch, rng=rng,
    ...       has_aux=True, batch_stats=updates["batch_stats"])
    >>> batch, rng = {"image": x, "label": y}, jax.random.key(1)
    >>> grads, updates, loss = apply_model(state, batch, rng)
    >>> state = update_model(state, grads, updates, batch, rng)
    >>> int(state.step)
    1

  Args:
    state: a :class:`TrainState` whose ``tx`` contains
      :func:`amp_optax.amp`, before the step (its ``batch_stats`` are the
      ones the clean pass started from).
    grads: the clean pass's gradients at ``state.params``.
    loss_fn: ``loss_fn(params, batch_stats, batch, rng)``, as in
      :func:`make_grad_fn` (a closure cannot cross the jit boundary either).
    batch: the clean pass's batch.
    rng: the clean pass's PRNG key (or pytree of keys, or ``None``).
    has_aux: whether ``loss_fn`` returns ``aux`` besides the statistics.
    rng_policy: ``"same"`` or ``"fold_in"``, as in :func:`make_grad_fn`.
    dynamic_scale: the loss scale the clean pass used, or ``None``, as in
      :func:`make_grad_fn`; decide the step with
      :func:`dynamic_scale_after_amp`.
    tx_kwargs: further keyword arguments for ``tx.update``.
    **kwargs: fields to replace in the returned state, e.g.
      ``batch_stats=updates["batch_stats"]``.

  Returns:
    The state after the AMP step.
  """
  amp_grad_fn = make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=has_aux,
                             rng_policy=rng_policy, dynamic_scale=dynamic_scale)
  return state.apply_gradients(grads=grads, grad_fn=amp_grad_fn, tx_kwargs=tx_kwargs, **kwargs)


def amp_step(
    state: TrainState,
    loss_fn: LossFn,
    batch: Any,
    rng: Any = None,
    *,
    has_aux: bool = False,
    stats_policy: str = "clean",
    rng_policy: str = "same",
    axis_name: str | None = None,
    tx_kwargs: dict[str, Any] | None = None,
) -> tuple[TrainState, Any]:
  """One AMP training step for a Linen :class:`TrainState` with batch statistics.

  Runs the clean pass (loss, gradient and new statistics at
  ``state.params``), then ``state.tx.update`` with a ``grad_fn`` for the
  perturbed passes, applies the update and sets ``state.batch_stats``
  according to ``stats_policy``. Call it inside :func:`jax.jit`, or inside
  :func:`jax.pmap` with ``axis_name``.

  A state with a ``dynamic_scale`` field that is not ``None`` (a subclass
  declaring ``dynamic_scale: DynamicScale``, as Flax's ImageNet example does)
  is trained with that loss scale: the clean and the perturbed passes are
  ``dynamic_scale.value_and_grad``'s, and when any of their gradients is not
  finite the step is skipped (``params`` and ``opt_state`` kept; ``step`` and
  ``batch_stats`` advance, as in Flax's example) and the scale backs off; see
  :func:`dynamic_scale_after_amp`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> import flax.linen as nn
    >>> from amp_optax import flax_linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(1)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> state = flax_linen.TrainState.create(
    ...     apply_fn=model.apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1)))
    >>> def loss_fn(params, batch_stats, batch, rng):
    ...   x, y = batch
    ...   out, updates = model.apply(
    ...       {"params": params, "batch_stats": batch_stats}, x, train=True,
    ...       mutable=["batch_stats"], rngs={"dropout": rng})
    ...   return jnp.mean((out - y) ** 2), updates["batch_stats"]
    >>> import functools
    >>> train_step = jax.jit(functools.partial(
    ...     flax_linen.amp_step, loss_fn=loss_fn, stats_policy="authors"))
    >>> state, loss = train_step(state, batch=(x, y), rng=jax.random.key(1))

  Args:
    state: a :class:`TrainState` whose ``tx`` contains :func:`amp_optax.amp`
      (first in an :func:`optax.chain`); ``state.batch_stats`` is passed to
      ``loss_fn``, and a ``state.dynamic_scale`` scales the loss.
    loss_fn: ``loss_fn(params, batch_stats, batch, rng)`` returning
      ``(loss, new_batch_stats)``, or with ``has_aux``
      ``(loss, (aux, new_batch_stats))`` or ``(loss, (new_batch_stats,
      aux))``; see :func:`make_grad_fn`.
    batch: passed to ``loss_fn``.
    rng: the clean pass's PRNG key (or pytree of keys, or ``None``).
    has_aux: whether ``loss_fn`` returns ``aux`` besides the statistics.
    stats_policy: ``"clean"`` keeps the clean pass's statistics and discards
      the perturbed passes'; ``"authors"`` applies the clean pass's and then
      each perturbed pass's updates in turn, as the authors' PyTorch code
      does (needs ``jax.new_ref``).
    rng_policy: ``"same"`` or ``"fold_in"``, as in :func:`make_grad_fn`.
    axis_name: under :func:`jax.pmap` (per-device batches), the mapped axis:
      the clean gradient and the new statistics are averaged over it. Give
      ``amp`` the same name as ``batch_axis_name`` (it averages the
      perturbed gradients).
    tx_kwargs: further keyword arguments for ``tx.update``, e.g.
      ``{"value": loss}``.

  Returns:
    ``(new_state, loss)``, or ``(new_state, (loss, aux))`` if ``has_aux``;
    ``loss`` and ``aux`` are those of the clean pass, on this device.
  """
  check_policies(stats_policy, rng_policy)
  dynamic_scale = getattr(state, "dynamic_scale", None)
  _policies.check_dynamic_scale(dynamic_scale, "flax_linen.amp_step")
  full_loss = _normalised(loss_fn, has_aux, "flax_linen.amp_step")
  clean_args = (state.params, state.batch_stats, batch, rng)
  if dynamic_scale is None:
    (loss, (clean_stats, aux)), grads = jax.value_and_grad(full_loss, has_aux=True)(*clean_args)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
  else:  # value_and_grad averages over axis_name itself, before it checks finiteness.
    _, clean_finite, (loss, (clean_stats, aux)), grads = dynamic_scale.value_and_grad(
        full_loss, has_aux=True, axis_name=axis_name)(*clean_args)

  def averaged(stats):
    return stats if axis_name is None else jax.lax.pmean(stats, axis_name)

  perturbed_pass = _perturbed_pass(full_loss, dynamic_scale)
  if stats_policy == "clean":
    def grad_fn(params, inner_step):
      grads, _ = perturbed_pass(params, state.batch_stats, batch,
                                _perturbed_rng(rng, inner_step, rng_policy))
      return grads

    new_state = state.apply_gradients(grads=grads, grad_fn=grad_fn, tx_kwargs=tx_kwargs,
                                      batch_stats=averaged(clean_stats))
  else:
    refs = _new_refs(clean_stats)

    def grad_fn(params, inner_step):
      grads, new_stats = perturbed_pass(params, _read_refs(refs), batch,
                                        _perturbed_rng(rng, inner_step, rng_policy))
      _write_refs(refs, new_stats)
      return grads

    new_state = state.apply_gradients(grads=grads, grad_fn=grad_fn, tx_kwargs=tx_kwargs)
    new_state = new_state.replace(batch_stats=averaged(_read_refs(refs)))
  if dynamic_scale is not None:
    dynamic_scale, finite = dynamic_scale_after_amp(dynamic_scale, clean_finite,
                                                    new_state.opt_state)
    new_state = new_state.replace(
        params=_policies.keep_where_finite(finite, new_state.params, state.params),
        opt_state=_policies.keep_where_finite(finite, new_state.opt_state, state.opt_state),
        dynamic_scale=dynamic_scale)
  return new_state, ((loss, aux) if has_aux else loss)


def _group_rngs(rng: Any, groups: int) -> Any:
  """Group ``j``'s key ``jax.random.fold_in(rng, j)``, stacked on a leading group axis."""
  if rng is None:
    return None
  index = jnp.arange(groups)
  return jax.tree.map(lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(index), rng)


def _grouped_grad_fn(
    loss_fn: LossFn,
    batch_stats: Any,
    grouped_batch: Any,
    rng: Any,
    *,
    has_aux: bool,
    rng_policy: str,
    where: str,
) -> GradFn:
  """AMP's per-group ``grad_fn`` for :func:`amp_optax.grouped_amp` from a Linen loss.

  ``grad_fn(stacked_params, inner_step)`` takes the parameters stacked per
  group (group ``j``'s at ``theta + Delta_j``) and returns the gradients
  stacked the same way: :func:`jax.vmap` over the groups of the loss on group
  ``j``'s batch, from the incoming ``batch_stats``, with key
  ``jax.random.fold_in(rng, j)`` (and within the group ``rng_policy``);
  BatchNorm normalises with the group's own statistics, which are then
  discarded.
  """
  groups = _grouped.num_groups_of(grouped_batch, where)
  perturbed_pass = _perturbed_pass(_normalised(loss_fn, has_aux, where), None)

  def one_group(params, batch, key, inner_step):
    grads, _ = perturbed_pass(params, batch_stats, batch,
                              _perturbed_rng(key, inner_step, rng_policy))
    return grads

  keys = _group_rngs(rng, groups)

  def grad_fn(stacked_params: optax.Params, inner_step: Any) -> optax.Updates:
    return _grouped.map_over_groups(one_group, (0, 0, 0, None), stacked_params, grouped_batch,
                                    keys, inner_step)

  return grad_fn


def grouped_value_and_grad(
    loss_fn: LossFn,
    *,
    has_aux: bool = False,
    rng_policy: str = "same",
) -> Callable[..., tuple[Any, Any, GradFn]]:
  """Grouped ascent with Linen: per-group clean passes, new statistics, and the ``grad_fn``.

  Every framework's ``grouped_value_and_grad(loss_fn, *, has_aux=False,
  <options>)`` returns a function of ``(params_or_model, *args)`` whose
  result is ``(out, grads, amp_grad_fn)``: ``grads``, the per-group clean
  gradients stacked on a leading group axis, are the ``updates`` of
  :func:`amp_optax.grouped_amp` and ``amp_grad_fn`` its ``grad_fn``.

  Here the function is ``(params, batch_stats, grouped_batch, rng=None)``.
  Group ``j``'s clean pass is ``loss_fn`` on its ``m`` examples (BatchNorm
  with the group's own statistics: ghost batch norm), from ``batch_stats``,
  with key ``jax.random.fold_in(rng, j)``, all under one :func:`jax.vmap`.
  The new running statistics are the mean over groups of the clean passes'
  (see the module's "Grouped ascent and BatchNorm"); with ``epsilon=0`` the
  step is ERM on the ghost-BN loss. ``amp_grad_fn`` evaluates group ``j``'s
  loss at its own perturbed parameters from the same incoming
  ``batch_stats`` and key, and discards the statistics it computes.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> import flax.linen as nn
    >>> from amp_optax import flax_linen
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
    ...     return nn.Dense(1)(x)
    >>> model = Net()
    >>> x, y = jnp.ones((8, 2)), jnp.zeros((8, 1))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> state = flax_linen.TrainState.create(
    ...     apply_fn=model.apply, params=variables["params"],
    ...     batch_stats=variables["batch_stats"],
    ...     tx=optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1)))
    >>> def loss_fn(params, batch_stats, batch, rng):
    ...   out, updates = model.apply(
    ...       {"params": params, "batch_stats": batch_stats}, batch[0], train=True,
    ...       mutable=["batch_stats"], rngs={"dropout": rng})
    ...   return jnp.mean((out - batch[1]) ** 2), updates
    >>> @jax.jit
    ... def train_step(state, batch, rng):
    ...   (losses, batch_stats), grads, amp_grad_fn = flax_linen.grouped_value_and_grad(
    ...       loss_fn)(state.params, state.batch_stats, amp_optax.group_batch(batch, 4), rng)
    ...   state = state.apply_gradients(grads=grads, grad_fn=amp_grad_fn,
    ...                                 batch_stats=batch_stats)
    ...   return state, losses.mean()
    >>> state, loss = train_step(state, (x, y), jax.random.key(1))
    >>> int(state.step)
    1

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, rng)`` as in
      :func:`make_grad_fn` (not the closure form), returning one group's
      mean loss and new statistics (and ``aux`` with ``has_aux``).
    has_aux: whether ``loss_fn`` returns ``aux`` besides the statistics.
    rng_policy: within each group, ``"same"`` gives every perturbed pass the
      group's key, ``"fold_in"`` folds ``inner_step`` into it.

  Returns:
    A function of ``(params, batch_stats, grouped_batch, rng=None)``:
    ``params`` the parameters (``state.params``); ``batch_stats`` the
    statistics before the step (``state.batch_stats``), or ``None``;
    ``grouped_batch`` the batch with a leading group axis
    (:func:`amp_optax.group_batch`); ``rng`` the step's PRNG key (or pytree
    of keys, or ``None``). It returns ``(out, grads, amp_grad_fn)``: ``out``
    is ``(losses, new_batch_stats)``, or with ``has_aux`` ``(losses, (aux,
    new_batch_stats))``, where ``losses`` (and ``aux``) are stacked on the
    group axis and ``new_batch_stats``, structured like ``batch_stats``, is
    the mean over groups of the clean passes' statistics; ``grads`` the
    per-group gradients (``updates`` for ``grouped_amp``); ``amp_grad_fn``
    the per-group ``grad_fn``.
  """
  where = "flax_linen.grouped_value_and_grad"
  check_policies("clean", rng_policy)
  value_and_grad = jax.value_and_grad(_normalised(loss_fn, has_aux, where), has_aux=True)

  def value_grads_and_grad_fn(
      params: optax.Params, batch_stats: Any, grouped_batch: Any, rng: Any = None,
  ) -> tuple[Any, Any, GradFn]:
    groups = _grouped.num_groups_of(grouped_batch, where)
    params = _grouped.varying_like(params, grouped_batch)

    def clean(batch, key):
      return value_and_grad(params, batch_stats, batch, key)

    (losses, (stats, aux)), grads = _grouped.map_over_groups(
        clean, (0, 0), grouped_batch, _group_rngs(rng, groups))
    stats_leaves, stats_def = jax.tree.flatten(stats)
    new_stats = jax.tree.unflatten(stats_def, _grouped.mean_leaves(stats_leaves, groups))
    amp_grad_fn = _grouped_grad_fn(loss_fn, batch_stats, grouped_batch, rng, has_aux=has_aux,
                                   rng_policy=rng_policy, where=where)
    out = (losses, (aux, new_stats)) if has_aux else (losses, new_stats)
    return out, grads, _grouped.HelperGradFn(amp_grad_fn, grads)

  return value_grads_and_grad_fn
