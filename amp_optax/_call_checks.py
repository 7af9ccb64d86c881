"""Checks of how ``amp``'s ``update`` is called, with errors that say what to change.

Everything here runs at trace time (Python values, shapes and the call stack), so none of it
costs anything in the compiled step.
"""

from collections.abc import Iterator
import functools
import inspect
import sys
from types import FrameType
from typing import Any

import jax
import numpy as np
import optax

GRAD_FN_HELP = (
    "Pass the loss gradient as a keyword argument, e.g.\n"
    "    loss, grads = jax.value_and_grad(loss_fn)(params, batch)\n"
    "    updates, opt_state = tx.update(\n"
    "        grads, opt_state, params,\n"
    "        grad_fn=jax.grad(lambda p, _: loss_fn(p, batch)))\n"
    "grad_fn(params, inner_step) must return gradients shaped like params; inner_step is the\n"
    "index of the ascent step (0, 1, ...), not a batch: close over the batch."
)

_FLAX_TRAIN_STATE_HELP = (
    "Flax's flax.training.train_state.TrainState.apply_gradients does not pass grad_fn on to\n"
    "tx.update (it takes it for a field to replace). Use amp_optax.flax_linen.TrainState, a\n"
    "drop-in subclass whose apply_gradients forwards it:\n"
    "    from amp_optax.flax_linen import TrainState\n"
    "    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)\n"
    "    state = state.apply_gradients(grads=grads, grad_fn=amp_grad_fn)"
)

_MULTISTEPS_HELP = (
    "amp() is inside optax.MultiSteps: the ascent would start from the gradient accumulated\n"
    "over all micro-batches, but grad_fn is the one passed with the last micro-batch, so the\n"
    "update would use only that micro-batch's data. Pick one of:\n"
    "  * per-micro-batch AMP (each micro-batch ascends from its own gradient; the perturbed\n"
    "    gradients are accumulated): put amp outside the accumulation,\n"
    "        accumulate = optax.MultiSteps(base, k).gradient_transformation()\n"
    "        tx = optax.chain(amp_optax.amp(eps), accumulate)\n"
    "  * full-batch AMP: no MultiSteps; compute the clean gradient and grad_fn over the whole\n"
    "    batch in micro-batches, e.g. with optax.microbatching.microbatch(jax.grad(loss_fn),\n"
    "    argnums=1, microbatch_size=m, accumulator=optax.microbatching.AccumulationType.MEAN).\n"
    "If your grad_fn already averages over every micro-batch of the accumulated batch, mark it:\n"
    "    grad_fn=amp_optax.covers_accumulated_batch(grad_fn)"
)

# The attribute that marks a grad_fn (see covers_accumulated_batch).
_COVERS_ACCUMULATED_BATCH = "amp_covers_accumulated_batch"

_MASKED_HELP = (
    "amp() was given params with optax.MaskedNode entries: it is inside optax.masked,\n"
    "optax.multi_transform or optax.partition, which hide the other parameters from it, so\n"
    "grad_fn cannot be evaluated at the full parameters. Put amp first in the chain, outside\n"
    "the wrapper, and choose the perturbed parameters with its own mask:\n"
    "    tx = optax.chain(amp_optax.amp(eps, mask=mask), optax.multi_transform(...))"
)


def covers_accumulated_batch(grad_fn: Any) -> Any:
  """Marks a ``grad_fn`` as averaging over every micro-batch of an accumulated batch.

  :func:`amp` raises an error when it runs inside :class:`optax.MultiSteps`,
  because the ``grad_fn`` given with the last micro-batch normally sees only
  that micro-batch. A ``grad_fn`` that evaluates the gradient over all the
  micro-batches accumulated so far (full-batch AMP) is right there; wrapping
  it with this function says so and lets the update run.

  Args:
    grad_fn: ``grad_fn(params, inner_step) -> grads``.

  Returns:
    A function that calls ``grad_fn`` and is marked for :func:`amp`.
  """

  def marked(params: Any, inner_step: Any) -> Any:
    return grad_fn(params, inner_step)

  setattr(marked, _COVERS_ACCUMULATED_BATCH, True)
  return marked


def _frames() -> Iterator[FrameType]:
  frame: FrameType | None = sys._getframe(2)  # noqa: SLF001 -- the caller's caller; trace time only.
  while frame is not None:
    yield frame
    frame = frame.f_back


# Where a transform stands among optax's combinators is read from their update frames: optax
# exposes no other way for a transform to learn what runs before or after it in a chain, and the
# composition errors below are about exactly that. The frames are recognised by their code
# objects (not by names or file paths), so a renamed or moved optax function is simply not
# recognised (the check then passes) rather than misread. Trace time only.


