"""AMP with Flax Linen: a ``TrainState`` that forwards ``grad_fn``, and BatchNorm.

Flax's :class:`flax.training.train_state.TrainState` calls
``tx.update(grads, opt_state, params)`` with no extra arguments, so
:func:`amp_optax.amp` never receives its ``grad_fn``. This module provides:

* :class:`TrainState`: a drop-in for Flax's train state (a subclass, with a
  ``batch_stats`` field that defaults to ``None``), whose ``apply_gradients``
  forwards ``grad_fn=`` and other extra arguments to ``tx.update``;
* :func:`make_grad_fn`: builds ``grad_fn(params, inner_step)`` for a loss that
  also takes and returns mutable collections (BatchNorm's ``batch_stats``)
  and an RNG key (dropout), for a step in one :func:`jax.jit`;
* :func:`apply_gradients`: ``state.apply_gradients`` with AMP, built from the
  batch and RNG key rather than a ``grad_fn``, for a step split in two jits
  as in Flax's MNIST example (``apply_model`` computes the gradients,
  ``update_model`` applies them): a ``grad_fn`` is a Python function and
  cannot be returned from one jit into another, the data can;
* :func:`amp_step`: a whole training step (clean pass, AMP ascent, update,
  new ``batch_stats``) with a choice of BatchNorm policy.

The loss function the helpers take is ``loss_fn(params, batch_stats, batch,
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
"""

from collections.abc import Callable
from collections.abc import Mapping
import functools
from typing import Any

from amp_optax import _policies

try:
  from flax.training import train_state
except ModuleNotFoundError as e:
  raise _policies.missing_flax("amp_optax.flax_linen", e) from e
import jax
import jax.numpy as jnp
import optax

from amp_optax._policies import RNG_POLICIES
from amp_optax._policies import STATS_POLICIES
from amp_optax._policies import check_policies

__all__ = (
    "STATS_POLICIES", "RNG_POLICIES", "TrainState", "amp_step", "apply_gradients", "make_grad_fn")

