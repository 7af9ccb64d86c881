"""AMP with Flax NNX: a pure ``grad_fn`` for ``nnx.Optimizer``, and a one-call step.

With NNX the AMP update is ``optimizer.update(model, grads, grad_fn=grad_fn)``:
:class:`flax.nnx.Optimizer` forwards keyword arguments to ``tx.update``. The
``grad_fn`` runs inside ``tx.update`` (inside a :func:`jax.lax.fori_loop` when
``inner_steps > 1``), so it must be pure: it may not run the live model,
whose BatchNorm statistics and RNG counters would be mutated from inside the
loop's trace. This module provides:

* :func:`make_grad_fn`: a pure ``grad_fn(params, inner_step)`` built from a
  snapshot of the model (``nnx.split``); each call merges a fresh copy with
  the perturbed parameters, so the model is never touched;
* :func:`amp_step`: the clean pass, ``optimizer.update`` with that
  ``grad_fn``, and the model's new statistics, in one call.

State policies. The model's state is split into the parameters (the
optimizer's ``wrt``), the RNG state (``nnx.RngState``: keys and counters) and
the rest (``nnx.BatchStat`` and any other variables).

* ``stats_policy="clean"`` (default): after the step the rest is what the
  clean pass left; the perturbed passes start from the state the clean pass
  started from and their changes are discarded. With ``epsilon=0`` the update
  equals the plain (ERM) one.
* ``stats_policy="authors"`` (:func:`amp_step` only): as in the authors'
  PyTorch code, the clean pass and then each perturbed pass, in order, update
  the BatchNorm statistics (and any other non-RNG variables). The perturbed
  passes' state is carried out of ``tx.update`` in JAX mutable array
  references (:func:`jax.new_ref`) created inside the step: jit-safe for any
  ``inner_steps``, with no state outside the step.
* ``rng_policy="same"`` (default): every perturbed pass gets the RNG state
  the clean pass started from, hence the same dropout masks; ``"fold_in"``
  replaces each RNG key by ``jax.random.fold_in(key, inner_step)`` in
  perturbed pass ``inner_step``. Either way the model's RNG state afterwards
  is the one the clean pass left (advanced once per step).
"""

from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import optax

from amp_optax._policies import RNG_POLICIES
from amp_optax._policies import STATS_POLICIES
from amp_optax._policies import check_policies

__all__ = ("STATS_POLICIES", "RNG_POLICIES", "amp_step", "make_grad_fn")

GradFn = Callable[[optax.Params, Any], optax.Updates]


