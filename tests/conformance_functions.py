"""Targets and float64 NumPy references for tests/test_optax_conformance.py.

Nothing here imports amp_optax: the references are written from the algorithm
(projected gradient ascent from Delta = 0, then the base optimiser's formula),
so that the conformance tests compare the library against independent code.
Trees are dicts of NumPy arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np

# ------------------------------------------------------------ test targets
# The optimisation targets of optax's own batteries (alias_test.py,
# contrib/_common_test.py), as (initial params, minimiser, objective).


def parabola(dtype):
  init = jnp.array([-1.0, 10.0, 1.0], dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    final = final * (1 + 1j)
  return init, final, lambda p: jnp.sum(jnp.abs(p - final) ** 2)


def rosenbrock(dtype):
  a, b = 1.0, 100.0
  init = jnp.array([0.0, 0.0], dtype)
  final = jnp.array([a, a**2], dtype)
  return init, final, lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2


def matrix_parabola(dtype):
  init = jnp.zeros((2, 2), dtype)
  final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
  return init, final, lambda p: jnp.sum((p - final) ** 2)


def mixed_tensor_target(dtype):
  init = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
  final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

  def objective(p):
    return jnp.sum((p[0] - final[0]) ** 2) + jnp.sum((p[1] - final[1]) ** 2)

  return init, final, objective


def conj_grad(objective):
  """The update direction optax expects: the conjugate of jax.grad for complex params."""
  grad = jax.grad(objective)
  return lambda p: jax.tree.map(jnp.conj, grad(p))


# ------------------------------------------------------------ AMP reference


def np_project(delta, eps, norm):
  """Projection of a dict of arrays onto the per-tensor or global L2 ball."""
  if norm == "per_tensor":
    out = {}
    for k, d in delta.items():
      n = np.sqrt(np.sum(np.abs(d) ** 2))
      out[k] = d * (eps / n) if n > eps else d
    return out
  n = np.sqrt(sum(np.sum(np.abs(d) ** 2) for d in delta.values()))
  return {k: (d * (eps / n) if n > eps else d) for k, d in delta.items()}


def np_ascent(clean_grad, grad_at, *, eps, inner_lr, k_steps, norm):
  """K steps of projected gradient ascent from Delta = 0.

  Args:
    clean_grad: the gradient at theta (dict of arrays): the first ascent direction.
    grad_at: function of Delta returning the gradient at theta + Delta.
    eps: ball radius.
    inner_lr: ascent step size.
    k_steps: number of ascent steps K >= 1.
    norm: "per_tensor" or "global".

  Returns:
    (Delta_K, gradient at theta + Delta_K).
  """
  delta = {k: np.zeros_like(v) for k, v in clean_grad.items()}
  g = clean_grad
  for _ in range(k_steps):
    delta = np_project({k: delta[k] + inner_lr * g[k] for k in delta}, eps, norm)
    g = grad_at(delta)
  return delta, g


# ------------------------------------------------------------ base optimisers


class NpBase:
  """sgd with momentum, adam or adamw with optax's defaults, in float64 NumPy."""

  def __init__(self, name, lr, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4):
    self.name, self.lr, self.momentum = name, lr, momentum
    self.b1, self.b2, self.eps, self.wd = b1, b2, eps, weight_decay
    self.t = 0
    self.buf = self.mu = self.nu = None

  def step(self, params, g):
    """Returns the new params after one step with gradient g."""
    if self.buf is None:
      self.buf = {k: np.zeros_like(v) for k, v in params.items()}
      self.mu = {k: np.zeros_like(v) for k, v in params.items()}
      self.nu = {k: np.zeros_like(v) for k, v in params.items()}
    self.t += 1
    out = {}
    for k, p in params.items():
      if self.name == "sgd_mom":
        # optax.trace: buf = g + momentum * buf; the step is -lr * buf.
        self.buf[k] = g[k] + self.momentum * self.buf[k]
        out[k] = p - self.lr * self.buf[k]
        continue
      self.mu[k] = self.b1 * self.mu[k] + (1 - self.b1) * g[k]
      self.nu[k] = self.b2 * self.nu[k] + (1 - self.b2) * g[k] ** 2
      mu_hat = self.mu[k] / (1 - self.b1**self.t)
      nu_hat = self.nu[k] / (1 - self.b2**self.t)
      u = mu_hat / (np.sqrt(nu_hat) + self.eps)
      if self.name == "adamw":
        u = u + self.wd * p
      out[k] = p - self.lr * u
    return out


# ------------------------------------------------------------ a small nonlinear model


def np_tanh_regression_grad(params, x, y):
  """Gradient of 0.5 * mean((tanh(x @ w + b) - y)**2), by hand."""
  t = np.tanh(x @ params["w"] + params["b"])
  dz = (t - y) * (1.0 - t**2) / x.shape[0]
  return {"w": x.T @ dz, "b": np.sum(dz)}


def tanh_regression_loss(params, x, y):
  return 0.5 * jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


# ------------------------------------------------------------ AMP losses


def np_rosenbrock(x, y):
  return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


def np_rosenbrock_amp_loss(x, y, eps, n_angles=256):
  """max over the disc of radius eps of Rosenbrock around (x, y) (arrays broadcast).

  The maximum of this smooth function over a small disc lies on its boundary
  circle unless the centre is a local maximum (Rosenbrock has none), so the
  circle is sampled at n_angles points; the centre is included for safety.
  """
  out = np_rosenbrock(x, y)
  for a in np.linspace(0.0, 2.0 * np.pi, n_angles, endpoint=False):
    out = np.maximum(out, np_rosenbrock(x + eps * np.cos(a), y + eps * np.sin(a)))
  return out


def two_basin(x, xp=np):
  """1-D loss with a wide shallow basin at 0 and a deeper, narrow well at 2.

  h(x) = 0.5 x^2 - 3 exp(-(x - 2)^2 / (2 * 0.05^2)). The narrow well is the global
  minimum of h (about -1 near x = 2); the wide basin's minimum is h(0) = 0.
  """
  return 0.5 * x**2 - 3.0 * xp.exp(-((x - 2.0) ** 2) / (2 * 0.05**2))


def np_interval_max(fn, xs, eps, n=401):
  """max over |d| <= eps of fn(x + d), for each x in xs, by a fine grid over d."""
  d = np.linspace(-eps, eps, n)
  return np.max(fn(xs[:, None] + d[None, :]), axis=1)
