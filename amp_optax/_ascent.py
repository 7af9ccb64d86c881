"""The AMP ascent itself: the ball, one projected ascent step, and K of them.

Pure functions on lists of arrays (the perturbed parameter leaves, in order).
The ``grad_fn`` mode of :func:`amp_optax.amp` runs all ``K`` steps in one
``update``; the drop-in mode runs one step per ``update`` call; grouped ascent
maps :func:`ascend` over groups. All of them call these functions, so the
step, the projection and the radius are written once.

Arithmetic is in at least float32 (float64 stays float64): an fp16 step
``inner_lr * g`` may overflow before the projection brings it back into the
ball, so ``Delta`` is carried in the accumulation dtype and cast to each
parameter's dtype only when it is added.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

from amp_optax import _common
from amp_optax import _projection

Leaves = list[Any]


class Ball(NamedTuple):
  """The norm ball Delta is projected onto.

  Attributes:
    norm: ``"per_tensor"`` (each leaf's norm bounded) or ``"global"``.
    radius: a scalar (absolute radius, or the global relative one) or a list
      with one scalar per leaf (per-tensor relative radius).
  """

  norm: str
  radius: Any


def make_ball(param_leaves: Leaves, epsilon: Any, norm: str, relative: bool) -> Ball:
  """The ball of radius ``epsilon``, or ``epsilon * ||theta||`` if ``relative``."""
  if not relative:
    return Ball(norm, epsilon)
  if norm == "per_tensor":
    return Ball(norm, [epsilon * _projection.l2_norm(p) for p in param_leaves])
  return Ball(norm, epsilon * _projection.global_l2_norm(param_leaves))


def project(ball: Ball, delta: Leaves) -> Leaves:
  if ball.norm == "per_tensor":
    return _projection.project_per_tensor(delta, ball.radius)
  return _projection.project_global(delta, ball.radius)


def zeros(param_leaves: Leaves) -> Leaves:
  """Delta = 0 in the ascent's dtype; ``zeros_like`` keeps the parameters' shardings."""
  return [jnp.zeros_like(p, _projection.accumulation_dtype(p.dtype)) for p in param_leaves]


def step(ball: Ball, inner_lr: Any, delta: Leaves, grads: Leaves) -> Leaves:
  """One ascent step: ``Proj(Delta + inner_lr * g)``."""
  return project(ball, [d + inner_lr * g.astype(d.dtype) for d, g in zip(delta, grads)])


def first_step_factors(ball: Ball, inner_lr: Any, grads: Leaves) -> tuple[list[Any], jax.Array]:
  """Delta_1 = Proj(inner_lr * g) as one factor per leaf: Delta_1[i] = g[i] * f[i].

  From Delta = 0 the projected step is the gradient scaled, per tensor or all
  leaves alike, so ``theta + Delta_1`` is formed from ``g`` in one pass and no
  Delta buffer is kept; its norm follows from the factors and the gradient's
  norms. (``inner_lr >= 0``, so ``||inner_lr * g|| = inner_lr * ||g||``.)

  Returns:
    The factors ``f`` (one per leaf, float32 or wider) and the global L2 norm
    of Delta_1 (float32).
  """
  grad_norms = [_projection.l2_norm(g) for g in grads]
  if ball.norm == "per_tensor" and grads:
    # The factors from one vector of all the leaves' norms, so that each depends on every
    # gradient: XLA then forms theta + Delta_1 once the clean backward pass is over, just
    # before the perturbed pass, as with the global ball and SAM. With a scalar chain per
    # leaf it formed each leaf's theta + Delta_1 as soon as that leaf's gradient was out,
    # in the middle of the clean backward pass: the same live bytes, but staggered buffers
    # that fragment XLA:CPU's heap (+0.3 parameter copies of temporary memory on
    # PreActResNet-18, benchmarks/step_memory.py). The arithmetic must be done on the vector
    # before the slices: XLA folds a slice of the stack itself back into the leaf's own norm.
    # It is elementwise, so each factor rounds as it did when computed alone.
    norms = jnp.stack(grad_norms)
    radius = ball.radius
    if isinstance(radius, list):
      radius = jnp.stack([jnp.asarray(r, norms.dtype) for r in radius])
    step_norms = inner_lr * norms
    scales = _projection.ball_scale(step_norms, radius)
    factors = inner_lr * scales
    delta_norm = jnp.sqrt(jnp.sum(jnp.square(step_norms * scales)))
    # Each factor in its own leaf's accumulation dtype (float32 and float64 leaves stack as
    # float64).
    return ([factors[i].astype(n.dtype) for i, n in enumerate(grad_norms)],
            delta_norm.astype(jnp.float32))
  if ball.norm == "per_tensor" or not grads:  # no leaves to perturb
    return [], jnp.zeros((), jnp.float32)
  step_norm = inner_lr * _projection.global_l2_norm(grads)
  scale = _projection.ball_scale(step_norm, ball.radius)
  return [inner_lr * scale] * len(grads), jnp.asarray(step_norm * scale).astype(jnp.float32)


def perturb(param_leaves: Leaves, delta: Leaves, chosen: list[int],
            groups: int | None = None) -> Leaves:
  """``theta + Delta`` on the ``chosen`` leaves, each in the parameter's own dtype.

  With ``groups``, ``delta`` has a leading group axis and every leaf of the
  result is stacked per group (unperturbed leaves broadcast).
  """
  leaves = list(param_leaves)
  for i, d in zip(chosen, delta):
    leaves[i] = leaves[i] + d.astype(leaves[i].dtype)
  if groups is not None:
    leaves = [jnp.broadcast_to(x, (groups,) + jnp.shape(p)) for x, p in zip(leaves, param_leaves)]
  return leaves


def _per_group(fn: Callable[..., Any], groups: int | None, in_axes: Any) -> Callable[..., Any]:
  """``fn`` itself, or mapped over the leading group axis of the ``in_axes`` marked 0."""
  return fn if groups is None else jax.vmap(fn, in_axes=in_axes)


def _times(g: jax.Array, f: jax.Array) -> jax.Array:
  """``g * f`` with one factor (or one per group, on ``g``'s leading axis)."""
  f = jnp.reshape(f, jnp.shape(f) + (1,) * (g.ndim - jnp.ndim(f)))
  return g.astype(f.dtype) * f


def ascend(
    param_leaves: Leaves,
    clean_grads: Leaves,
    grads_at: Callable[[Leaves, Any], Leaves],
    *,
    chosen: list[int],
    ball: Ball,
    inner_lr: Any,
    num_steps: int,
    unroll: int | bool,
    groups: int | None = None,
) -> tuple[Leaves, jax.Array]:
  """``K`` steps of projected gradient ascent from Delta = 0.

  Args:
    param_leaves: the parameters theta, a list of arrays.
    clean_grads: the gradient at theta, one array per leaf: the first ascent
      direction. With ``groups``, one per group, stacked on a leading axis.
    grads_at: ``grads_at(perturbed_leaves, inner_step)`` returns the
      gradient at ``theta + Delta`` (all leaves; with ``groups``, stacked
      like ``clean_grads``, one gradient per group at its own perturbation).
    chosen: the indices of the leaves that are perturbed; the others keep
      Delta = 0.
    ball: the ball Delta (over the chosen leaves) is projected onto; with
      ``groups``, each group's Delta is projected onto it separately.
    inner_lr: the ascent's step size.
    num_steps: ``K >= 1``.
    unroll: the ``unroll`` of the ``K > 1`` loop.
    groups: ``None`` (one Delta), or the number ``G`` of groups, each with
      its own Delta from its own gradients.

  Returns:
    The gradient at ``theta + Delta_K`` (all leaves, in the dtypes of
    ``clean_grads``; with ``groups``, stacked per group) and the L2 norm of
    Delta_K over all leaves (float32; with ``groups``, one per group).
  """
  if num_steps == 1:
    # theta + Delta_1 straight from the clean gradient: the memory of SAM's step, no Delta.
    factors, delta_norm = _per_group(
        lambda g: first_step_factors(ball, inner_lr, g), groups, 0)(
            [clean_grads[i] for i in chosen])
    delta = [_times(clean_grads[i], f) for i, f in zip(chosen, factors)]
    perturbed = perturb(param_leaves, delta, chosen, groups)
    grads = grads_at(perturbed, 0)
    # In the clean gradient's dtypes, as the K > 1 loop (whose carry keeps them) returns.
    grads = [n.astype(g.dtype) if _common.inexact(g) else n for n, g in zip(grads, clean_grads)]
    return grads, _as_applied(delta_norm, perturbed, param_leaves, chosen, groups)

  step_each = _per_group(lambda d, g: step(ball, inner_lr, d, g), groups, (0, 0))

  def body(k, carry):
    delta, grads = carry
    delta = step_each(delta, [grads[i] for i in chosen])
    new = grads_at(perturb(param_leaves, delta, chosen, groups), k)
    # A loop carry must keep its dtypes, whatever the gradient function returns.
    return delta, [n.astype(g.dtype) if _common.inexact(g) else n for n, g in zip(new, grads)]

  # zeros_like keeps the shardings (a loop carry must not change type): the parameters', or
  # with groups the stacked gradients' (the group axis sharded as the batch).
  like = param_leaves if groups is None else clean_grads
  delta0 = [jnp.zeros_like(like[i], _projection.accumulation_dtype(param_leaves[i].dtype))
            for i in chosen]
  delta, grads = jax.lax.fori_loop(
      0, num_steps, body, (delta0, list(clean_grads)), unroll=unroll)
  norm_each = _per_group(_projection.global_l2_norm, groups, 0)
  delta_norm = norm_each(delta).astype(jnp.float32)
  if low_precision(param_leaves, chosen):
    delta_norm = _as_applied(delta_norm, perturb(param_leaves, delta, chosen, groups),
                             param_leaves, chosen, groups)
  return grads, delta_norm


def low_precision(param_leaves: Leaves, chosen: list[int]) -> bool:
  """Whether a perturbed parameter is narrower than float32 (bfloat16, float16)."""
  return any(jnp.finfo(param_leaves[i].dtype).bits < 32 for i in chosen)


def _as_applied(delta_norm: jax.Array, perturbed: Leaves, param_leaves: Leaves,
                chosen: list[int], groups: int | None) -> jax.Array:
  """The norm of Delta as the perturbed parameters hold it, where rounding can change it.

  In bfloat16 or float16 much of a small Delta rounds away when it is added to
  theta: the loss sees ``theta + Delta`` in the parameters' dtype, so that is
  what ``delta_norm`` reports. Float32 and wider parameters keep the exact norm
  (no extra pass over the parameters).
  """
  if not low_precision(param_leaves, chosen):
    return delta_norm

  def applied(*perturbed_chosen):
    return _projection.global_l2_norm([
        x.astype(jnp.float32) - param_leaves[i].astype(jnp.float32)
        for i, x in zip(chosen, perturbed_chosen)])

  return _per_group(applied, groups, 0)(*[perturbed[i] for i in chosen]).astype(jnp.float32)
