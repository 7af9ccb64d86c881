"""amp() on 8 fake CPU devices gives the single-device update.

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""

from functools import partial
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import amp_optax

N_DEV = 8
pytestmark = pytest.mark.skipif(
    jax.device_count() < N_DEV, reason="needs 8 (fake) devices: see tests/conftest.py")


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (6, 16)) * 0.5, "b1": jnp.zeros((16,)),
          "w2": jax.random.normal(k2, (16, 3)) * 0.5, "b2": jnp.zeros((3,))}


def loss_fn(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] + params["b2"] - y) ** 2)


def batch(n=64):
  kx, ky = jax.random.split(jax.random.key(1))
  return jax.random.normal(kx, (n, 6)), jax.random.normal(ky, (n, 3))


def assert_trees_close(got, want, rtol, atol):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def make_tx(norm, batch_axis_name=None):
  return optax.chain(
      amp_optax.amp(0.05, inner_steps=2, norm=norm, batch_axis_name=batch_axis_name),
      optax.add_decayed_weights(1e-3),
      optax.sgd(0.1, momentum=0.9, nesterov=True))


def jit_step(tx, x, y):
  """One jitted AMP step on the whole batch (x, y), however it is sharded."""

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = tx.update(grads, state, params,
                               grad_fn=jax.grad(lambda p, _: loss_fn(p, x, y)))
    return optax.apply_updates(params, updates), state

  return step


def single_device_steps(norm, steps=3):
  x, y = batch()
  tx = make_tx(norm)
  params = init_params()
  state = tx.init(params)

  step = jit_step(tx, x, y)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_pmap_with_batch_axis_name_matches_one_device(norm):
  x, y = batch()
  xs, ys = x.reshape(N_DEV, -1, 6), y.reshape(N_DEV, -1, 3)
  tx = make_tx(norm, batch_axis_name="batch")
  params = init_params()
  state = tx.init(params)
  replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV,) + a.shape), t)  # noqa: E731

  @partial(jax.pmap, axis_name="batch")
  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "batch")
    updates, state = tx.update(grads, state, params,
                               grad_fn=jax.grad(lambda p, _: loss_fn(p, x, y)))
    return optax.apply_updates(params, updates), state

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # newer jax may deprecate pmap
    p, s = replicate(params), replicate(state)
    for _ in range(3):
      p, s = step(p, s, xs, ys)
  want, want_state = single_device_steps(norm)
  for i in range(N_DEV):
    assert_trees_close(jax.tree.map(lambda a, i=i: a[i], p), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s[0].delta_norm), float(want_state[0].delta_norm),
                             rtol=1e-5)


@pytest.mark.slow
def test_pmap_without_batch_axis_name_raises_and_empty_tuple_opts_out():
  """Without the mean each device would have its own Delta: an error, unless chosen with ()."""
  x, y = batch()
  xs, ys = x.reshape(N_DEV, -1, 6), y.reshape(N_DEV, -1, 3)
  params = init_params()
  replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (N_DEV,) + a.shape), params)

  def run(tx):
    @partial(jax.pmap, axis_name="batch")
    def step(params, x, y):
      grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "batch")
      updates, _ = tx.update(grads, tx.init(params), params,
                             grad_fn=jax.grad(lambda p, _: loss_fn(p, x, y)))
      return updates
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return step(replicated, xs, ys)

  with pytest.raises(ValueError, match=r"batch_axis_name='batch'"):
    run(make_tx("per_tensor", batch_axis_name=None))
  updates = run(make_tx("per_tensor", batch_axis_name=()))  # per-device ascent, on purpose
  spread = float(jnp.max(jnp.abs(updates["w1"][0] - updates["w1"][1])))
  assert spread > 1e-6


@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_shard_map_with_batch_axis_name_matches_one_device(norm):
  mesh = jax.make_mesh((N_DEV,), ("batch",), axis_types=(AxisType.Auto,))
  x, y = batch()
  tx = make_tx(norm, batch_axis_name="batch")
  params = init_params()
  state = tx.init(params)

  # check_vma=False: gradients of replicated params are per-device here, so
  # averaging them with batch_axis_name is right (see amp's docstring).
  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
           out_specs=(P(), P()), check_vma=False)
  def step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x, y), "batch")
    updates, state = tx.update(grads, state, params,
                               grad_fn=jax.grad(lambda p, _: loss_fn(p, x, y)))
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    params, state = step(params, state, x, y)
  want, _ = single_device_steps(norm)
  assert_trees_close(params, want, rtol=2e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("norm", ["per_tensor", "global"])
def test_jit_with_sharded_batch_and_params_matches_one_device(norm, axis_type):
  """A 4 x 2 mesh: the batch split over "data", w1 (and w2 if Auto) over "model".

  Under Explicit axes the shardings are part of the types, so the new params
  and the momentum must carry exactly the params' shardings: Delta and the
  adversarial gradient did not reshard anything.
  """
  kind = getattr(AxisType, axis_type)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
  with jax.set_mesh(mesh):
    x, y = batch()
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    # Under Explicit axes a contraction sharded on both sides needs an
    # out_sharding in loss_fn; keep w2 replicated there.
    w2_spec = P("model") if axis_type == "Auto" else P()
    shardings = {"w1": NamedSharding(mesh, P(None, "model")), "b1": NamedSharding(mesh, P()),
                 "w2": NamedSharding(mesh, w2_spec), "b2": NamedSharding(mesh, P())}
    params = jax.device_put(init_params(), shardings)
    tx = make_tx(norm)
    state = jax.jit(tx.init)(params)

    step = jit_step(tx, x, y)
    for _ in range(3):
      params, state = step(params, state)
  want, _ = single_device_steps(norm)
  assert_trees_close(jax.device_get(params), want, rtol=2e-5, atol=1e-6)
  if axis_type == "Explicit":
    momentum = state[2][0].trace  # chain: (amp, add_decayed_weights, sgd = (trace, scale))
    for k, sh in shardings.items():
      assert params[k].sharding.is_equivalent_to(sh, params[k].ndim), k
      assert momentum[k].sharding.is_equivalent_to(sh, momentum[k].ndim), k
