"""AMP with Flax NNX: a pure ``grad_fn`` for ``nnx.Optimizer``, a one-call step, loss scaling.

With NNX the AMP update is ``optimizer.update(model, grads, grad_fn=amp_grad_fn)``:
:class:`flax.nnx.Optimizer` forwards keyword arguments to ``tx.update``. The
``grad_fn`` runs inside ``tx.update`` (inside a :func:`jax.lax.fori_loop` when
``inner_steps > 1``), so it must be pure: it may not run the live model, nor
any live ``nnx.Rngs``, metric or other NNX object the loss takes, whose state
would be mutated from inside the loop's trace. This module provides:

* :func:`make_grad_fn`: a pure ``grad_fn(params, inner_step)`` built from a
  snapshot, taken before the clean pass, of the model and of every NNX object
  among the loss's arguments (``nnx.Rngs``, other modules, metrics; also
  inside tuples, lists and dicts). Each call merges fresh copies of them all,
  split jointly so that shared references stay shared (an ``nnx.Rngs`` stored
  in the model and also passed to the loss is one object in the copies too),
  with the perturbed parameters, so the live objects are never touched;
* :func:`amp_step`: the clean pass, ``optimizer.update`` with that
  ``grad_fn``, and the new statistics, in one call; with ``dynamic_scale=``
  also loss scaling and the skip of non-finite steps;
* :func:`dynamic_scale_after_amp`: the loss scale after a step of your own
  and whether to apply it, counting the perturbed passes' gradients;
* :func:`grouped_value_and_grad`: grouped ascent
  (:func:`amp_optax.grouped_amp`, m-sharpness): the per-group clean passes,
  their gradients stacked on a leading group axis, and the per-group
  ``grad_fn``, from the loss, the model and a batch split by
  :func:`amp_optax.group_batch`.

Grouped ascent. The model (and the NNX objects among the loss's other
arguments) is split into pure state, and a pure function of one group's batch
runs under :func:`jax.vmap` over the groups, every group starting from the
same state: BatchNorm normalises with the group's own ``m`` examples ("ghost
batch norm"). Afterwards the live objects are as a clean pass leaves them,
with the BatchNorm statistics (every non-RNG, non-parameter variable that is
floating point) set to the mean over groups of the clean passes' new values
(non-floating ones, e.g. counters, from group 0), as in
:mod:`amp_optax.flax_linen`, and the RNG counters advanced once. RNG: group
``j`` uses every key folded with ``j`` (``jax.random.fold_in(key, j)``), so
the groups draw independent dropout masks as the examples of one ungrouped
batch do; ``rng_policy`` then applies within each group. With
``epsilon=0`` the step is ERM on the ghost-BN loss, the mean over groups of
the group losses.

Flax's NNX MNIST step takes AMP with two changes: ``amp`` first in the
optimiser's chain, and ``grad_fn=amp_grad_fn`` in ``optimizer.update``. Bind the
builder's result to ``amp_grad_fn``: Flax's steps use the name ``grad_fn``
for ``nnx.value_and_grad``, and a later ``grad_fn = ...`` would replace it::

  @nnx.jit
  def train_step(model, optimizer, metrics, rngs, batch):
    amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True)  # new
    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads, grad_fn=amp_grad_fn)                             # grad_fn=

Only the model's parameters selected by the optimizer's ``wrt`` are perturbed
and differentiated; the parameters of other modules among the arguments are
held fixed.

State policies. The state of the model and of the other NNX objects is split
into the parameters (the model's ``wrt``), the RNG state (``nnx.RngKey`` and
``nnx.RngCount``, wherever they live) and the rest (``nnx.BatchStat``,
metrics and any other variables).

* ``stats_policy="clean"`` (default): after the step the rest is what the
  clean pass left; the perturbed passes start from the state the clean pass
  started from and their changes are discarded. With ``epsilon=0`` the step
  equals the plain (ERM) one bit for bit.
* ``stats_policy="authors"`` (:func:`amp_step` only): as in the authors'
  PyTorch code, the clean pass and then each perturbed pass, in order, update
  the BatchNorm statistics (and any other non-RNG, non-parameter variables,
  of the model and of the NNX objects among the arguments). The perturbed
  passes' state is carried out of ``tx.update`` in JAX mutable array
  references (:func:`jax.new_ref`) created inside the step: jit-safe for any
  ``inner_steps``, with no state outside the step.
* ``rng_policy="same"`` (default): every perturbed pass gets the RNG state
  the clean pass started from, hence the same dropout masks; ``"fold_in"``
  replaces each RNG key, wherever it lives, by
  ``jax.random.fold_in(key, inner_step)`` in perturbed pass ``inner_step``.
  Either way the RNG state afterwards is the one the clean pass left.

Order. :func:`make_grad_fn` must run *before* the clean pass (its snapshot is
the clean pass's starting state). Called after it, the perturbed passes would
start from the advanced RNG counters and statistics, and ``epsilon=0`` would
no longer be ERM; ``grad_fn`` detects this (the live RNG counters or batch
statistics it would advance are still the very arrays of its snapshot) and
raises an error.

Loss scaling (float16). With Flax's
:class:`~flax.training.dynamic_scale.DynamicScale` (NNX has none of its own),
``make_grad_fn(..., dynamic_scale=ds)`` computes each perturbed pass with
``ds.value_and_grad`` (the loss multiplied by ``ds.scale``, the gradient
divided by it, in float32) and returns NaN gradients for a non-finite one;
:func:`dynamic_scale_after_amp` then joins the perturbed passes' finiteness
to the clean pass's. ``amp_step(..., dynamic_scale=ds)`` does the whole step:
the clean pass scaled alike, the skip (parameters and optimiser state kept)
when the clean or any perturbed gradient is not finite, and the new scale.
"""

