"""amp() + SGD against an independent float64 NumPy reference.

The reference is written from the algorithm, not from the library: a two-layer
tanh MLP with hand-written backprop, the AMP ascent with its own projections,
then weight decay and SGD with Nesterov momentum (PyTorch's / optax.trace's
formula: buf = m * buf + g; step = g + m * buf).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

# ---------------------------------------------------------------- reference


def np_loss_and_grad(params, x, y):
  """Mean squared error of a tanh MLP, and its gradient, by hand."""
  w1, b1, w2, b2 = params["w1"], params["b1"], params["w2"], params["b2"]
  z = x @ w1 + b1
  h = np.tanh(z)
  out = h @ w2 + b2
  n = x.shape[0]
  r = out - y
  loss = 0.5 * np.sum(r**2) / n
  d_out = r / n
  d_h = d_out @ w2.T
  d_z = d_h * (1.0 - h**2)
  grads = {
      "w1": x.T @ d_z,
      "b1": d_z.sum(0),
      "w2": h.T @ d_out,
      "b2": d_out.sum(0),
  }
  return loss, grads


def np_project(delta, eps, norm):
  if norm == "per_tensor":
    out = {}
    for k, d in delta.items():
      n = np.sqrt(np.sum(d**2))
      out[k] = d * (eps / n) if n > eps else d
    return out
  n = np.sqrt(sum(np.sum(d**2) for d in delta.values()))
  return {k: d * (eps / n) if n > eps else d for k, d in delta.items()}


def np_amp_sgd(params, x, y, *, steps, eps, inner_lr, k_steps, norm, lr, momentum, wd):
  params = {k: v.copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  history = []
  for _ in range(steps):
    _, g = np_loss_and_grad(params, x, y)
    delta = {k: np.zeros_like(v) for k, v in params.items()}
    for _ in range(k_steps):
      delta = np_project({k: delta[k] + inner_lr * g[k] for k in delta}, eps, norm)
      _, g = np_loss_and_grad({k: params[k] + delta[k] for k in params}, x, y)
    for k in params:
      gk = g[k] + wd * params[k]
      buf[k] = momentum * buf[k] + gk
      params[k] = params[k] - lr * (gk + momentum * buf[k])
    history.append({k: v.copy() for k, v in params.items()})
  return history


# ---------------------------------------------------------------- library


def jax_loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  out = h @ params["w2"] + params["b2"]
  return 0.5 * jnp.sum((out - y) ** 2) / x.shape[0]


def jax_amp_sgd(params, x, y, *, steps, eps, inner_lr, k_steps, norm, lr, momentum, wd):
  tx = optax.chain(
      amp_optax.amp(eps, inner_lr=inner_lr, inner_steps=k_steps, norm=norm),
      optax.add_decayed_weights(wd),
      optax.sgd(lr, momentum=momentum, nesterov=True),
  )

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(jax_loss)(params, x, y)
    updates, opt_state = tx.update(
        grads, opt_state, params, grad_fn=jax.grad(lambda p, _: jax_loss(p, x, y)))
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  history = []
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
    history.append(params)
  return history


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 4))
  y = rng.normal(size=(16, 3))
  params = {
      "w1": rng.normal(size=(4, 6)) * 0.8,
      "b1": rng.normal(size=(6,)) * 0.1,
      "w2": rng.normal(size=(6, 3)) * 0.8,
      "b2": rng.normal(size=(3,)) * 0.1,
  }
  return params, x, y


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
@pytest.mark.parametrize("k_steps", [1, 3])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_matches_float64_reference(x64, norm, k_steps, eps):
  params, x, y = make_problem()
  hp = dict(steps=6, eps=eps, inner_lr=0.7, k_steps=k_steps, norm=norm, lr=0.1,
            momentum=0.9, wd=5e-4)
  want = np_amp_sgd(params, x, y, **hp)
  got = jax_amp_sgd(jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y), **hp)
  for w, g in zip(want, got):
    for k in w:
      assert g[k].dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=1e-10, atol=1e-12)
  # The perturbation mattered: AMP's trajectory is not ERM's.
  erm = np_amp_sgd(params, x, y, **{**hp, "k_steps": 0})
  assert max(np.max(np.abs(erm[-1][k] - want[-1][k])) for k in params) > 1e-6


def test_projection_is_active_in_reference_problem(x64):
  """Guards the test above: with eps=0.05 the ball constrains the ascent."""
  params, x, y = make_problem()
  _, g = np_loss_and_grad(params, x, y)
  assert min(np.sqrt(np.sum(v**2)) for v in g.values()) * 0.7 > 0.05


# ------------------------------------------- relative radius and the cheaper step (issue 10)


def np_radii(params, eps, norm, relative):
  """The ball: one radius per tensor (per_tensor) or one for all (global)."""
  if not relative:
    return eps
  if norm == "per_tensor":
    return {k: eps * np.sqrt(np.sum(v**2)) for k, v in params.items()}
  return eps * np.sqrt(sum(np.sum(v**2) for v in params.values()))


def np_project_radii(delta, radii, norm):
  if norm == "per_tensor":
    out = {}
    for k, d in delta.items():
      r = radii[k] if isinstance(radii, dict) else radii
      n = np.sqrt(np.sum(d**2))
      out[k] = d * (r / n) if n > r else d
    return out
  return np_project(delta, radii, "global")


def np_amp_sgd_general(params, x, y, *, steps, eps, inner_lr, k_steps, norm, relative, every,
                       reuse, lr, momentum):
  """SGD + momentum on AMP gradients; ascent on every ``every``-th step only.

  Between ascents the clean gradient is used, plus (``reuse``) the last ascent step's
  adversarial-minus-clean gradient.
  """
  params = {k: v.copy() for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  correction = {k: np.zeros_like(v) for k, v in params.items()}
  history = []
  for t in range(steps):
    _, clean = np_loss_and_grad(params, x, y)
    if t % every == 0:
      radii = np_radii(params, eps, norm, relative)
      g = clean
      delta = {k: np.zeros_like(v) for k, v in params.items()}
      for _ in range(k_steps):
        delta = np_project_radii({k: delta[k] + inner_lr * g[k] for k in delta}, radii, norm)
        _, g = np_loss_and_grad({k: params[k] + delta[k] for k in params}, x, y)
      correction = {k: g[k] - clean[k] for k in params}
    else:
      g = {k: clean[k] + (correction[k] if reuse else 0.0) for k in params}
    for k in params:
      buf[k] = momentum * buf[k] + g[k]
      params[k] = params[k] - lr * buf[k]
    history.append({k: v.copy() for k, v in params.items()})
  return history


def jax_amp_sgd_general(params, x, y, *, steps, lr, momentum, every=1, **amp_kwargs):
  """The library: ``amp`` then SGD with momentum, one jitted step per value of ``ascend``.

  ``ascend = t % every == 0`` is decided in Python for each step and passed to ``update``
  (a static argument of the jitted step); steps without an ascent pass no ``grad_fn``.
  """
  tx = optax.chain(amp_optax.amp(**amp_kwargs), optax.sgd(lr, momentum=momentum))

  @functools.partial(jax.jit, static_argnames="ascend")
  def step(params, opt_state, ascend):
    grads = jax.grad(jax_loss)(params, x, y)
    grad_fn = {"grad_fn": jax.grad(lambda p, _: jax_loss(p, x, y))} if ascend else {}
    updates, opt_state = tx.update(grads, opt_state, params, ascend=ascend, **grad_fn)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  history = []
  for t in range(steps):
    params, opt_state = step(params, opt_state, ascend=t % every == 0)
    history.append(params)
  assert step._cache_size() == (2 if every > 1 else 1)  # one compiled step per value of ascend
  return history


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
@pytest.mark.parametrize("k_steps", [1, 2])
def test_relative_radius_matches_float64_reference(x64, norm, k_steps):
  params, x, y = make_problem()
  params["b1"] = np.zeros_like(params["b1"])  # a zero tensor: radius 0 per tensor
  hp = dict(steps=5, eps=0.05, inner_lr=0.7, k_steps=k_steps, norm=norm, lr=0.1, momentum=0.9)
  want = np_amp_sgd_general(params, x, y, relative=True, every=1, reuse=False, **hp)
  got = jax_amp_sgd_general(
      jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y), steps=5, lr=0.1,
      momentum=0.9, epsilon=0.05, inner_lr=0.7, inner_steps=k_steps, norm=norm, relative=True)
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=1e-10, atol=1e-12)
  # Guard: the relative ball is not the absolute one of the same epsilon.
  absolute = np_amp_sgd_general(params, x, y, relative=False, every=1, reuse=False, **hp)
  assert max(np.max(np.abs(absolute[-1][k] - want[-1][k])) for k in params) > 1e-6


@pytest.mark.parametrize("reuse", [False, True])
@pytest.mark.parametrize("k_steps", [1, 2])
def test_ascend_every_third_step_from_python_matches_float64_reference(x64, reuse, k_steps):
  """ascend=(t % 3 == 0) decided in Python per call: ascents at steps 0, 3, 6 of the reference
  that ascends every 3rd step; in between the clean gradient, plus (reuse_correction) the last
  ascent's adversarial-minus-clean gradient."""
  params, x, y = make_problem()
  hp = dict(steps=7, eps=0.05, inner_lr=0.7, k_steps=k_steps, norm="per_tensor", lr=0.1,
            momentum=0.9)
  want = np_amp_sgd_general(params, x, y, relative=False, every=3, reuse=reuse, **hp)
  got = jax_amp_sgd_general(
      jax.tree.map(jnp.asarray, params), jnp.asarray(x), jnp.asarray(y), steps=7, lr=0.1,
      momentum=0.9, every=3, epsilon=0.05, inner_lr=0.7, inner_steps=k_steps,
      reuse_correction=reuse)
  for w, g in zip(want, got):
    for k in w:
      np.testing.assert_allclose(np.asarray(g[k]), w[k], rtol=1e-10, atol=1e-12)
  # Guards: not AMP on every step, and (for reuse) not the plain clean gradient in between.
  every_step = np_amp_sgd_general(params, x, y, relative=False, every=1, reuse=False, **hp)
  assert max(np.max(np.abs(every_step[-1][k] - want[-1][k])) for k in params) > 1e-8
  if reuse:
    clean = np_amp_sgd_general(params, x, y, relative=False, every=3, reuse=False, **hp)
    assert max(np.max(np.abs(clean[-1][k] - want[-1][k])) for k in params) > 1e-8
