"""AMP with Equinox: ``grad_fn`` for ``tx.update`` from a model and its loss, and a one-call step.

An Equinox step hands Optax ``params = eqx.filter(model, eqx.is_array)`` (or
``eqx.is_inexact_array``): the model's arrays, with ``None`` in place of
everything else (activation functions, pooling operations, flags). AMP's
``grad_fn(params, inner_step)`` receives such a tree, perturbed, so it cannot
call the loss on it directly (``eqx.nn.MaxPool2d`` finds ``None`` where its
operation was): it has to put the static part back (``eqx.combine``). With
stateful layers (``eqx.nn.BatchNorm`` and an ``eqx.nn.State``) it must also
start from the state the clean pass started from, which a ``grad_fn``
closing over ``state`` does not after Equinox's ``(loss, state), grads =
...`` rebinding: it silently reads the state the clean pass returned. This
module provides:

* :func:`value_and_grad`: ``eqx.filter_value_and_grad`` that also returns
  the ``grad_fn`` for ``tx.update``, built from the arguments of the clean
  pass, so the perturbed passes start from the clean pass's own ``State``
  whatever the caller rebinds afterwards. Use this one.
* :func:`make_grad_fn`: that ``grad_fn`` alone, from the model, the loss and
  the clean pass's arguments.
* :func:`amp_step`: the clean pass, ``tx.update`` and
  ``eqx.apply_updates`` in one call.
* :func:`grouped_value_and_grad`: per-group passes for
  :func:`amp_optax.grouped_amp`; an ``eqx.nn.State`` is passed to every
  group as is, and the new state is the mean over groups of the clean
  passes'.

Equinox's MNIST step takes AMP with two changed lines, plus ``amp`` first in
the optimiser's chain and the imports (in all: 3 lines changed, 2 added)::

  +import amp_optax
  +from amp_optax import equinox as amp_eqx
   ...
  -optim = optax.adamw(LEARNING_RATE)
  +optim = optax.chain(amp_optax.amp(epsilon=0.05), optax.adamw(LEARNING_RATE))
   ...
   @eqx.filter_jit
   def make_step(model, opt_state, x, y):
  -    loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
  +    loss_value, grads, amp_grad_fn = amp_eqx.value_and_grad(loss)(model, x, y)
       updates, opt_state = optim.update(
  -        grads, opt_state, eqx.filter(model, eqx.is_array)
  +        grads, opt_state, eqx.filter(model, eqx.is_array), grad_fn=amp_grad_fn
       )
       model = eqx.apply_updates(model, updates)
       return model, opt_state, loss_value

Equinox's stateful step: two lines replaced by four (its ``optim.update(grads,
opt_state)`` gains the ``params`` that AMP perturbs)::

   @eqx.filter_jit
   def make_step(model, state, opt_state, xs, ys):
  -    grads, state = eqx.filter_grad(compute_loss, has_aux=True)(model, state, xs, ys)
  -    updates, opt_state = optim.update(grads, opt_state)
  +    (loss, state), grads, amp_grad_fn = amp_eqx.value_and_grad(compute_loss, has_aux=True)(
  +        model, state, xs, ys)
  +    params = eqx.filter(model, eqx.is_inexact_array)
  +    updates, opt_state = optim.update(grads, opt_state, params, grad_fn=amp_grad_fn)
       model = eqx.apply_updates(model, updates)
       return model, state, opt_state

State policy: the state after the step is the one the clean pass returned;
the perturbed passes start from the state the clean pass started from, and
their new states are discarded. So with ``epsilon=0`` the step is the plain
(ERM) step bit for bit, state included. Randomness passed as an argument (a
dropout ``key``) is the clean pass's in every perturbed pass: the same
dropout masks.

What is checked and what cannot be: :func:`make_grad_fn` keeps the arguments
it is given, so it must be given the clean pass's arguments, i.e. be called
before ``state`` is rebound. Called with the state the clean pass returned,
it cannot tell: an ``eqx.nn.State`` is an immutable value, and the returned
one is as valid as the one the clean pass took (``epsilon=0`` then drifts
from ERM, silently). :func:`value_and_grad` and :func:`amp_step` take the
arguments once, for both passes, so that mistake cannot be written. Checked:
that ``params`` has the model's structure (it is ``eqx.filter`` of the
model), and that ``loss_fn``'s output fits ``has_aux``.
"""