from collections.abc import Callable
from typing import Any

from amp_optax import _common
from amp_optax import _extras
from amp_optax import _grouped
from amp_optax import _policies

try:
  from flax import nnx
except ModuleNotFoundError as e:
  raise _extras.missing_extra(
      "amp_optax.flax_nnx", e, package="flax", display_name="Flax", extra="flax",
      requirement="flax>=0.12.8") from e
import jax
import jax.numpy as jnp
import optax

from amp_optax._policies import RNG_POLICIES
from amp_optax._policies import STATS_POLICIES
from amp_optax._policies import check_policies

__all__ = ("STATS_POLICIES", "RNG_POLICIES", "amp_step", "dynamic_scale_after_amp",
           "grouped_value_and_grad", "make_grad_fn")

GradFn = Callable[[optax.Params, Any], optax.Updates]

_AUX_FORM = "(loss, aux), e.g. (loss, logits)"

_ORDER_HELP = (
    "flax_nnx.make_grad_fn() was called after the clean pass: its snapshot already holds the RNG "
    "counters and batch statistics that the clean pass advanced, so the perturbed passes would not "
    "see the clean pass's randomness and statistics (and epsilon=0 would not be ERM). Call "
    "make_grad_fn(model, loss_fn, *args) before nnx.value_and_grad(loss_fn)(model, *args), or "
    "do the whole step with flax_nnx.amp_step(model, optimizer, loss_fn, *args). (grad_fn also "
    "raises this when no clean pass ran on the live model: run it there, as above.)")


def _is_node(x: Any) -> bool:
  return nnx.graph.is_graph_node(x) or isinstance(x, nnx.Variable)


def _variables(state: Any) -> list[Any]:
  return jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))