LossFn = Callable[..., Any]
GradFn = Callable[[optax.Params, Any], optax.Updates]


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

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> import flax.linen as nn
    >>> from amp_optax.flax_linen import TrainState
    >>> model = nn.Dense(1)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.1), optax.sgd(0.1))
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

  batch_stats: Any = None

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
    if grad_fn is not None:
      if "grad_fn" in extra:
        raise TypeError("apply_gradients(): give `grad_fn` once, not also in `tx_kwargs`.")
      extra["grad_fn"] = grad_fn
    if not extra:
      return super().apply_gradients(grads=grads, **kwargs)
    tx = self.tx
    if not isinstance(tx, optax.GradientTransformationExtraArgs):
      raise TypeError(
          "apply_gradients(): `tx` does not take extra arguments such as grad_fn; "
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


def _grad_fn(full_loss: LossFn, batch_stats: Any, batch: Any, rng: Any,
             rng_policy: str) -> GradFn:
  grad = jax.grad(full_loss, has_aux=True)

  def grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
    grads, _ = grad(params, batch_stats, batch, _perturbed_rng(rng, inner_step, rng_policy))
    return grads

  return grad_fn


def make_grad_fn(
    loss_fn: LossFn,
    batch_stats: Any,
    batch: Any,
    rng: Any = None,
    *,
    has_aux: bool = False,
    rng_policy: str = "same",
) -> GradFn:
  """Builds AMP's ``grad_fn`` for a Linen loss with batch statistics and RNG.

  The returned ``grad_fn(params, inner_step)`` is pure: it evaluates
  ``loss_fn(params, batch_stats, batch, rng)`` at the perturbed ``params``,
  with the same ``batch_stats`` and ``batch`` as the clean pass, and returns
  the gradient with respect to ``params``. The statistics the perturbed pass
  computes are discarded (the ``"clean"`` BatchNorm policy): keep those of the
  clean pass, as in the example. For the authors' policy use :func:`amp_step`.

  A ``grad_fn`` is a Python function: it cannot be returned from one
  :func:`jax.jit` and passed into another. When the step is split in two
  jits, as in Flax's MNIST example, use :func:`apply_gradients` in the second.

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
    ...     tx=optax.chain(amp_optax.amp(epsilon=0.1), optax.sgd(0.1)))
    >>> def loss_fn(params, batch_stats, batch, rng):
    ...   logits, updates = model.apply(
    ...       {"params": params, "batch_stats": batch_stats}, batch["image"],
    ...       train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, batch["label"]).mean()
    ...   return loss, (logits, updates)
    >>> @jax.jit
    ... def train_step(state, batch, rng):
    ...   (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...       state.params, state.batch_stats, batch, rng)
    ...   grad_fn = flax_linen.make_grad_fn(
    ...       loss_fn, state.batch_stats, batch, rng, has_aux=True)
    ...   return state.apply_gradients(
    ...       grads=grads, grad_fn=grad_fn, batch_stats=updates["batch_stats"])
    >>> state = train_step(state, {"image": x, "label": y}, jax.random.key(1))
    >>> int(state.step)
    1

  Args:
    loss_fn: ``loss_fn(params, batch_stats, batch, rng)``, the model applied
      in training mode with ``mutable=["batch_stats"]``. It returns
      ``(loss, new_batch_stats)``, or with ``has_aux`` either
      ``(loss, (aux, new_batch_stats))`` (Flax's usual order, e.g.
      ``(loss, (logits, updates))``) or ``(loss, (new_batch_stats, aux))``;
      the element structured like ``batch_stats`` is taken as the new
      statistics, and ``new_batch_stats`` may also be Linen's updates dict
      ``{"batch_stats": ...}``. Without statistics (``batch_stats=None``) it
      may return the loss alone, or ``(loss, aux)`` with ``has_aux``.
    batch_stats: the statistics the clean pass started from (not the ones it
      returned), or ``None``.
    batch: the clean pass's batch.
    rng: the clean pass's PRNG key, a pytree of keys, or ``None``.
    has_aux: whether ``loss_fn`` returns ``aux`` besides the statistics.
    rng_policy: ``"same"`` passes ``rng`` to every perturbed pass;
      ``"fold_in"`` passes ``jax.random.fold_in(rng, inner_step)``.

  Returns:
    ``grad_fn(params, inner_step) -> grads``, for ``tx.update(...,
    grad_fn=grad_fn)`` or :meth:`TrainState.apply_gradients`.
  """
  check_policies("clean", rng_policy)
  full_loss = _normalised(loss_fn, has_aux, "flax_linen.make_grad_fn")
  return _grad_fn(full_loss, batch_stats, batch, rng, rng_policy)


def apply_gradients(
    state: TrainState,
    *,
    grads: optax.Updates,
    loss_fn: LossFn,
    batch: Any,
    rng: Any = None,
    has_aux: bool = False,
    rng_policy: str = "same",
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
  clean pass's new statistics as ``batch_stats=``.

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
    ...     tx=optax.chain(amp_optax.amp(epsilon=0.1), optax.sgd(0.1)))
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
    ...   return flax_linen.apply_gradients(
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
      :func:`make_grad_fn`.
    batch: the clean pass's batch.
    rng: the clean pass's PRNG key (or pytree of keys, or ``None``).
    has_aux: whether ``loss_fn`` returns ``aux`` besides the statistics.
    rng_policy: ``"same"`` or ``"fold_in"``, as in :func:`make_grad_fn`.
    tx_kwargs: further keyword arguments for ``tx.update``.
    **kwargs: fields to replace in the returned state, e.g.
      ``batch_stats=updates["batch_stats"]``.

  Returns:
    The state after the AMP step.
  """
  grad_fn = make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=has_aux,
                         rng_policy=rng_policy)
  return state.apply_gradients(grads=grads, grad_fn=grad_fn, tx_kwargs=tx_kwargs, **kwargs)


def amp_step(
    state: TrainState,
    loss_fn: LossFn,
    batch: Any,
    rng: Any = None,
    *,
    has_aux: bool = False,
    stats_policy: str = "clean",
    rng_policy: str = "same",
    tx_kwargs: dict[str, Any] | None = None,
) -> tuple[TrainState, Any]:
  """One AMP training step for a Linen :class:`TrainState` with batch statistics.

  Runs the clean pass (loss, gradient and new statistics at
  ``state.params``), then ``state.tx.update`` with a ``grad_fn`` for the
  perturbed passes, applies the update and sets ``state.batch_stats``
  according to ``stats_policy``. Call it inside :func:`jax.jit`.

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
    ...     tx=optax.chain(amp_optax.amp(epsilon=0.1), optax.sgd(0.1)))
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
      ``loss_fn``.
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
    tx_kwargs: further keyword arguments for ``tx.update``, e.g.
      ``{"value": loss}``.

  Returns:
    ``(new_state, loss)``, or ``(new_state, (loss, aux))`` if ``has_aux``;
    ``loss`` and ``aux`` are those of the clean pass.
  """
  check_policies(stats_policy, rng_policy)
  full_loss = _normalised(loss_fn, has_aux, "flax_linen.amp_step")
  (loss, (clean_stats, aux)), grads = jax.value_and_grad(full_loss, has_aux=True)(
      state.params, state.batch_stats, batch, rng)
  if stats_policy == "clean":
    grad_fn = _grad_fn(full_loss, state.batch_stats, batch, rng, rng_policy)
    state = state.apply_gradients(grads=grads, grad_fn=grad_fn, tx_kwargs=tx_kwargs,
                                  batch_stats=clean_stats)
  else:
    refs = _new_refs(clean_stats)
    grad = jax.grad(full_loss, has_aux=True)

    def grad_fn(params, inner_step):
      grads, (new_stats, _) = grad(params, _read_refs(refs), batch,
                                   _perturbed_rng(rng, inner_step, rng_policy))
      _write_refs(refs, new_stats)
      return grads

    state = state.apply_gradients(grads=grads, grad_fn=grad_fn, tx_kwargs=tx_kwargs)
    state = state.replace(batch_stats=_read_refs(refs))
  return state, ((loss, aux) if has_aux else loss)