def _update_code(make: Any) -> Any:
  try:
    return make().update.__code__
  except Exception:  # an optax without this combinator, or with another structure.
    return None


@functools.cache
def _combinator_codes() -> dict[str, Any]:
  identity = optax.identity()
  codes = {
      "chain": _update_code(lambda: optax.chain(identity)),
      "named_chain": _update_code(lambda: optax.named_chain(("a", identity))),
      "lookahead": _update_code(lambda: optax.lookahead(identity, 2, 0.5)),
  }
  return {name: code for name, code in codes.items() if code is not None}


def chain_positions() -> list[tuple[int, int]]:
  """``(index, length)`` of the calling transform in each enclosing optax chain, innermost first.

  In ``chain``'s and ``named_chain``'s update loop, ``new_state`` holds the
  states of the transforms that already ran, and ``state`` all of them.
  """
  codes = _combinator_codes()
  chains = {codes.get("chain"), codes.get("named_chain")} - {None}
  positions = []
  for frame in _frames():
    if frame.f_code in chains:
      done, state = frame.f_locals.get("new_state"), frame.f_locals.get("state")
      if done is not None and state is not None:
        positions.append((len(done), len(state)))
  return positions


def in_lookahead() -> bool:
  code = _combinator_codes().get("lookahead")
  return code is not None and any(frame.f_code is code for frame in _frames())


def check_first_in_chain(where: str) -> None:
  """``amp`` replaces the gradient it is given: anything before it in a chain would be lost."""
  for index, length in chain_positions():
    if index:
      raise ValueError(
          f"{where} is transform {index + 1} of {length} in an optax.chain, but it must be "
          "first: it replaces the gradient it receives with the gradient at theta + Delta, so "
          f"what the {index} transform(s) before it did to the gradient (clipping, weight "
          "decay, Adam's scaling, ...) would be lost, and its ascent would start from their "
          "output instead of the gradient. Put amp first and the others after it, e.g.\n"
          "    optax.chain(amp_optax.amp(eps), optax.clip_by_global_norm(1.0), optax.adamw(lr))")


def check_last_in_chain(where: str) -> None:
  """``drop_in_amp``'s updates move the parameters to exact points: nothing may change them."""
  for index, length in chain_positions():
    if index != length - 1:
      raise ValueError(
          f"{where} is transform {index + 1} of {length} in an optax.chain, but it must be "
          "last: its updates move the parameters to theta + Delta and back, and the "
          f"{length - index - 1} transform(s) after it would change those moves (a scaled "
          "move is not an ascent of radius epsilon, and the parameters would not return to "
          "theta). Put them inside, in the base optimiser:\n"
          "    amp_optax.drop_in_amp(optax.chain(<the transforms>, base), eps)")
  if in_lookahead():
    raise ValueError(
        f"{where} is inside optax.lookahead, which would sync its slow weights with the "
        "parameters while drop_in_amp holds them at theta + Delta. Use the grad_fn mode "
        "instead, optax.chain(amp_optax.amp(eps), base), which never moves the parameters "
        "off theta (lookahead must then forward grad_fn: see the accumulation guide).")
  if _in_multisteps():
    raise ValueError(
        f"{where} is inside optax.MultiSteps, which would add up its moves to theta + Delta "
        "and back over micro-batches. Accumulate inside the base optimiser instead: "
        "amp_optax.drop_in_amp(optax.MultiSteps(base, k).gradient_transformation(), eps), or "
        "use the grad_fn mode with accumulation (the accumulation guide).")


def _in_multisteps() -> bool:
  multi_steps = getattr(optax, "MultiSteps", None)
  return multi_steps is not None and any(
      frame.f_code.co_name == "update" and isinstance(frame.f_locals.get("self"), multi_steps)
      for frame in _frames())


def check_not_in_multisteps(grad_fn: Any) -> None:
  """Raises if ``amp.update`` runs inside ``optax.MultiSteps.update`` (trace time)."""
  if getattr(grad_fn, _COVERS_ACCUMULATED_BATCH, False):
    return
  if _in_multisteps():
    raise ValueError(_MULTISTEPS_HELP)


