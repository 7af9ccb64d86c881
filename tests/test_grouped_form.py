"""The form of the per-group passes as the library chooses it (no ``group_passes`` fixture).

On CPU: a loop of G passes where a group's pass holds a convolution, one ``jax.vmap`` otherwise.
The choice traces the first group's pass once more; through the NNX and Equinox helpers, with
BatchNorm state and dropout, that extra trace must change nothing: the step equals the same
step with the other form forced.
"""

import equinox as eqx
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import _grouped
from amp_optax import equinox as amp_eqx
from amp_optax import flax_nnx

pytestmark = pytest.mark.slow

G = 4


def _count(jaxpr, name):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for sub in _grouped._sub_jaxprs(eqn):
      n += _count(sub, name)
  return n


def _data(a):
  return jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a


def _forced_vmap(monkeypatch):
  monkeypatch.setattr(_grouped, "_loop_over_groups", lambda *_: False)
  jax.clear_caches()


class NnxNet(nnx.Module):

  def __init__(self, conv, rngs):
    self.conv = conv
    self.first = (nnx.Conv(3, 4, (3, 3), rngs=rngs) if conv else nnx.Linear(12, 4, rngs=rngs))
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(4, 1, rngs=rngs)

  def __call__(self, x):
    h = self.first(x if self.conv else x.reshape(len(x), -1))
    h = self.dropout(self.bn(h))
    return self.out(h.mean((1, 2)) if self.conv else h)


def _nnx_step(conv):
  x = jax.random.normal(jax.random.key(1), (16, 2, 2, 3))
  batch = {"x": x, "y": jnp.sin(x.sum((1, 2, 3)))[:, None]}
  model = NnxNet(conv, nnx.Rngs(0))
  tx = optax.chain(amp_optax.grouped_amp(0.1, num_groups=G), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss(model, b):
    return jnp.mean((model(b["x"]) - b["y"]) ** 2)

  def step(model, optimizer, batch):
    losses, grads, amp_grad_fn = flax_nnx.grouped_value_and_grad(loss)(
        model, amp_optax.group_batch(batch, G))
    optimizer.update(model, grads, grad_fn=amp_grad_fn)
    return losses

  def run():
    m, o = nnx.clone(model), nnx.clone(optimizer)
    losses = nnx.jit(step)(m, o, batch)
    return losses, nnx.as_pure(nnx.state(m))

  def jaxpr():
    m, o = nnx.clone(model), nnx.clone(optimizer)
    graphdef, state = nnx.split((m, o))
    return jax.make_jaxpr(lambda s: step(*nnx.merge(graphdef, s), batch))(state).jaxpr

  return run, jaxpr


@pytest.mark.parametrize("conv", [True, False], ids=["conv", "dense"])
def test_nnx_helper_default_form_and_its_equal_step(conv, monkeypatch):
  run, jaxpr = _nnx_step(conv)
  op = "conv_general_dilated" if conv else "dot_general"
  default_ops = _count(jaxpr(), op)
  losses, state = run()
  _forced_vmap(monkeypatch)
  vmap_ops = _count(jaxpr(), op)
  vmap_losses, vmap_state = run()
  if conv:  # a loop: each group's passes have their own convolutions
    assert default_ops > vmap_ops
  else:  # already the vmapped pass
    assert default_ops == vmap_ops
  np.testing.assert_allclose(losses, vmap_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(_data(a), _data(b), rtol=1e-5, atol=1e-6),
               state, vmap_state)


class EqxNet(eqx.Module):
  conv: eqx.nn.Conv2d
  norm: eqx.nn.BatchNorm
  out: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.conv = eqx.nn.Conv2d(3, 4, 3, padding=1, key=k1)
    self.norm = eqx.nn.BatchNorm(4, axis_name="batch")
    self.out = eqx.nn.Linear(4, 1, key=k2)

  def __call__(self, x, state):
    h, state = self.norm(self.conv(x), state)
    return self.out(h.mean((1, 2))), state


def test_equinox_helper_with_state_loops_over_convolutions_and_equals_vmap(monkeypatch):
  model, state = eqx.nn.make_with_state(EqxNet)(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 3, 4, 4))
  y = jnp.cos(x.sum((1, 2, 3)))[:, None]
  tx = optax.chain(amp_optax.grouped_amp(0.1, num_groups=G), optax.sgd(0.1))
  params = eqx.filter(model, eqx.is_inexact_array)
  opt_state = tx.init(params)

  def loss(model, state, x, y):
    out, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state)
    return jnp.mean((out - y) ** 2), state

  def step(model, state, opt_state):
    (losses, new_state), grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(
        loss, has_aux=True)(model, state, *amp_optax.group_batch((x, y), G))
    p = eqx.filter(model, eqx.is_inexact_array)
    updates, _ = tx.update(grads, opt_state, p, grad_fn=amp_grad_fn)
    return losses, eqx.apply_updates(model, updates), new_state

  def convs():
    return _count(jax.make_jaxpr(lambda s: step(model, s, opt_state)[0])(state).jaxpr,
                  "conv_general_dilated")

  default_convs, got = convs(), eqx.filter_jit(step)(model, state, opt_state)
  _forced_vmap(monkeypatch)
  vmap_convs, want = convs(), eqx.filter_jit(step)(model, state, opt_state)
  assert default_convs > vmap_convs
  for a, b in zip(jax.tree.leaves(eqx.filter(got, eqx.is_inexact_array)),
                  jax.tree.leaves(eqx.filter(want, eqx.is_inexact_array))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