class _Snapshot:
  """The model and the NNX objects among ``args``: structure and state, as pure arrays.

  They are split together, as one tuple ``(model, *nodes)``, so that an object
  reachable from several of them (an ``nnx.Rngs`` in the model and in
  ``args``) is one object in every copy.
  """

  def __init__(self, model: nnx.Module, args: tuple[Any, ...], wrt: Any):
    leaves, self.args_def = jax.tree.flatten(args, is_leaf=_is_node)
    self.arg_leaves = leaves
    self.node_at = [i for i, leaf in enumerate(leaves) if _is_node(leaf)]
    nodes = (model, *(leaves[i] for i in self.node_at))
    is_wrt = nnx.filterlib.to_predicate(wrt)

    # The model's `wrt` parameters only: paths start with the index in `nodes`.
    def model_wrt(path, value):
      return bool(path) and path[0] == 0 and is_wrt(path[1:], value)

    self.filters = (model_wrt, nnx.RngKey, nnx.RngCount, ...)
    split: Any = nnx.split(nodes, *self.filters)  # a variadic tuple to type checkers
    self.graphdef, _, keys, counts, rest = split
    self.live_vars = _variables((counts, rest))  # the live objects' variables.
    self.live_rest = _variables(rest)
    self.keys = nnx.as_pure(keys)
    self.counts = nnx.as_pure(counts)
    self.rest = nnx.as_pure(rest)

  def merge(self, params: Any, keys: Any, counts: Any, rest: Any) -> tuple[Any, tuple[Any, ...]]:
    """Fresh copies: the model, and ``args`` with copies in place of the live objects."""
    model, *nodes = nnx.merge(self.graphdef, nnx.State({0: params}), keys, counts, rest)
    leaves = list(self.arg_leaves)
    for i, node in zip(self.node_at, nodes, strict=True):
      leaves[i] = node
    return model, jax.tree.unflatten(self.args_def, leaves)

  def state_of(self, model: nnx.Module, args: tuple[Any, ...]) -> tuple[Any, Any]:
    """``(counts, rest)`` of copies made by :meth:`merge`, as pure arrays."""
    leaves = jax.tree.leaves(args, is_leaf=_is_node)
    nodes = (model, *(leaves[i] for i in self.node_at))
    split: Any = nnx.split(nodes, *self.filters)
    counts, rest = split[-2], split[-1]
    return nnx.as_pure(counts), nnx.as_pure(rest)

  def perturbed_grad(
      self, loss_fn: Callable[..., Any], has_aux: bool, rng_policy: str, dynamic_scale: Any,
  ) -> Callable[[Any, Any, Any], tuple[Any, tuple[Any, Any]]]:
    """``(params, inner_step, rest) -> (grads, (new_counts, new_rest))``, pure.

    With a loss scale, the pass is ``dynamic_scale.value_and_grad``'s, and a
    non-finite one returns NaN gradients.
    """

    def loss_at(params, keys, rest):
      model, args = self.merge(params, keys, self.counts, rest)
      out = loss_fn(model, *args)
      _policies.check_loss_output(out, has_aux, "flax_nnx.make_grad_fn", _AUX_FORM)
      loss = out[0] if has_aux else out
      return loss, self.state_of(model, args)

    if dynamic_scale is None:
      grad = jax.grad(loss_at, has_aux=True)
    else:
      scaled_value_and_grad = dynamic_scale.value_and_grad(loss_at, has_aux=True)

      def grad(params, keys, rest):
        _, finite, (_, new_state), grads = scaled_value_and_grad(params, keys, rest)
        return _policies.nan_unless_finite(grads, finite, params), new_state

    def grad_and_rest(params, inner_step, rest):
      keys = self.keys
      if rng_policy == "fold_in":
        keys = jax.tree.map(lambda key: jax.random.fold_in(key, inner_step), keys)
      return grad(params, keys, rest)

    return grad_and_rest

  def check_taken_before_clean_pass(self, new_state: tuple[Any, Any]) -> None:
    """Raises if the clean pass ran before this snapshot was taken.

    The clean pass writes new arrays into the RNG counters and statistics it
    advances. So if every live variable that the perturbed pass advanced
    still holds the very array of the snapshot, the snapshot was taken after
    the clean pass (or no clean pass ran on the live objects).
    """
    old = jax.tree.leaves((self.counts, self.rest))
    new = jax.tree.leaves(new_state)
    if len(old) != len(new) or len(old) != len(self.live_vars):
      return
    advanced = [i for i, (o, n) in enumerate(zip(old, new)) if o is not n]
    if advanced and all(self.live_vars[i].get_value() is old[i] for i in advanced):
      raise RuntimeError(_ORDER_HELP)