from collections.abc import Callable
from typing import Any

from amp_optax import _extras
from amp_optax import _grouped

try:
  import equinox as eqx
except ModuleNotFoundError as e:
  raise _extras.missing_extra(
      "amp_optax.equinox", e, package="equinox", display_name="Equinox", extra="equinox",
      requirement="equinox>=0.13") from e
import jax
import jax.numpy as jnp
import optax

__all__ = ("amp_step", "grouped_value_and_grad", "make_grad_fn", "value_and_grad")

GradFn = Callable[[optax.Params, Any], optax.Updates]


def _is_none(x: Any) -> bool:
  return x is None


def _check_loss_output(out: Any, has_aux: bool, where: str) -> None:
  """Says what to change when ``loss_fn``'s output does not fit ``has_aux``."""
  is_pair = isinstance(out, (tuple, list)) and len(out) == 2
  if has_aux and not is_pair:
    raise TypeError(
        f"{where}: has_aux=True, so loss_fn must return (loss, aux), e.g. (loss, state); it "
        f"returned {type(out).__name__}. Pass has_aux=False for a loss_fn that returns the "
        "loss alone.")
  if not has_aux and isinstance(out, (tuple, list)):
    raise TypeError(
        f"{where}: loss_fn returned a {type(out).__name__} of length {len(out)}, not a scalar "
        "loss. If it returns (loss, aux), e.g. (loss, state) with eqx.nn.State, pass "
        "has_aux=True.")


def _check_params_fit_model(params: Any, model: Any) -> None:
  """``params`` must be ``eqx.filter(model, ...)``: the model's tree, ``None`` where filtered."""
  # Typed as Any: jaxlib ships no stubs for PyTreeDef, so type checkers cannot compare them.
  want: Any = jax.tree.structure(model, is_leaf=_is_none)
  got: Any = jax.tree.structure(params, is_leaf=_is_none)
  if got != want:
    raise ValueError(
        "amp_optax.equinox: the params that tx.update perturbs are not eqx.filter() of the "
        "model given to make_grad_fn / value_and_grad. Pass the model's arrays, e.g. "
        "tx.update(grads, opt_state, eqx.filter(model, eqx.is_array), grad_fn=amp_grad_fn), "
        "and initialise the optimiser with the same filter.\n"
        f"params: {got}\nmodel:  {want}")


def _gradient_like(params: Any, grads: Any) -> Any:
  """``grads`` in the structure of ``params``: ``None`` where params has ``None``.

  Only floating arrays are differentiated (as by ``eqx.filter_grad``); other
  arrays among ``params`` (integer counters, say) get a zero gradient of their
  own dtype, so the tree matches ``params`` leaf for leaf, as ``amp`` needs.
  """

  def leaf(param, grad):
    if param is None:
      return None
    return jnp.zeros_like(param) if grad is None else grad

  return jax.tree.map(leaf, params, grads, is_leaf=_is_none)