def missing_grad_fn_error(where: str = "amp()") -> ValueError:
  """The error for a call without ``grad_fn``, naming Flax's TrainState when it is the cause."""
  if in_lookahead():
    return ValueError(
        f"{where}: update() got no `grad_fn`: optax.lookahead calls its inner optimiser without "
        "extra arguments, so a grad_fn passed to the outer update never reaches amp. Wrap the "
        "inner chain so that lookahead is not between them, or pass grad_fn to the inner "
        "optimiser's update yourself.")
  for frame in _frames():
    if (frame.f_code.co_name == "apply_gradients"
        and "grad_fn" in (frame.f_locals.get("kwargs") or {})):
      return ValueError(
          f"{where}: update() needs `grad_fn`, and you passed it to apply_gradients, but "
          + _FLAX_TRAIN_STATE_HELP)
  return ValueError(
      f"{where}: update() needs `grad_fn`, the gradient of the loss at other parameters.\n"
      + GRAD_FN_HELP + "\nWith Flax Linen's TrainState use amp_optax.flax_linen.TrainState,"
      " whose apply_gradients forwards grad_fn; with nnx.Optimizer pass it to"
      " optimizer.update(model, grads, grad_fn=amp_grad_fn). A step written for"
      " optax.contrib.sam that passes grad_fn only `if isinstance(state, SAMState)`, or uses"
      " SAM's default mode, must always pass it (plain Optax optimisers accept and ignore it);"
      " for a step that cannot pass one, use amp_optax.drop_in_amp(base, epsilon).")


def check_ascend(where: str, ascend: Any) -> bool:
  """``ascend`` (an extra argument of ``update``): ``None`` means True; else a Python bool."""
  if ascend is None:
    return True
  if not isinstance(ascend, (bool, np.bool_)):
    raise TypeError(
        f"{where}: `ascend` must be a Python bool, known when the step is traced; got "
        f"{ascend!r}. Make it a static argument of your jitted step, e.g. "
        "jax.jit(train_step, static_argnames='ascend').")
  return bool(ascend)


def check_update_call(where: str, args: tuple[Any, ...], params: Any, grad_fn: Any,
                      ascend: bool) -> None:
  """What every ascending ``update`` needs: params, a ``grad_fn`` by keyword, no MultiSteps."""
  if args:
    raise TypeError(
        f"{where}: update() takes grad_fn as a keyword argument, not positionally: "
        "tx.update(grads, opt_state, params, grad_fn=grad_fn).")
  if ascend and grad_fn is None:
    raise missing_grad_fn_error(where)
  if params is None:
    raise ValueError(
        f"{where}: update() needs `params` (the point the ascent starts from): "
        "tx.update(grads, opt_state, params, grad_fn=...).")
  check_no_masked_nodes(params)
  if grad_fn is not None:
    check_not_in_multisteps(grad_fn)
    check_grad_fn_signature(where, grad_fn)


def check_no_masked_nodes(params: Any) -> None:
  masked_node = getattr(optax, "MaskedNode", None)
  if masked_node is None:
    return
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, masked_node))
  if any(isinstance(x, masked_node) for x in leaves):
    raise ValueError(_MASKED_HELP)


def check_grad_fn_signature(where: str, grad_fn: Any) -> None:
  """Raises a TypeError if ``grad_fn`` cannot be called as ``grad_fn(params, inner_step)``."""
  if not callable(grad_fn):
    raise TypeError(f"{where}: `grad_fn` must be callable, got {grad_fn!r}.\n" + GRAD_FN_HELP)
  try:
    signature = inspect.signature(grad_fn)
  except (TypeError, ValueError):
    return  # no signature to read (a builtin or C function): let the call decide.
  try:
    signature.bind(None, 0)
  except TypeError as e:
    raise TypeError(
        f"{where}: grad_fn{signature} cannot be called as grad_fn(params, inner_step) ({e}).\n"
        + GRAD_FN_HELP) from e


def note_grad_fn_failure(error: BaseException) -> None:
  """Adds to an exception raised inside ``grad_fn`` how ``amp`` called it (Python >= 3.11)."""
  if hasattr(error, "add_note"):
    error.add_note(
        "(raised inside the grad_fn that amp_optax.amp called as grad_fn(perturbed_params, "
        "inner_step), inner_step an int step index.)\n" + GRAD_FN_HELP + "\nIf the function "
        "you passed is your step's own gradient function (Flax's examples name "
        "jax.value_and_grad(...) or nnx.value_and_grad(...) `grad_fn`), pass the AMP builder's "
        "result instead, under a name that cannot collide: grad_fn=amp_grad_fn.")


def check_leaves_match(where: str, what: str, leaves: list[Any], params: Any, fix: str) -> None:
  """Shapes of ``leaves`` (flattened like ``params``) must equal the params' shapes."""
  with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
  for (path, param), leaf in zip(with_paths, leaves):
    got, want = jax.numpy.shape(leaf), jax.numpy.shape(param)
    if got != want:
      raise ValueError(
          f"{where}: {what} has shape {got} at params{jax.tree_util.keystr(path)}, where the "
          f"parameter has shape {want}. {fix}")
