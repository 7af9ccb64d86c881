"""amp() under named mapped axes: averaging is an explicit choice, never silently left out.

Runs on the 8 fake CPU devices that tests/conftest.py sets up.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

import amp_optax

N_DEV = 4
pytestmark = pytest.mark.skipif(
    jax.device_count() < N_DEV, reason="needs 4 (fake) devices: see tests/conftest.py")


def loss_fn(params, x):
  return jnp.mean((x @ params["w"] - 1.0) ** 2)


def setup():
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)}
  x = jax.random.normal(jax.random.key(0), (16, 3))
  mesh = jax.make_mesh((N_DEV,), ("batch",))
  return params, x, mesh


def shard_map_step(tx, mesh, check_vma, local_grads):
  """A shard_map step; ``local_grads`` differentiates w.r.t. a per-device copy of the params."""

  @jax.jit
  @partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P(),
           check_vma=check_vma)
  def step(params, x):
    def grads_of(p):
      if local_grads:  # a per-device gradient: varies over 'batch'
        return jax.grad(lambda q: loss_fn(q, x))(jax.lax.pcast(p, "batch", to="varying"))
      return jax.grad(loss_fn)(p, x)  # of replicated params: summed over 'batch'

    grads = grads_of(params)
    if local_grads:
      grads = jax.lax.pmean(grads, "batch")
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=lambda p, _: grads_of(p))
    return updates

  return step


def test_shard_map_without_vma_and_without_batch_axis_name_raises():
  params, x, mesh = setup()
  x = jax.device_put(x, NamedSharding(mesh, P("batch")))
  step = shard_map_step(amp_optax.amp(0.05), mesh, check_vma=False, local_grads=False)
  with pytest.raises(ValueError, match=r"cannot tell whether the gradients are averaged"):
    step(params, x)


def test_shard_map_with_vma_sees_summed_gradients_are_global():
  """check_vma=True: gradients of replicated params are invariant, so None is right there."""
  params, x, mesh = setup()
  updates = shard_map_step(amp_optax.amp(0.05), mesh, check_vma=True, local_grads=False)(
      params, jax.device_put(x, NamedSharding(mesh, P("batch"))))
  # The summed gradient is N_DEV times the mean one; AMP at it on one device:
  tx = amp_optax.amp(0.05)
  total = lambda p: N_DEV * loss_fn(p, x)
  want, _ = tx.update(jax.grad(total)(params), tx.init(params), params,
                      grad_fn=lambda p, _: jax.grad(total)(p))
  np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5, atol=1e-6)


def test_shard_map_with_vma_detects_per_device_gradients():
  params, x, mesh = setup()
  sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  with pytest.raises(ValueError, match=r"grad_fn's output varies over the mapped axis 'batch'"):
    shard_map_step(amp_optax.amp(0.05), mesh, check_vma=True, local_grads=True)(params, sharded)
  # Named, the per-device gradients are averaged and the step is one device's.
  updates = shard_map_step(amp_optax.amp(0.05, batch_axis_name="batch"), mesh,
                           check_vma=True, local_grads=True)(params, sharded)
  tx = amp_optax.amp(0.05)
  want, _ = tx.update(jax.grad(loss_fn)(params, x), tx.init(params), params,
                      grad_fn=lambda p, _: jax.grad(loss_fn)(p, x))
  np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5, atol=1e-6)


def test_batch_axis_name_not_in_scope_says_to_leave_it_none():
  params, x, _ = setup()
  tx = amp_optax.amp(0.05, batch_axis_name="batch")
  with pytest.raises(ValueError, match=r"no mapped axis of that name is in scope"):
    jax.jit(lambda p: tx.update(jax.grad(loss_fn)(p, x), tx.init(p), p,
                                grad_fn=lambda q, _: jax.grad(loss_fn)(q, x)))(params)


def test_named_vmap_without_batch_axis_name_raises():
  params, x, _ = setup()
  xs = x.reshape(N_DEV, -1, 3)
  tx = amp_optax.amp(0.05)

  def step(x):
    grads = jax.lax.pmean(jax.grad(loss_fn)(params, x), "ensemble")
    return tx.update(grads, tx.init(params), params,
                     grad_fn=lambda q, _: jax.grad(loss_fn)(q, x))[0]

  with pytest.raises(ValueError, match=r"named mapped axis 'ensemble'"):
    jax.vmap(step, axis_name="ensemble")(xs)
  tx = amp_optax.amp(0.05, batch_axis_name="ensemble")  # named, it runs
  out = jax.vmap(step, axis_name="ensemble")(xs)
  np.testing.assert_allclose(out["w"][0], out["w"][1], rtol=1e-6)


def test_batch_axis_name_type_error():
  with pytest.raises(TypeError, match=r"`batch_axis_name` must be None, an axis name"):
    amp_optax.amp(0.05, batch_axis_name=3)


def test_empty_tuple_under_jit_is_no_averaging():
  params, x, _ = setup()
  tx = amp_optax.amp(0.05, batch_axis_name=())
  got, _ = jax.jit(lambda p: tx.update(jax.grad(loss_fn)(p, x), tx.init(p), p,
                                       grad_fn=lambda q, _: jax.grad(loss_fn)(q, x)))(params)
  ref = amp_optax.amp(0.05)
  want, _ = ref.update(jax.grad(loss_fn)(params, x), ref.init(params), params,
                       grad_fn=lambda q, _: jax.grad(loss_fn)(q, x))
  np.testing.assert_array_equal(got["w"], want["w"])