def make_grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., Any],
    *args: Any,
    wrt: Any = nnx.Param,
    has_aux: bool = False,
    rng_policy: str = "same",
    dynamic_scale: Any = None,
) -> GradFn:
  """Builds a pure AMP ``grad_fn`` for an NNX model, for ``nnx.Optimizer.update``.

  Call it *before* the clean pass, with the clean pass's arguments: it
  snapshots the model and every NNX object among ``args`` (``nnx.Rngs``,
  other modules, metrics), so that the perturbed passes start from the state
  the clean pass started from (same dropout masks; see ``rng_policy``). The
  returned ``grad_fn(params, inner_step)`` takes the pure parameter state
  that ``nnx.Optimizer`` hands to ``tx.update``, merges it into fresh copies
  of the model and of those objects, evaluates ``loss_fn(model_copy,
  *args_copies)`` and returns the gradient; the copies' new state is
  discarded and the live objects are never mutated (the ``"clean"`` policy).
  For the authors' policy use :func:`amp_step`. Bind it to ``amp_grad_fn``:
  Flax's steps use ``grad_fn`` for ``nnx.value_and_grad``.

  If it was called after the clean pass, ``grad_fn`` raises a
  ``RuntimeError`` rather than return gradients from the wrong RNG state and
  statistics.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, amp_optax
    >>> from flax import nnx
    >>> from amp_optax import flax_nnx
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc1 = nnx.Linear(2, 8, rngs=rngs)
    ...     self.bn = nnx.BatchNorm(8, rngs=rngs)
    ...     self.dropout = nnx.Dropout(0.1)
    ...     self.fc2 = nnx.Linear(8, 3, rngs=rngs)
    ...   def __call__(self, x, rngs=None):
    ...     return self.fc2(self.dropout(nnx.relu(self.bn(self.fc1(x))), rngs=rngs))
    >>> model = Net(nnx.Rngs(0))
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1, momentum=0.9))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, batch, rngs):
    ...   logits = model(batch["image"], rngs)
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(
    ...       logits, batch["label"]).mean()
    ...   return loss, logits
    >>> @nnx.jit
    ... def train_step(model, optimizer, rngs, batch):
    ...   amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True)
    ...   grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
    ...   (loss, logits), grads = grad_fn(model, batch, rngs)
    ...   optimizer.update(model, grads, grad_fn=amp_grad_fn)
    ...   return loss
    >>> batch = {"image": jnp.ones((4, 2)), "label": jnp.array([0, 1, 2, 0])}
    >>> rngs = nnx.Rngs(dropout=1)
    >>> loss = train_step(model, optimizer, rngs, batch)
    >>> int(rngs.dropout.count[...])  # advanced by the clean pass only
    1

  Args:
    model: the model, in the state the clean pass will start from.
    loss_fn: ``loss_fn(model, *args)`` returning the loss, or ``(loss, aux)``
      if ``has_aux``.
    *args: the clean pass's other arguments: the batch, and any NNX objects
      (``nnx.Rngs``, modules, metrics), also nested in tuples, lists or
      dicts.
    wrt: the filter of the model's parameters that AMP perturbs; the
      ``wrt`` of the ``nnx.Optimizer``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    rng_policy: ``"same"`` gives the perturbed passes the snapshot's RNG
      state; ``"fold_in"`` folds ``inner_step`` into each of its keys.
    dynamic_scale: the :class:`~flax.training.dynamic_scale.DynamicScale`
      the clean pass used, or ``None``. Each perturbed pass is then
      ``dynamic_scale.value_and_grad``'s (scaled loss, unscaled float32
      gradient), and a non-finite one returns NaN gradients; decide the step
      with :func:`dynamic_scale_after_amp`.

  Returns:
    ``grad_fn(params, inner_step) -> grads``, pure, for
    ``optimizer.update(model, grads, grad_fn=amp_grad_fn)``.
  """
  check_policies("clean", rng_policy)
  _policies.check_dynamic_scale(dynamic_scale, "flax_nnx.make_grad_fn")
  snapshot = _Snapshot(model, args, wrt)
  grad_and_rest = snapshot.perturbed_grad(loss_fn, has_aux, rng_policy, dynamic_scale)

  def grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
    grads, new_state = grad_and_rest(params, inner_step, snapshot.rest)
    snapshot.check_taken_before_clean_pass(new_state)
    return grads

  return grad_fn


