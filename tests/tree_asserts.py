"""Tree comparisons for the tests (what chex's asserts gave): structure, then every leaf.

Leaves are compared as float64 (complex128) NumPy, so that bfloat16 and complex leaves compare
alike.
"""

import jax
import jax.numpy as jnp
import numpy as np


def wide(x):
  """A leaf as float64 (complex128) NumPy; other dtypes as they are."""
  x = np.asarray(x)
  if np.iscomplexobj(x):
    return x.astype(np.complex128)
  return x.astype(np.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x


def assert_trees_close(got, want, rtol=1e-6, atol=0.0):
  """The same tree structure, and every leaf close (by default with chex's tolerances)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(wide(a), wide(b), rtol=rtol, atol=atol)


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def assert_tree_finite(tree):
  for x in jax.tree.leaves(tree):
    assert np.all(np.isfinite(wide(x))), x