def make_grad_fn(
    model: Any,
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
) -> GradFn:
  """Builds AMP's ``grad_fn`` for an Equinox model, for ``tx.update(..., grad_fn=)``.

  ``grad_fn(params, inner_step)`` takes the perturbed ``params`` that
  ``tx.update`` was given, ``eqx.filter(model, eqx.is_array)`` (or any
  ``eqx.filter`` of the model), puts the rest of the model back with
  ``eqx.combine``, evaluates ``loss_fn(perturbed_model, *args)`` with the
  arguments given here, and returns the gradient with respect to the floating
  arrays of ``params``, in the structure of ``params`` (``None`` where it has
  ``None``). Model arrays that ``params`` leaves out (``None``) are held
  fixed. With ``has_aux=True`` the aux output (the new ``eqx.nn.State``) is
  discarded.

  The arguments are kept as they are now: an ``eqx.nn.State`` among them is
  the state every perturbed pass starts from. So call this with the clean
  pass's own arguments, before rebinding ``state`` to the one the clean pass
  returns; this cannot be checked (see the module's notes). :func:`value_and_grad`
  does both passes from one set of arguments.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax, amp_optax
    >>> from amp_optax import equinox as amp_eqx
    >>> model = eqx.nn.MLP(2, 1, width_size=8, depth=1, key=jax.random.key(0))
    >>> def loss(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> optim = optax.chain(amp_optax.amp(epsilon=0.05), optax.adamw(1e-3))
    >>> opt_state = optim.init(eqx.filter(model, eqx.is_array))
    >>> @eqx.filter_jit
    ... def make_step(model, opt_state, x, y):
    ...   loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
    ...   amp_grad_fn = amp_eqx.make_grad_fn(model, loss, x, y)
    ...   updates, opt_state = optim.update(
    ...       grads, opt_state, eqx.filter(model, eqx.is_array), grad_fn=amp_grad_fn)
    ...   return eqx.apply_updates(model, updates), opt_state, loss_value
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> model, opt_state, loss_value = make_step(model, opt_state, x, y)
    >>> amp_state = opt_state[0]  # AmpState: amp is first in the chain
    >>> print(int(amp_state.count), 0 < float(amp_state.delta_norm) <= 2 * 0.05)  # 4 arrays
    1 True

  Args:
    model: the model (an ``eqx.Module`` or any pytree) at the clean point;
      its non-array parts (activations, pooling operations) are taken from
      here.
    loss_fn: ``loss_fn(model, *args)`` returning the scalar loss, or
      ``(loss, aux)`` (e.g. ``(loss, state)``) if ``has_aux``.
    *args: the clean pass's other arguments: the batch, an ``eqx.nn.State``,
      a dropout key.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``grad_fn(params, inner_step) -> grads``, for ``tx.update(grads,
    opt_state, params, grad_fn=...)``; it may be called several times (K > 1)
    and inside a :func:`jax.lax.fori_loop`.
  """
  # Leaves and structure, not the objects: an eqx.nn.State is invalidated by the first
  # state.set() on it, so each perturbed pass gets a fresh copy.
  arg_leaves, args_def = jax.tree.flatten(args)

  def grad_fn(params: optax.Params, inner_step: Any) -> optax.Updates:
    del inner_step  # the same loss in every ascent step.
    _check_params_fit_model(params, model)
    args_copy = jax.tree.unflatten(args_def, arg_leaves)
    differentiated, fixed = eqx.partition(params, eqx.is_inexact_array)

    def loss_at(differentiated):
      out = loss_fn(eqx.combine(differentiated, fixed, model), *args_copy)
      _check_loss_output(out, has_aux, "amp_optax.equinox.make_grad_fn")
      return out[0] if has_aux else out

    return _gradient_like(params, jax.grad(loss_at)(differentiated))

  return grad_fn


