"""Tests of amp_optax.diagnostics on quadratics whose Hessian is known."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from amp_optax import diagnostics


def _x64():
  """Context manager enabling float64, on old and new JAX alike."""
  if callable(getattr(jax, "enable_x64", None)):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # JAX < 0.7.

  return enable_x64()


def _spd(rng, eigenvalues):
  """A = Q diag(eigenvalues) Q^T for a random orthogonal Q; returns (A, Q)."""
  n = len(eigenvalues)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.asarray(eigenvalues)) @ q.T, q


def _quadratic(p, a):
  return 0.5 * p @ a @ p


def _block_loss(params, a, b):
  """0.5 a-part + 0.5 b-part: block-diagonal Hessian diag(A, B)."""
  vb = params["b"].reshape(-1)
  return 0.5 * params["a"] @ a @ params["a"] + 0.5 * vb @ b @ vb


EIGS = [5.0, 2.0, 1.0, 0.5, 0.3, 0.1]


def test_top_eigenvalue_of_quadratic_matches_max_eigenvalue():
  rng = np.random.default_rng(0)
  a, q = _spd(rng, EIGS)
  x = jnp.asarray(rng.normal(size=len(EIGS)), jnp.float32)  # the Hessian is constant
  lam, v = diagnostics.hessian_top_eigenvalue(
      _quadratic, x, jnp.asarray(a, jnp.float32), key=jax.random.key(0),
      num_iters=30, return_vector=True)
  np.testing.assert_allclose(float(lam), max(EIGS), rtol=1e-4)
  assert v.shape == x.shape and v.dtype == x.dtype
  np.testing.assert_allclose(float(jnp.linalg.norm(v)), 1.0, rtol=1e-5)
  assert abs(float(np.asarray(v) @ q[:, 0])) > 0.9999


def test_top_eigenvalue_on_pytree_params_with_non_float_leaf():
  rng = np.random.default_rng(1)
  a, _ = _spd(rng, [3.0, 1.0, 0.2])
  b, _ = _spd(rng, [7.0, 2.0, 1.0, 0.5])
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2)), "step": jnp.array(3, jnp.int32)}

  def loss_fn(p, a, b):
    return _block_loss(p, a, b) * (p["step"] > 0)

  lam, v = diagnostics.hessian_top_eigenvalue(
      loss_fn, params, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
      key=jax.random.key(1), num_iters=40, return_vector=True)
  np.testing.assert_allclose(float(lam), 7.0, rtol=1e-4)
  assert jax.tree.structure(v) == jax.tree.structure(params)
  assert int(v["step"]) == 0 and v["step"].dtype == jnp.int32
  # The eigenvector of 7 lives in the "b" block only.
  assert float(jnp.linalg.norm(v["a"])) < 1e-2


def test_negative_dominant_eigenvalue_is_returned_with_its_sign():
  a = jnp.diag(jnp.array([-6.0, 2.0, 1.0]))
  lam = diagnostics.hessian_top_eigenvalue(
      _quadratic, jnp.zeros(3), a, key=jax.random.key(2), num_iters=40)
  np.testing.assert_allclose(float(lam), -6.0, rtol=1e-4)


def test_top_eigenvalue_is_jittable_and_matches_eager():
  rng = np.random.default_rng(3)
  a = jnp.asarray(_spd(rng, EIGS)[0], jnp.float32)
  fn = functools.partial(diagnostics.hessian_top_eigenvalue, _quadratic, num_iters=25)
  eager = fn(jnp.zeros(6), a, key=jax.random.key(0))
  jitted = jax.jit(fn)(jnp.zeros(6), a, key=jax.random.key(0))
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-5)
  np.testing.assert_allclose(float(jitted), 5.0, rtol=1e-4)


def test_top_eigenvalue_continues_from_returned_vector_and_unrolls():
  rng = np.random.default_rng(10)
  a = jnp.asarray(_spd(rng, [3.0, 2.5, 1.0, 0.1])[0], jnp.float32)
  key = jax.random.key(3)
  lam20 = diagnostics.hessian_top_eigenvalue(_quadratic, jnp.zeros(4), a, key=key, num_iters=20)
  lam10, v10 = diagnostics.hessian_top_eigenvalue(
      _quadratic, jnp.zeros(4), a, key=key, num_iters=10, return_vector=True)
  lam_cont = diagnostics.hessian_top_eigenvalue(
      _quadratic, jnp.zeros(4), a, init_vector=v10, num_iters=10)
  lam_unrolled = diagnostics.hessian_top_eigenvalue(
      _quadratic, jnp.zeros(4), a, key=key, num_iters=20, unroll=True)
  assert abs(float(lam10) - 3.0) > abs(float(lam20) - 3.0)
  np.testing.assert_allclose(float(lam_cont), float(lam20), rtol=1e-5)
  np.testing.assert_allclose(float(lam_unrolled), float(lam20), rtol=1e-5)


def test_top_eigenvalue_init_vector_and_has_aux():
  a = jnp.diag(jnp.array([1.0, 4.0]))
  loss_fn = lambda p, a: (_quadratic(p, a), {"aux": p})
  lam = diagnostics.hessian_top_eigenvalue(
      loss_fn, jnp.zeros(2), a, init_vector=jnp.array([1.0, 1.0]), num_iters=30, has_aux=True)
  np.testing.assert_allclose(float(lam), 4.0, rtol=1e-5)


def test_top_eigenvalue_float64():
  with _x64():
    rng = np.random.default_rng(4)
    eigs = [2.0, 1.9, 0.5, 0.1]  # close top pair: needs many iterations, and float64
    a = jnp.asarray(_spd(rng, eigs)[0], jnp.float64)
    lam = diagnostics.hessian_top_eigenvalue(
        _quadratic, jnp.zeros(4, jnp.float64), a, key=jax.random.key(0), num_iters=400)
    assert lam.dtype == jnp.float64
    np.testing.assert_allclose(float(lam), 2.0, rtol=1e-10)


@pytest.mark.slow
def test_hessian_vector_product_matches_dense_hessian():
  def loss_fn(p, x):
    return jax.nn.logsumexp(x @ p["w"] + p["c"]) + jnp.sum(p["w"] ** 4)

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "c": jnp.float32(0.3)}
  vec = {"w": jnp.asarray(rng.normal(size=3), jnp.float32), "c": jnp.float32(-1.0)}
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), x)))(flat)
  expected = dense @ jax.flatten_util.ravel_pytree(vec)[0]
  got = jax.flatten_util.ravel_pytree(
      diagnostics.hessian_vector_product(loss_fn, params, vec, x))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["global", "per_tensor"])
def test_random_direction_norms(norm):
  params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(7), "n": jnp.array(1)}
  u = diagnostics.random_direction(jax.random.key(0), params, 0.3, norm)
  assert int(u["n"]) == 0
  norms = [float(jnp.linalg.norm(u[k])) for k in ("a", "b")]
  if norm == "global":
    np.testing.assert_allclose(np.hypot(*norms), 0.3, rtol=1e-5)
  else:
    np.testing.assert_allclose(norms, [0.3, 0.3], rtol=1e-5)


@pytest.mark.parametrize("norm", ["global", "per_tensor"])
def test_random_perturbation_matches_numpy_per_sample(norm):
  rng = np.random.default_rng(6)
  a, _ = _spd(rng, [3.0, 1.0, 0.2])
  b, _ = _spd(rng, [7.0, 2.0, 1.0, 0.5])
  params = {"a": jnp.asarray(rng.normal(size=3), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)}
  args = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  key, radius, n = jax.random.key(7), 0.25, 16
  out = diagnostics.random_perturbation_loss_increase(
      _block_loss, params, *args, radius=radius, num_samples=n, key=key, norm=norm)
  assert out.increases.shape == (n,)

  hess = np.zeros((7, 7))
  hess[:3, :3], hess[3:, 3:] = a, b
  x = np.concatenate([np.asarray(params["a"]), np.asarray(params["b"]).ravel()]).astype(float)
  expected = []
  for k in jax.random.split(key, n):
    u = diagnostics.random_direction(k, params, radius, norm)
    u = np.concatenate([np.asarray(u["a"]), np.asarray(u["b"]).ravel()]).astype(float)
    expected.append(x @ hess @ u + 0.5 * u @ hess @ u)  # exact for a quadratic
  expected = np.array(expected)
  np.testing.assert_allclose(np.asarray(out.increases), expected, atol=2e-5)
  np.testing.assert_allclose(float(out.mean), expected.mean(), atol=2e-5)
  np.testing.assert_allclose(float(out.std), expected.std(ddof=1), rtol=1e-3, atol=2e-5)
  np.testing.assert_allclose(float(out.base_loss), 0.5 * x @ hess @ x, rtol=1e-5)


@pytest.mark.parametrize("norm", ["global", "per_tensor"])
def test_random_perturbation_mean_matches_trace_formula(norm):
  # At the minimum, E[L(u)] = 0.5 r^2 E[u^T A u] with unit u isotropic:
  # tr(A)/n globally, and the sum of tr(A_i)/n_i over tensors per tensor.
  with _x64():
    rng = np.random.default_rng(8)
    a, _ = _spd(rng, [3.0, 1.0, 0.2])
    b, _ = _spd(rng, [7.0, 2.0, 1.0, 0.5])
    params = {"a": jnp.zeros(3, jnp.float64), "b": jnp.zeros((2, 2), jnp.float64)}
    radius = 0.1
    out = jax.jit(functools.partial(
        diagnostics.random_perturbation_loss_increase, _block_loss, radius=radius,
        num_samples=4000, norm=norm))(params, jnp.asarray(a), jnp.asarray(b),
                                      key=jax.random.key(9))
    if norm == "global":
      expected = 0.5 * radius**2 * (np.trace(a) + np.trace(b)) / 7
    else:
      expected = 0.5 * radius**2 * (np.trace(a) / 3 + np.trace(b) / 4)
    assert out.mean.dtype == jnp.float64
    np.testing.assert_allclose(float(out.mean), expected, rtol=0.03)
    assert float(out.std) > 0


def test_argument_errors():
  loss = lambda p: jnp.sum(p**2)
  with pytest.raises(ValueError, match="key"):
    diagnostics.hessian_top_eigenvalue(loss, jnp.zeros(2))
  with pytest.raises(ValueError, match="num_iters"):
    diagnostics.hessian_top_eigenvalue(loss, jnp.zeros(2), key=jax.random.key(0), num_iters=0)
  with pytest.raises(ValueError, match="norm"):
    diagnostics.random_perturbation_loss_increase(
        loss, jnp.zeros(2), radius=1.0, key=jax.random.key(0), norm="l1")
  with pytest.raises(ValueError, match="num_samples"):
    diagnostics.random_perturbation_loss_increase(
        loss, jnp.zeros(2), radius=1.0, num_samples=0, key=jax.random.key(0))
