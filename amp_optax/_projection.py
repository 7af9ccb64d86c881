"""L2 norm balls on pytrees: norms and projections used by the AMP ascent.

Pure functions of arrays. Norms are accumulated in at least float32 (float64
stays float64) so that bf16/fp16 parameters do not overflow or lose the sum;
projected arrays keep their own dtype.
"""

from typing import Any

import jax
import jax.numpy as jnp

Scalar = Any  # a float or a 0-d array; possibly traced.


def accumulation_dtype(dtype: Any) -> jnp.dtype:
  """The dtype in which squared norms of ``dtype`` arrays are summed."""
  return jnp.promote_types(dtype, jnp.float32)


def _squared_norm(x: jax.Array) -> jax.Array:
  x = x.astype(accumulation_dtype(x.dtype))
  return jnp.sum(jnp.real(x * jnp.conj(x)))


def ball_scale(norm: jax.Array, radius: Scalar) -> jax.Array:
  """min(1, radius / norm), finite for norm == 0 (then 1, or 0 if radius == 0)."""
  radius = jnp.asarray(radius, norm.dtype)
  tiny = jnp.finfo(norm.dtype).tiny
  return jnp.minimum(1.0, radius / jnp.maximum(norm, tiny))


def l2_norm(x: jax.Array) -> jax.Array:
  """L2 norm of one array, in its accumulation dtype."""
  return jnp.sqrt(_squared_norm(x))


def global_l2_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of ``tree`` (0.0 for an empty tree)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  squares = [_squared_norm(x) for x in leaves]
  dtype = jnp.result_type(*squares)
  return jnp.sqrt(sum(s.astype(dtype) for s in squares))


def same_structure(a: Any, b: Any) -> bool:
  """Whether pytrees ``a`` and ``b`` have the same structure (treedefs compare equal)."""
  # Typed as Any: jaxlib ships no stubs for PyTreeDef, so type checkers cannot compare them.
  structure: Any = jax.tree.structure(a)
  return bool(structure == jax.tree.structure(b))


def project_per_tensor(tree: Any, radius: Any) -> Any:
  """Projects each leaf of ``tree`` onto the L2 ball of ``radius``.

  A leaf whose norm is at most its radius is returned unchanged; a longer one
  is rescaled to norm equal to the radius. Zero leaves stay zero (no division
  by 0).

  Args:
    tree: a pytree of floating arrays.
    radius: the ball radius, a non-negative scalar shared by all leaves, or a
      pytree with the structure of ``tree`` holding one scalar radius per
      leaf.

  Returns:
    A pytree like ``tree``, each leaf's norm at most its radius.
  """
  def project(x, r):
    scale = ball_scale(l2_norm(x), r)
    return (x * scale.astype(x.dtype)).astype(x.dtype)
  if same_structure(radius, tree) and jax.tree.leaves(tree):
    return jax.tree.map(project, tree, radius)
  return jax.tree.map(lambda x: project(x, radius), tree)


def project_global(tree: Any, radius: Scalar) -> Any:
  """Projects the whole of ``tree`` onto the L2 ball of ``radius``.

  The norm is taken over all leaves together; if it exceeds ``radius`` every
  leaf is scaled by the same factor ``radius / norm``.

  Args:
    tree: a pytree of floating arrays.
    radius: the ball radius, a non-negative scalar.

  Returns:
    A pytree like ``tree`` whose global L2 norm is at most ``radius``.
  """
  scale = ball_scale(global_l2_norm(tree), radius)
  return jax.tree.map(lambda x: (x * scale.astype(x.dtype)).astype(x.dtype), tree)
