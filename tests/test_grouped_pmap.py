"""Grouped ascent under ``jax.pmap`` / ``shard_map`` in the data-parallel user's own pattern.

Flax's ImageNet step, written as ``docs/guides/grouped.md`` says: a Linen ResNet-style model with
BatchNorm, per-device batches, ``grouped_amp(num_groups=G, batch_axis_name="batch")``. The same
``G`` must give the same parameters on 1, 2 and 4 devices; the two habits of plain
data-parallel training that would silently change the result (BatchNorm synchronised over the
device axis, ``lax.pmean`` of the clean gradients) must raise and name the fix.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import flax_linen

G = 4  # groups over all devices: m = 32 / 4 = 8 examples each
N = 32
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")]


class Net(nn.Module):
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     axis_name=self.bn_axis_name if train else None)(x)
    return nn.Dense(2)(nn.relu(x))


def data():
  kx, ky = jax.random.split(jax.random.key(3))
  return jax.random.normal(kx, (N, 5)), jax.random.normal(ky, (N, 2))


def make_loss(model, aux_metric_axis=None):
  def loss_fn(params, batch_stats, batch, rng):
    del rng
    x, y = batch
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
    loss = jnp.mean((out - y) ** 2)
    if aux_metric_axis is None:
      return loss, updates
    # A metric averaged over the devices inside the loss: not part of the gradient.
    return loss, (updates, jax.lax.pmean(loss, aux_metric_axis))
  return loss_fn


def train(devices, model, *, pmean_grads=False, aux_metric_axis=None, steps=3):
  """Three grouped steps under pmap over ``devices`` (1: plain jit, no axis)."""
  x, y = data()
  variables = Net().init(jax.random.key(0), x[:2], train=False)
  axis = "batch" if devices > 1 else None
  tx = optax.chain(amp_optax.grouped_amp(0.1, num_groups=G, inner_steps=2, batch_axis_name=axis),
                   optax.sgd(0.1, momentum=0.9))
  has_aux = aux_metric_axis is not None
  grouped_vg = flax_linen.grouped_value_and_grad(make_loss(model, aux_metric_axis),
                                                 has_aux=has_aux)

  def step(params, batch_stats, opt_state, batch):
    out, grads, amp_grad_fn = grouped_vg(params, batch_stats,
                                         amp_optax.group_batch(batch, G // devices))
    new_stats = out[1][1] if has_aux else out[1]  # (losses, (aux, stats)) with has_aux
    if pmean_grads:
      grads = jax.lax.pmean(grads, "batch")
    if axis:
      new_stats = jax.lax.pmean(new_stats, "batch")
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, updates), new_stats, opt_state

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  if devices == 1:
    run = jax.jit(step)
    batch = (x, y)
  else:
    run = jax.pmap(step, axis_name="batch", in_axes=(None, None, None, 0), out_axes=None,
                   devices=jax.devices()[:devices])
    batch = jax.tree.map(lambda a: a.reshape((devices, N // devices) + a.shape[1:]), (x, y))
  for _ in range(steps):
    params, stats, opt_state = run(params, stats, opt_state, batch)
  return params, stats


@pytest.mark.parametrize("devices", [2, 4])
def test_the_same_num_groups_gives_the_same_parameters_on_1_2_4_devices(devices):
  want_params, want_stats = train(1, Net())
  params, stats = train(devices, Net())
  for a, b in zip(jax.tree.leaves((want_params, want_stats)), jax.tree.leaves((params, stats))):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6, rtol=0)


def test_batchnorm_synchronised_over_the_device_axis_raises_naming_the_fix():
  with pytest.raises(ValueError, match=r"reduce over batch_axis_name 'batch'.*"
                                       r"BatchNorm\(axis_name=None\)"):
    train(2, Net(bn_axis_name="batch"), steps=1)


def test_pmean_of_the_per_group_gradients_raises_naming_the_fix():
  with pytest.raises(ValueError, match=r"jax.lax.pmean\(grads, 'batch'\).*exactly as the helper "
                                       r"returned them"):
    train(2, Net(), pmean_grads=True, steps=1)


def test_a_metric_averaged_over_devices_in_the_loss_aux_is_allowed():
  want_params, _ = train(2, Net())
  params, _ = train(2, Net(), aux_metric_axis="batch")
  for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_shard_map_with_a_loss_synchronised_over_the_axis_raises():
  mesh = jax.make_mesh((2,), ("batch",), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Explicit,))
  tx = optax.chain(amp_optax.grouped_amp(0.1, num_groups=G, batch_axis_name="batch"),
                   optax.sgd(0.1))

  def loss_fn(p, batch):
    x, y = batch
    h = x @ p["w"]
    h = h - jax.lax.pmean(jnp.mean(h, axis=0), "batch")  # BatchNorm-style, synchronised
    return jnp.mean((h - y) ** 2)

  params = {"w": jnp.ones((5, 2)) * 0.1}

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P())
  def step(params, batch):
    _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(loss_fn)(
        params, amp_optax.group_batch(batch, G // 2))
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
    return updates

  batch = jax.device_put(data(), NamedSharding(mesh, P("batch")))
  with pytest.raises(ValueError, match=r"reduce over batch_axis_name 'batch'"):
    jax.jit(step)(params, batch)