def dynamic_scale_after_amp(
    dynamic_scale: Any, is_fin: Any, opt_state: Any,
) -> tuple[Any, jax.Array]:
  """The loss scale after an AMP step, and whether to apply the step.

  The step is to be applied only if the clean gradient (``is_fin``) and every
  perturbed gradient are finite; the scale is updated by ``DynamicScale``'s
  own rule from that joint answer. The perturbed passes' answer is read from
  the optimiser state: with ``make_grad_fn(..., dynamic_scale=...)`` a
  non-finite pass makes the gradient ``amp`` returns NaN. :func:`amp_step`
  with ``dynamic_scale`` calls this itself.

  Args:
    dynamic_scale: the :class:`~flax.training.dynamic_scale.DynamicScale`
      before the step, the one the clean and the perturbed passes used.
    is_fin: whether the clean gradient is finite.
    opt_state: ``optimizer.opt_state`` after ``optimizer.update``, holding
      the state of one :func:`amp_optax.amp`.

  Returns:
    ``(dynamic_scale, is_fin)``: the new scale, and whether the clean and all
    perturbed gradients were finite (keep the step only then).
  """
  return _policies.dynamic_scale_after_amp(dynamic_scale, is_fin, nnx.as_pure(opt_state),
                                           "flax_nnx.dynamic_scale_after_amp")


def _scaled_value_and_grad(loss_fn: Callable[..., Any], has_aux: bool, wrt: Any,
                           dynamic_scale: Any) -> Callable[..., tuple[Any, Any, Any]]:
  """The clean pass on the live objects, ``-> (out, grads, finite)``; scaled as ``DynamicScale``."""
  diff = nnx.DiffState(0, wrt)
  if dynamic_scale is None:
    value_and_grad = nnx.value_and_grad(loss_fn, argnums=diff, has_aux=has_aux)

    def unscaled(*args):
      out, grads = value_and_grad(*args)
      return out, grads, None

    return unscaled

  def scaled_loss(model, *args):
    out = loss_fn(model, *args)
    return dynamic_scale.scale * (out[0] if has_aux else out), out

  value_and_grad = nnx.value_and_grad(scaled_loss, argnums=diff, has_aux=True)

  def scaled(*args):
    (_, out), grads = value_and_grad(*args)
    # DynamicScale's own unscaling: in float32, then divided.
    grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32) / dynamic_scale.scale, grads)
    return out, grads, _common.all_finite(grads)

  return scaled