def value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any, GradFn]]:
  """``eqx.filter_value_and_grad`` that also returns AMP's ``grad_fn``.

  ``value_and_grad(loss_fn, has_aux=...)(model, *args)`` returns ``(out,
  grads, amp_grad_fn)``: ``out`` and ``grads`` exactly as
  ``eqx.filter_value_and_grad(loss_fn, has_aux=...)(model, *args)`` returns
  them (the gradient w.r.t. the model's floating arrays, ``None``
  elsewhere), and ``amp_grad_fn`` as :func:`make_grad_fn` builds it from the
  same ``model`` and ``args``. Since both passes take their arguments from
  this one call, the perturbed passes start from the ``eqx.nn.State`` the
  clean pass started from, even when the caller rebinds ``state`` to the
  returned one before ``tx.update`` (as Equinox's stateful example does).
  With ``epsilon=0`` the step is then the ERM step bit for bit.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax, amp_optax
    >>> from amp_optax import equinox as amp_eqx
    >>> class Net(eqx.Module):
    ...   linear: eqx.nn.Linear
    ...   norm: eqx.nn.BatchNorm
    ...   def __init__(self, key):
    ...     self.linear = eqx.nn.Linear(2, 3, key=key)
    ...     self.norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")
    ...   def __call__(self, x, state):
    ...     return self.norm(self.linear(x), state)
    >>> def compute_loss(model, state, xs, ys):
    ...   batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None),
    ...                          out_axes=(0, None))
    ...   pred_ys, state = batch_model(xs, state)
    ...   return jnp.mean((pred_ys - ys) ** 2), state
    >>> model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    >>> optim = optax.chain(amp_optax.amp(epsilon=0.05), optax.adam(1e-3))
    >>> opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    >>> @eqx.filter_jit
    ... def make_step(model, state, opt_state, xs, ys):
    ...   (loss, state), grads, amp_grad_fn = amp_eqx.value_and_grad(
    ...       compute_loss, has_aux=True)(model, state, xs, ys)
    ...   params = eqx.filter(model, eqx.is_inexact_array)
    ...   updates, opt_state = optim.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    ...   return eqx.apply_updates(model, updates), state, opt_state
    >>> xs, ys = jnp.ones((4, 2)), jnp.zeros((4, 3))
    >>> model, state, opt_state = make_step(model, state, opt_state, xs, ys)

  Args:
    loss_fn: ``loss_fn(model, *args)`` returning the scalar loss, or
      ``(loss, aux)`` (e.g. ``(loss, state)``) if ``has_aux``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A function of ``(model, *args)`` returning ``(out, grads, amp_grad_fn)``,
    where ``out`` is the loss, or ``(loss, aux)`` if ``has_aux``.
  """

  def checked_loss(model, *args):
    out = loss_fn(model, *args)
    _check_loss_output(out, has_aux, "amp_optax.equinox.value_and_grad")
    return out

  def value_grads_and_grad_fn(model: Any, *args: Any) -> tuple[Any, Any, GradFn]:
    # Built first: it keeps the arguments before anything can consume or rebind them.
    amp_grad_fn = make_grad_fn(model, loss_fn, *args, has_aux=has_aux)
    out, grads = eqx.filter_value_and_grad(checked_loss, has_aux=has_aux)(model, *args)
    return out, grads, amp_grad_fn

  return value_grads_and_grad_fn