class _Snapshot:
  """The model's structure and its non-parameter state, as pure arrays."""

  def __init__(self, model: nnx.Module, wrt: Any):
    self.wrt = wrt
    self.graphdef, _, keys, counts, rest = nnx.split(model, wrt, nnx.RngKey, nnx.RngCount, ...)
    self.keys = nnx.as_pure(keys)
    self.counts = nnx.as_pure(counts)
    self.rest = nnx.as_pure(rest)

  def rest_of(self, model: nnx.Module) -> Any:
    *_, rest = nnx.split(model, self.wrt, nnx.RngKey, nnx.RngCount, ...)
    return nnx.as_pure(rest)

  def perturbed_grad(
      self, loss_fn: Callable[..., Any], args: tuple[Any, ...], has_aux: bool, rng_policy: str,
  ) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``(params, inner_step, rest) -> (grads, new_rest)``, pure."""

    def loss_at(params, keys, rest):
      model = nnx.merge(self.graphdef, params, keys, self.counts, rest)
      out = loss_fn(model, *args)
      loss = out[0] if has_aux else out
      return loss, self.rest_of(model)

    grad = jax.grad(loss_at, has_aux=True)

    def grad_and_rest(params, inner_step, rest):
      keys = self.keys
      if rng_policy == "fold_in":
        keys = jax.tree.map(lambda key: jax.random.fold_in(key, inner_step), keys)
      return grad(params, keys, rest)

    return grad_and_rest


def make_grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    rng_policy: str = "same",
) -> GradFn:
  """Builds a pure AMP ``grad_fn`` for an NNX model, for ``nnx.Optimizer.update``.

  Call it *before* the clean pass: it snapshots the model's RNG state and
  batch statistics, so that the perturbed passes start from the state the
  clean pass started from (same dropout masks; see ``rng_policy``). The
  returned ``grad_fn(params, inner_step)`` takes the pure parameter state
  that ``nnx.Optimizer`` hands to ``tx.update``, merges it into a fresh copy
  of the model, evaluates ``loss_fn(model_copy, *args)`` and returns the
  gradient; the copy's new statistics are discarded and the live ``model``
  is never mutated (the ``"clean"`` policy). For the authors' policy use
  :func:`amp_step`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> from flax import nnx
    >>> from amp_optax import flax_nnx
    >>> model = nnx.Sequential(
    ...     nnx.Linear(2, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(0)),
    ...     nnx.relu, nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.1), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   grad_fn = flax_nnx.make_grad_fn(model, loss_fn, x, y)  # before the clean pass
    ...   loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    ...   optimizer.update(model, grads, grad_fn=grad_fn)
    ...   return loss
    >>> loss = train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))

  Args:
    model: the model, in the state the clean pass will start from.
    loss_fn: ``loss_fn(model, *args)`` returning the loss, or ``(loss, aux)``
      if ``has_aux``.
    *args: the clean pass's other arguments (the batch).
    wrt: the filter of the parameters AMP perturbs; the ``wrt`` of the
      ``nnx.Optimizer``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    rng_policy: ``"same"`` gives the perturbed passes the snapshot's RNG
      state; ``"fold_in"`` folds ``inner_step`` into each of its keys.

  Returns:
    ``grad_fn(params, inner_step) -> grads``, pure, for
    ``optimizer.update(model, grads, grad_fn=grad_fn)``.
  """
  check_policies("clean", rng_policy)
  snapshot = _Snapshot(model, wrt)
  grad_and_rest = snapshot.perturbed_grad(loss_fn, args, has_aux, rng_policy)

  def grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
    grads, _ = grad_and_rest(params, inner_step, snapshot.rest)
    return grads

  return grad_fn


def amp_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
    stats_policy: str = "clean",
    rng_policy: str = "same",
    tx_kwargs: dict[str, Any] | None = None,
) -> Any:
  """One AMP training step of an NNX model, in place.

  Runs the clean pass ``loss_fn(model, *args)`` on the live model (its
  BatchNorm statistics and RNG counters advance as in any training step),
  then ``optimizer.update(model, grads, grad_fn=...)`` with a pure
  ``grad_fn`` for the perturbed passes, and finally sets the model's
  statistics according to ``stats_policy``. Use it inside :func:`nnx.jit`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> from flax import nnx
    >>> from amp_optax import flax_nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc1 = nnx.Linear(2, 8, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.1, rngs=rngs)
    ...     self.fc2 = nnx.Linear(8, 1, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.fc2(self.dropout(nnx.relu(self.bn(self.fc1(x)))))
    >>> model = Net(nnx.Rngs(0))
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.1), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, x, y):
    ...   return flax_nnx.amp_step(model, optimizer, loss_fn, x, y)
    >>> loss = train_step(model, optimizer, jnp.ones((4, 2)), jnp.zeros((4, 1)))

  Args:
    model: the model, updated in place.
    optimizer: an ``nnx.Optimizer`` of ``model`` whose ``tx`` contains
      :func:`amp_optax.amp` (first in an :func:`optax.chain`); its ``wrt``
      selects the parameters.
    loss_fn: ``loss_fn(model, *args)`` returning the loss, or ``(loss, aux)``
      if ``has_aux``.
    *args: the other arguments of ``loss_fn`` (the batch).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    stats_policy: ``"clean"`` keeps the statistics the clean pass left;
      ``"authors"`` then applies each perturbed pass's updates in turn, as
      the authors' PyTorch code does (needs ``jax.new_ref``).
    rng_policy: ``"same"`` or ``"fold_in"``, as in :func:`make_grad_fn`.
    tx_kwargs: further keyword arguments for ``tx.update``, e.g.
      ``{"value": loss}``.

  Returns:
    The clean pass's loss, or ``(loss, aux)`` if ``has_aux``.
  """
  check_policies(stats_policy, rng_policy)
  wrt = optimizer.wrt
  snapshot = _Snapshot(model, wrt)  # before the clean pass mutates the model.
  grad_and_rest = snapshot.perturbed_grad(loss_fn, args, has_aux, rng_policy)
  out, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=has_aux)(
      model, *args)

  if stats_policy == "clean":

    def grad_fn(params, inner_step):
      grads, _ = grad_and_rest(params, inner_step, snapshot.rest)
      return grads

    optimizer.update(model, grads, grad_fn=grad_fn, **(tx_kwargs or {}))
    return out

  if not hasattr(jax, "new_ref"):
    raise NotImplementedError(
        "stats_policy='authors' carries the perturbed passes' statistics out of tx.update in "
        f"mutable array references (jax.new_ref), which JAX {jax.__version__} lacks. Upgrade "
        "JAX or use stats_policy='clean'.")
  refs = jax.tree.map(jax.new_ref, snapshot.rest_of(model))  # the clean pass's statistics.

  def grad_fn(params, inner_step):
    rest = jax.tree.map(lambda ref: ref[...], refs)
    grads, new_rest = grad_and_rest(params, inner_step, rest)
    for ref, value in zip(jax.tree.leaves(refs), jax.tree.leaves(new_rest), strict=True):
      ref[...] = value
    return grads

  optimizer.update(model, grads, grad_fn=grad_fn, **(tx_kwargs or {}))
  nnx.update(model, jax.tree.map(lambda ref: ref[...], refs))
  return out