def amp_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
    stats_policy: str = "clean",
    rng_policy: str = "same",
    dynamic_scale: Any = None,
    tx_kwargs: dict[str, Any] | None = None,
) -> Any:
  """One AMP training step of an NNX model, in place.

  Runs the clean pass ``loss_fn(model, *args)`` on the live objects (the
  model's BatchNorm statistics and the RNG counters advance as in any
  training step, whether the ``nnx.Rngs`` is in the model or among
  ``args``), then ``optimizer.update(model, grads, grad_fn=...)`` with a pure
  ``grad_fn`` for the perturbed passes (see :func:`make_grad_fn`), and
  finally sets the statistics according to ``stats_policy``. Use it inside
  :func:`nnx.jit`.

  With ``dynamic_scale`` (Flax's
  :class:`~flax.training.dynamic_scale.DynamicScale`), the clean and the
  perturbed passes are loss-scaled alike (gradient of ``scale * loss``,
  divided by ``scale`` in float32); when any of their gradients is not
  finite the step is skipped (the parameters and ``optimizer.opt_state``
  are kept; the statistics, RNG counters and ``optimizer.step`` advance, as
  in Flax's ImageNet example) and the scale backs off.

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
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.05), optax.sgd(0.1))
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
    *args: the other arguments of ``loss_fn``: the batch, and any NNX objects
      (``nnx.Rngs``, modules, metrics), as in :func:`make_grad_fn`.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    stats_policy: ``"clean"`` keeps the state the clean pass left;
      ``"authors"`` then applies each perturbed pass's updates of the
      non-RNG, non-parameter variables in turn, as the authors' PyTorch code
      does with BatchNorm statistics (needs ``jax.new_ref``).
    rng_policy: ``"same"`` or ``"fold_in"``, as in :func:`make_grad_fn`.
    dynamic_scale: a :class:`~flax.training.dynamic_scale.DynamicScale`, or
      ``None`` (no loss scaling).
    tx_kwargs: further keyword arguments for ``tx.update``, e.g.
      ``{"value": loss}``.

  Returns:
    The clean pass's loss, or ``(loss, aux)`` if ``has_aux``. With
    ``dynamic_scale``, ``(that, new_dynamic_scale, is_fin)``: ``is_fin`` says
    whether the step was applied.
  """
  check_policies(stats_policy, rng_policy)
  _policies.check_dynamic_scale(dynamic_scale, "flax_nnx.amp_step")
  wrt = optimizer.wrt
  snapshot = _Snapshot(model, args, wrt)  # before the clean pass mutates the live objects.
  grad_and_rest = snapshot.perturbed_grad(loss_fn, has_aux, rng_policy, dynamic_scale)

  def checked_loss(model, *args):
    out = loss_fn(model, *args)
    _policies.check_loss_output(out, has_aux, "flax_nnx.amp_step", _AUX_FORM)
    return out

  if dynamic_scale is not None:  # what a skipped step keeps.
    kept = _variables((nnx.state(model, wrt), optimizer.opt_state))
    kept_values = [var.get_value() for var in kept]
  out, grads, clean_finite = _scaled_value_and_grad(checked_loss, has_aux, wrt, dynamic_scale)(
      model, *args)

  if stats_policy == "clean":

    def grad_fn(params, inner_step):
      grads, _ = grad_and_rest(params, inner_step, snapshot.rest)
      return grads

    optimizer.update(model, grads, grad_fn=grad_fn, **(tx_kwargs or {}))
  else:
    if not hasattr(jax, "new_ref"):
      raise NotImplementedError(
          "stats_policy='authors' carries the perturbed passes' statistics out of tx.update in "
          f"mutable array references (jax.new_ref), which JAX {jax.__version__} lacks. Upgrade "
          "JAX or use stats_policy='clean'.")
    # The clean pass's state (statistics), of the model and of the NNX objects among args.
    refs = [jax.new_ref(var.get_value()) for var in snapshot.live_rest]
    rest_def = jax.tree.structure(snapshot.rest)

    def authors_grad_fn(params, inner_step):
      rest = jax.tree.unflatten(rest_def, [ref[...] for ref in refs])
      grads, (_, new_rest) = grad_and_rest(params, inner_step, rest)
      for ref, value in zip(refs, jax.tree.leaves(new_rest), strict=True):
        ref[...] = value
      return grads

    optimizer.update(model, grads, grad_fn=authors_grad_fn, **(tx_kwargs or {}))
    for var, ref in zip(snapshot.live_rest, refs, strict=True):
      var.set_value(ref[...])
  if dynamic_scale is None:
    return out
  dynamic_scale, finite = dynamic_scale_after_amp(dynamic_scale, clean_finite,
                                                  optimizer.opt_state)
  for var, old in zip(kept, kept_values, strict=True):
    var.set_value(jnp.where(finite, var.get_value(), old))
  return out, dynamic_scale, finite


