"""Norm-ball projections against NumPy, on random pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import amp_optax


def random_tree(seed):
  rng = np.random.default_rng(seed)
  scale = 10.0 ** rng.uniform(-3, 2)
  return {"a": rng.normal(size=(3, 4)) * scale, "b": [rng.normal(size=(5,)) * scale,
                                                     rng.normal(size=()) * scale]}


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("radius", [0.0, 1e-3, 0.5, 3.0])
def test_per_tensor_projection_matches_numpy(seed, radius):
  tree = random_tree(seed)
  got = amp_optax.project_per_tensor(jax.tree.map(jnp.asarray, tree), radius)
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(got)):
    n = np.linalg.norm(x)
    want = x * radius / n if n > radius else x
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-6, atol=1e-30)
    assert np.linalg.norm(np.asarray(y, np.float64)) <= radius * (1 + 1e-6) or n <= radius


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("radius", [0.0, 1e-3, 0.5, 3.0])
def test_global_projection_matches_numpy(seed, radius):
  tree = random_tree(seed)
  n = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(tree)))
  got = amp_optax.project_global(jax.tree.map(jnp.asarray, tree), radius)
  assert float(amp_optax.global_l2_norm(got)) <= radius * (1 + 1e-6) + 1e-30 or n <= radius
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(got)):
    want = x * radius / n if n > radius else x
    np.testing.assert_allclose(np.asarray(y), want, rtol=2e-6, atol=1e-30)


def test_inside_the_ball_is_untouched_bitwise():
  x = {"w": jnp.array([0.3, -0.4])}
  assert (amp_optax.project_per_tensor(x, 1.0)["w"] == x["w"]).all()
  assert (amp_optax.project_global(x, 1.0)["w"] == x["w"]).all()


def test_zero_tree_and_zero_radius_give_zeros_not_nan():
  z = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  for project in (amp_optax.project_per_tensor, amp_optax.project_global):
    for radius in (0.0, 1.0):
      out = project(z, radius)
      assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(out))


def test_norm_is_accumulated_in_float32_for_half_precision():
  x = jnp.full((4096,), 8.0, jnp.float16)  # sum of squares 262144 > fp16 max
  assert amp_optax.global_l2_norm([x]).dtype == jnp.float32
  assert float(amp_optax.global_l2_norm([x])) == pytest.approx(512.0)
  y = amp_optax.project_global([x], 1.0)[0]
  assert y.dtype == jnp.float16
  assert float(jnp.linalg.norm(y.astype(jnp.float32))) == pytest.approx(1.0, rel=1e-2)


def test_empty_tree():
  assert float(amp_optax.global_l2_norm({})) == 0.0
  assert amp_optax.project_global({}, 1.0) == {}