def grouped_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
) -> Callable[..., tuple[Any, Any, GradFn]]:
  """Per-group losses and gradients of a model, and the ``grad_fn`` for grouped AMP.

  Every framework's ``grouped_value_and_grad(loss_fn, *, has_aux=False,
  <options>)`` returns a function of ``(params_or_model, *args)`` whose
  result is ``(out, grads, amp_grad_fn)``: ``grads``, the per-group clean
  gradients stacked on a leading group axis, are the ``updates`` of
  :func:`amp_optax.grouped_amp` and ``amp_grad_fn`` its ``grad_fn``.

  Here the function is ``(model, *grouped_args)`` (one Delta per group of
  examples): it vmaps ``loss_fn(model, *args)`` over the leading group axis
  of the arguments (split a batch with :func:`amp_optax.group_batch`) and
  returns the per-group loss (or ``(loss, aux)``) and gradients w.r.t. the
  model's floating arrays (``None`` elsewhere, as ``eqx.filter_grad``
  gives), stacked on the group axis, and the ``grad_fn`` that evaluates each
  group's gradient at its own perturbed parameters. Pass
  ``eqx.filter(model, eqx.is_inexact_array)`` as the params of ``tx.update``.

  Stateful models (``eqx.nn.BatchNorm`` with an ``eqx.nn.State``), with the
  policy of :func:`amp_optax.flax_linen.grouped_value_and_grad`:

  * An ``eqx.nn.State`` among the arguments (at the top level or inside one)
    is not grouped: every group gets it as it is (``jax.vmap`` with
    ``in_axes=None``); every other argument has the leading group axis. Pass
    the state as it is, not through :func:`amp_optax.group_batch`: a State
    whose arrays were given a group axis is still broadcast, not split.
  * Each group's clean pass is ``loss_fn(model, *args)`` on its own examples,
    so a BatchNorm that the loss vmaps over the examples (``axis_name``)
    normalises with the group's statistics (ghost batch norm), every group
    starting from the incoming state.
  * With ``has_aux=True`` (the loss returns ``(loss, state)``, or ``(loss,
    aux)`` with States in ``aux``) each ``eqx.nn.State`` in the returned
    ``aux`` is the mean over groups of the groups' new states (floating
    arrays averaged, others group 0's): the state for the next step. The
    rest of ``aux`` and the loss (shape ``(G,)``) stay stacked per group.
  * ``amp_grad_fn`` starts every group's perturbed pass from the incoming
    state (each pass gets its own copy), never from the clean pass's new
    one, and discards the perturbed passes' new states. So with
    ``epsilon=0`` the step is ERM on the ghost-BN loss (the mean over
    groups of each group's gradient), state included.

  An ``eqx.nn.State`` among the arguments with ``has_aux=False`` raises a
  ``TypeError``: the new state would be lost.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax, amp_optax
    >>> from amp_optax import equinox as amp_eqx
    >>> model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8,))
    >>> tx = optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1))
    >>> params = eqx.filter(model, eqx.is_inexact_array)
    >>> losses, grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(loss_fn)(
    ...     model, *amp_optax.group_batch((x, y), 4))
    >>> updates, opt_state = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
    >>> losses.shape, updates.weight.shape
    ((4,), (1, 3))

    A stateful model: the state is passed as it is, the batch grouped.

    >>> class Net(eqx.Module):
    ...   linear: eqx.nn.Linear
    ...   norm: eqx.nn.BatchNorm
    ...   def __init__(self, key):
    ...     self.linear = eqx.nn.Linear(2, 3, key=key)
    ...     self.norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")
    ...   def __call__(self, x, state):
    ...     return self.norm(self.linear(x), state)
    >>> def compute_loss(model, state, xs, ys):
    ...   batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None),
    ...                          out_axes=(0, None))
    ...   pred_ys, state = batch_model(xs, state)
    ...   return jnp.mean((pred_ys - ys) ** 2), state
    >>> model, state = eqx.nn.make_with_state(Net)(jax.random.key(0))
    >>> optim = optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1))
    >>> opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    >>> @eqx.filter_jit
    ... def make_step(model, state, opt_state, xs, ys):
    ...   (losses, state), grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(
    ...       compute_loss, has_aux=True)(model, state, *amp_optax.group_batch((xs, ys), 4))
    ...   params = eqx.filter(model, eqx.is_inexact_array)
    ...   updates, opt_state = optim.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    ...   return eqx.apply_updates(model, updates), state, opt_state, losses
    >>> xs = jax.random.normal(jax.random.key(1), (16, 2))
    >>> model, state, opt_state, losses = make_step(model, state, opt_state, xs, xs[:, :1])
    >>> losses.shape, state.get(model.norm.batch_state_index)[0].shape  # one state, not 4
    ((4,), (3,))

  Args:
    loss_fn: ``loss_fn(model, *args)`` returning one group's mean loss, or
      ``(loss, aux)`` (e.g. ``(loss, state)``) if ``has_aux``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; required with an
      ``eqx.nn.State`` among the arguments.

  Returns:
    A function of ``(model, *grouped_args)`` returning ``(out, grads,
    amp_grad_fn)``: ``out`` the per-group loss, or ``(loss, aux)`` with each
    ``eqx.nn.State`` of ``aux`` averaged over groups; ``grads`` the per-group
    gradients (``updates`` for ``grouped_amp``); ``amp_grad_fn`` for
    ``tx.update(..., grad_fn=)``.
  """
  where = "amp_optax.equinox.grouped_value_and_grad"

  def is_state(x: Any) -> bool:
    return isinstance(x, eqx.nn.State)

  def has_state(tree: Any) -> bool:
    return any(map(is_state, jax.tree.leaves(tree, is_leaf=is_state)))

  def group_axes(arg: Any) -> Any:
    """vmap's in_axes for one argument: ``None`` (broadcast) at each State, 0 elsewhere."""
    if not has_state(arg):
      return 0
    return jax.tree.map(lambda x: None if is_state(x) else 0, arg, is_leaf=is_state)

  def mean_states(aux: Any, groups: int) -> Any:
    """Each State of ``aux`` (stacked on the group axis) averaged over groups."""
    def mean(x):
      if not is_state(x):
        return x
      leaves, treedef = jax.tree.flatten(x)
      return jax.tree.unflatten(treedef, _grouped.mean_leaves(leaves, groups))
    return jax.tree.map(mean, aux, is_leaf=is_state)

  def value_grads_and_grad_fn(model: Any, *grouped_args: Any) -> tuple[Any, Any, GradFn]:
    stateful = has_state(grouped_args)
    if stateful and not has_aux:
      raise TypeError(
          f"{where}(): an eqx.nn.State is among the arguments but has_aux=False, so the new "
          "state that loss_fn returns would be lost. Pass has_aux=True with a loss_fn that "
          "returns (loss, state) (or (loss, aux) with the State in aux); has_aux=False is for "
          "stateless models only.")
    params, static = eqx.partition(model, eqx.is_inexact_array)
    # Leaves and structure, not the objects: an eqx.nn.State is invalidated by the first
    # state.set() on it, so every pass (clean and perturbed) gets a fresh copy of the arguments.
    arg_leaves, args_def = jax.tree.flatten(grouped_args)

    def args_for_a_pass() -> Any:
      return jax.tree.unflatten(args_def, arg_leaves) if stateful else grouped_args

    def loss_of_params(p, *args):
      out = loss_fn(eqx.combine(p, static), *args)
      _check_loss_output(out, has_aux, where)
      return out

    axes = tuple(group_axes(arg) for arg in grouped_args)
    value_and_grad = jax.value_and_grad(loss_of_params, has_aux=has_aux)
    out, grads = _grouped.map_over_groups(
        value_and_grad, (None, *axes), _grouped.varying_like(params, grouped_args),
        *args_for_a_pass())
    if has_aux:
      loss, aux = out
      out = (loss, mean_states(aux, jnp.shape(loss)[0]))
    grad = jax.grad(loss_of_params, has_aux=has_aux)

    def amp_grad_fn(stacked_params: optax.Params, inner_step: Any) -> optax.Updates:
      del inner_step
      # From the incoming state: the perturbed passes' new states (the aux) are discarded.
      grads = _grouped.map_over_groups(grad, (0, *axes), stacked_params, *args_for_a_pass())
      return grads[0] if has_aux else grads

    return out, grads, _grouped.HelperGradFn(amp_grad_fn, grads)

  return value_grads_and_grad_fn