def grouped_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
    wrt: Any = nnx.Param,
    rng_policy: str = "same",
) -> Callable[..., tuple[Any, Any, GradFn]]:
  """Grouped ascent with NNX: per-group clean passes and gradients, and the ``grad_fn``.

  Every framework's ``grouped_value_and_grad(loss_fn, *, has_aux=False,
  <options>)`` returns a function of ``(params_or_model, *args)`` whose
  result is ``(out, grads, amp_grad_fn)``: ``grads``, the per-group clean
  gradients stacked on a leading group axis, are the ``updates`` of
  :func:`amp_optax.grouped_amp` and ``amp_grad_fn`` its ``grad_fn``.

  Here the function is ``(model, grouped_batch, *args)``. Group ``j``'s
  clean pass is ``loss_fn(model, batch_j, *args)`` on fresh copies of the
  model and of the NNX objects among ``args``, under one :func:`jax.vmap`
  over the groups (BatchNorm with the group's own statistics; keys folded
  with ``j``). Then the live objects are set as a clean pass leaves them, the
  statistics being the mean over groups (see the module's "Grouped ascent").
  Call it in place of ``nnx.value_and_grad``, and pass its ``grads`` and
  ``amp_grad_fn`` to ``optimizer.update``.

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
    >>> tx = optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1))
    >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    >>> def loss_fn(model, batch):
    ...   return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    >>> @nnx.jit
    ... def train_step(model, optimizer, batch):
    ...   losses, grads, amp_grad_fn = flax_nnx.grouped_value_and_grad(loss_fn)(
    ...       model, amp_optax.group_batch(batch, 4))
    ...   optimizer.update(model, grads, grad_fn=amp_grad_fn)
    ...   return losses.mean()
    >>> batch = {"x": jnp.ones((8, 2)), "y": jnp.zeros((8, 1))}
    >>> loss = train_step(model, optimizer, batch)
    >>> int(optimizer.step[...])
    1

  Args:
    loss_fn: ``loss_fn(model, batch, *args)``, the mean loss over the
      examples of ``batch``, or ``(loss, aux)`` if ``has_aux``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    wrt: the filter of the parameters, the ``wrt`` of the ``nnx.Optimizer``.
    rng_policy: within each group, ``"same"`` gives the perturbed passes the
      group's keys, ``"fold_in"`` folds ``inner_step`` into them.

  Returns:
    A function of ``(model, grouped_batch, *args)``: ``model`` the model,
    which after the call holds the clean passes' new state;
    ``grouped_batch`` the batch with a leading group axis
    (:func:`amp_optax.group_batch`), passed to ``loss_fn`` one group at a
    time; ``args`` the loss's other arguments, the same for every group:
    arrays, and NNX objects (``nnx.Rngs``, modules, metrics) as in
    :func:`make_grad_fn`. It returns ``(out, grads, amp_grad_fn)``: ``out``
    the per-group loss (or ``(loss, aux)``) stacked on the group axis;
    ``grads`` the per-group gradients, an ``nnx.State`` of the ``wrt``
    variables with a leading group axis, for ``optimizer.update(model, grads,
    grad_fn=amp_grad_fn)``; ``amp_grad_fn`` pure, taking and returning pure
    stacked states.
  """
  where = "flax_nnx.grouped_value_and_grad"
  check_policies("clean", rng_policy)

  def value_grads_and_grad_fn(
      model: nnx.Module, grouped_batch: Any, *args: Any,
  ) -> tuple[Any, Any, GradFn]:
    groups = _grouped.num_groups_of(grouped_batch, where)
    snapshot = _Snapshot(model, args, wrt)
    param_vars = nnx.state(model, wrt)
    params = nnx.as_pure(param_vars)
    index = jnp.arange(groups)
    group_keys = jax.tree.map(
        lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(index), snapshot.keys)

    def loss_at(params, keys, batch):
      model_copy, args_copy = snapshot.merge(params, keys, snapshot.counts, snapshot.rest)
      out = loss_fn(model_copy, batch, *args_copy)
      _policies.check_loss_output(out, has_aux, where, _AUX_FORM)
      return (out[0] if has_aux else out), (out, snapshot.state_of(model_copy, args_copy))

    (_, (out, new_state)), grads = _grouped.map_over_groups(
        jax.value_and_grad(loss_at, has_aux=True), (None, 0, 0),
        _grouped.varying_like(params, grouped_batch), group_keys, grouped_batch)
    new_counts, new_rest = new_state
    new_leaves = ([x[0] for x in jax.tree.leaves(new_counts)]
                  + _grouped.mean_leaves(jax.tree.leaves(new_rest), groups))
    for var, value in zip(snapshot.live_vars, new_leaves, strict=True):
      var.set_value(value)

    grad = jax.grad(loss_at, has_aux=True)

    def one_group(params, keys, batch, inner_step):
      if rng_policy == "fold_in":
        keys = jax.tree.map(lambda key: jax.random.fold_in(key, inner_step), keys)
      return grad(params, keys, batch)[0]

    def amp_grad_fn(stacked_params: optax.Params, inner_step: Any) -> optax.Updates:
      return _grouped.map_over_groups(one_group, (0, 0, 0, None), stacked_params, group_keys,
                                      grouped_batch, inner_step)

    grad_vars = jax.tree.map(lambda var, g: var.replace(g), param_vars, grads,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    return out, grad_vars, _grouped.HelperGradFn(amp_grad_fn, grad_vars)

  return value_grads_and_grad_fn