def amp_step(
    model: Any,
    opt_state: optax.OptState,
    tx: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    *args: Any,
    has_aux: bool = False,
    tx_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, optax.OptState, Any]:
  """One AMP training step of an Equinox model: clean pass, ``tx.update``, apply.

  The parameters are ``eqx.filter(model, eqx.is_inexact_array)``: initialise
  the optimiser state with ``tx.init(eqx.filter(model,
  eqx.is_inexact_array))`` (the same tree as ``eqx.is_array`` for a model
  whose arrays are all floating, like Equinox's MNIST CNN). Use it inside
  ``eqx.filter_jit``.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp, optax, amp_optax
    >>> from amp_optax import equinox as amp_eqx
    >>> model = eqx.nn.MLP(2, 1, width_size=8, depth=1, key=jax.random.key(0))
    >>> def loss(model, x, y):
    ...   return jnp.mean((jax.vmap(model)(x) - y) ** 2)
    >>> tx = optax.chain(amp_optax.amp(epsilon=0.05, inner_steps=2), optax.adamw(1e-2))
    >>> opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    >>> make_step = eqx.filter_jit(amp_eqx.amp_step)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> model, opt_state, first = make_step(model, opt_state, tx, loss, x, y)
    >>> for _ in range(20):
    ...   model, opt_state, loss_value = make_step(model, opt_state, tx, loss, x, y)
    >>> bool(loss_value < first)
    True

  Args:
    model: the model; a new one is returned.
    opt_state: the state of ``tx``.
    tx: an Optax transformation with :func:`amp_optax.amp` first in its
      :func:`optax.chain`.
    loss_fn: ``loss_fn(model, *args)`` returning the scalar loss, or
      ``(loss, aux)`` (e.g. ``(loss, state)``) if ``has_aux``.
    *args: the other arguments of ``loss_fn``: the batch, an ``eqx.nn.State``,
      a dropout key.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    tx_kwargs: further keyword arguments for ``tx.update``, e.g.
      ``{"value": loss}``.

  Returns:
    ``(model, opt_state, out)``: the updated model and optimiser state, and
    the clean pass's loss, or ``(loss, aux)`` if ``has_aux`` (the new
    ``eqx.nn.State`` is the aux of a stateful loss).
  """
  out, grads, amp_grad_fn = value_and_grad(loss_fn, has_aux=has_aux)(model, *args)
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn,
                                 **(tx_kwargs or {}))
  return eqx.apply_updates(model, updates), opt_state, out
