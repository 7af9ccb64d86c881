"""Grouped ascent (grouped_amp) through the Flax Linen, NNX and Equinox helpers.

For each framework: G = 1 against the module's ungrouped helper, G = 4 against
amp_optax.grouped_value_and_grad on the same pure loss (no BatchNorm), epsilon = 0 with BatchNorm
and dropout against an ERM step on the ghost-BN loss written group by group in a Python loop
(group j with key fold_in(rng, j), running statistics the mean over groups), learning, and one
trace under jit.
"""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import flax_linen
from amp_optax import flax_nnx

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("group_passes")]

N, G = 16, 4


def make_batch(n=N, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, 3))
  return {"x": x, "y": jnp.sin(x @ jnp.array([[1.5], [-2.0], [0.5]]))}  # learnable


def tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------------------- Linen


class LinenNet(nn.Module):
  norm: bool = True

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(8)(x)
    if self.norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.Dropout(0.2, deterministic=not train)(x)
    return nn.Dense(1)(jnp.tanh(x))


def linen_setup(norm=True):
  model = LinenNet(norm)
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)

  def loss_fn(params, batch_stats, batch, rng):
    if not norm:
      out = model.apply({"params": params}, batch["x"], train=True)
      return jnp.mean((out - batch["y"]) ** 2)
    out, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["x"],
                               train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    return jnp.mean((out - batch["y"]) ** 2), updates

  return variables["params"], variables.get("batch_stats"), loss_fn


def linen_grouped_step(tx, params, stats, opt_state, loss_fn, batch, rng, groups):
  (losses, new_stats), grads, amp_grad_fn = flax_linen.grouped_value_and_grad(loss_fn)(
      params, stats, amp_optax.group_batch(batch, groups), rng)
  updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
  return optax.apply_updates(params, updates), new_stats, opt_state, losses


def test_linen_one_group_is_the_ungrouped_helper():
  params, stats, loss_fn = linen_setup()
  batch, rng = make_batch(), jax.random.key(3)
  grouped_tx = optax.chain(amp_optax.grouped_amp(0.1, inner_steps=2, num_groups=1),
                           optax.sgd(0.1))
  new_params, new_stats, _, losses = jax.jit(
      lambda p, s, b, r: linen_grouped_step(grouped_tx, p, s, grouped_tx.init(p), loss_fn, b, r,
                                            1))(params, stats, batch, rng)

  @jax.jit
  def ungrouped(params, stats, batch, rng):
    rng = jax.random.fold_in(rng, 0)  # group 0's key
    tx = optax.chain(amp_optax.amp(0.1, inner_steps=2), optax.sgd(0.1))
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch, rng)
    amp_grad_fn = flax_linen.make_grad_fn(loss_fn, stats, batch, rng)
    step, _ = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
    return optax.apply_updates(params, step), updates["batch_stats"], loss

  ref_params, ref_stats, ref_loss = ungrouped(params, stats, batch, rng)
  # Not bitwise: XLA fuses the size-1 vmap differently (float32 differences ~3e-7 relative).
  tree_allclose(new_params, ref_params, rtol=1e-6, atol=1e-8)
  tree_allclose(new_stats, ref_stats, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(losses[0], ref_loss, rtol=1e-6)


def test_linen_four_groups_is_the_core_grouped_helper():
  params, _, loss_fn = linen_setup(norm=False)
  tx = optax.chain(amp_optax.grouped_amp(0.1, inner_steps=2, num_groups=G), optax.sgd(0.1))
  opt_state = tx.init(params)
  ref_params, ref_state = params, opt_state

  def pure_loss(p, b):
    return loss_fn(p, None, b, None)

  for seed in range(2):
    batch = make_batch(seed=seed)
    params, stats, opt_state, losses = linen_grouped_step(tx, params, None, opt_state, loss_fn,
                                                          batch, None, G)
    assert stats is None and losses.shape == (G,)
    ref_losses, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(pure_loss)(
        ref_params, amp_optax.group_batch(batch, G))
    updates, ref_state = tx.update(grads, ref_state, ref_params, grad_fn=amp_grad_fn)
    ref_params = optax.apply_updates(ref_params, updates)
    tree_allclose(losses, ref_losses)
    tree_allclose(params, ref_params)


def linen_ghost_erm(params, stats, loss_fn, batch, rng, lr):
  """ERM on the ghost-BN loss, one group at a time in Python; statistics the groups' mean."""
  m = N // G

  def ghost_loss(p):
    outs = [loss_fn(p, stats, jax.tree.map(lambda x: x[j * m:(j + 1) * m], batch),  # noqa: B023
                    jax.random.fold_in(rng, j)) for j in range(G)]
    return sum(o[0] for o in outs) / G, [o[1]["batch_stats"] for o in outs]

  grads, group_stats = jax.grad(ghost_loss, has_aux=True)(params)
  new_stats = jax.tree.map(lambda *s: sum(s) / G, *group_stats)
  return jax.tree.map(lambda p, g: p - lr * g, params, grads), new_stats


def test_linen_epsilon_zero_is_ghost_batch_norm_erm():
  params, stats, loss_fn = linen_setup()
  tx = optax.chain(amp_optax.grouped_amp(0.0, num_groups=G), optax.sgd(0.1))
  batch, rng = make_batch(), jax.random.key(5)
  new_params, new_stats, _, _ = jax.jit(
      lambda p, s: linen_grouped_step(tx, p, s, tx.init(p), loss_fn, batch, rng, G))(params, stats)
  ref_params, ref_stats = jax.jit(lambda p, s: linen_ghost_erm(p, s, loss_fn, batch, rng, 0.1))(
      params, stats)
  tree_allclose(new_params, ref_params, rtol=1e-6, atol=1e-7)
  tree_allclose(new_stats, ref_stats, rtol=1e-6, atol=1e-7)
  # The statistics are not the full batch's: ghost BN with m = N / G examples per group.
  assert not np.allclose(new_stats["BatchNorm_0"]["var"],
                         jax.tree.leaves(linen_setup()[1])[1] * 0.99
                         + 0.01 * jnp.var(batch["x"] @ params["Dense_0"]["kernel"], 0))


def test_linen_learns_and_traces_once():
  params, stats, loss_fn = linen_setup()
  tx = optax.chain(amp_optax.grouped_amp(0.05, num_groups=G), optax.sgd(0.1, momentum=0.9))
  traces = []

  @jax.jit
  def step(params, stats, opt_state, batch, rng):
    traces.append(1)
    params, stats, opt_state, losses = linen_grouped_step(tx, params, stats, opt_state, loss_fn,
                                                          batch, rng, G)
    return params, stats, opt_state, losses.mean()

  opt_state, batch = tx.init(params), make_batch()
  losses = []
  for i in range(40):
    params, stats, opt_state, loss = step(params, stats, opt_state, batch, jax.random.key(i))
    losses.append(float(loss))
  assert len(traces) == 1
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_linen_has_aux_gives_aux_then_the_statistics():
  """has_aux=True: out is (losses, (aux, new_batch_stats)), aux stacked per group; the rest
  (losses, statistics, gradients, grad_fn) is what has_aux=False gives for the same loss."""
  params, stats, loss_fn = linen_setup()
  batch, rng = amp_optax.group_batch(make_batch(), G), jax.random.key(7)

  def loss_with_aux(params, batch_stats, batch, rng):
    loss, updates = loss_fn(params, batch_stats, batch, rng)
    return loss, ({"twice": 2 * loss}, updates)

  (losses, (aux, new_stats)), grads, amp_grad_fn = flax_linen.grouped_value_and_grad(
      loss_with_aux, has_aux=True)(params, stats, batch, rng)
  (want_losses, want_stats), want_grads, want_grad_fn = flax_linen.grouped_value_and_grad(
      loss_fn)(params, stats, batch, rng)
  assert losses.shape == aux["twice"].shape == (G,)
  np.testing.assert_allclose(aux["twice"], 2 * want_losses, rtol=1e-6)
  tree_equal(losses, want_losses)
  tree_equal(new_stats, want_stats)
  tree_equal(grads, want_grads)
  stacked = jax.tree.map(lambda p, g: p + 0.1 * g, params, grads)  # per-group parameters
  tree_equal(amp_grad_fn(stacked, 0), want_grad_fn(stacked, 0))
  # Not vacuous: the groups' statistics and losses differ.
  assert np.ptp(np.asarray(losses)) > 1e-3


def test_helpers_check_policies_when_curried_and_keep_the_builders_private():
  _, _, loss_fn = linen_setup()
  with pytest.raises(ValueError, match="rng_policy"):
    flax_linen.grouped_value_and_grad(loss_fn, rng_policy="new")
  with pytest.raises(ValueError, match="rng_policy"):
    flax_nnx.grouped_value_and_grad(nnx_loss, rng_policy="new")
  assert "make_grouped_grad_fn" not in flax_linen.__all__
  assert not hasattr(flax_linen, "make_grouped_grad_fn")
  assert "apply_amp_gradients" in flax_linen.__all__
  assert not hasattr(flax_linen, "apply_gradients")


# ------------------------------------------------------------------------------------------- NNX


class NnxNet(nnx.Module):

  def __init__(self, norm, rngs):
    self.fc1 = nnx.Linear(3, 8, rngs=rngs)
    self.norm = norm
    if norm:
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.fc2 = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    x = self.fc1(x)
    if self.norm:
      x = self.dropout(self.bn(x))
    return self.fc2(jnp.tanh(x))


def nnx_loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def nnx_fold_keys(model, j):
  """The model with every RNG key folded with ``j``: group ``j``'s keys."""
  keys = nnx.state(model, nnx.RngKey)
  nnx.update(model, jax.tree.map(lambda k: jax.random.fold_in(k, j), nnx.as_pure(keys)))
  return model


def nnx_grouped_step(model, optimizer, batch, groups):
  losses, grads, amp_grad_fn = flax_nnx.grouped_value_and_grad(nnx_loss)(
      model, amp_optax.group_batch(batch, groups))
  optimizer.update(model, grads, grad_fn=amp_grad_fn)
  return losses


def test_nnx_one_group_is_the_ungrouped_helper():
  model = NnxNet(True, nnx.Rngs(0))
  ref = nnx_fold_keys(nnx.clone(model), 0)
  tx = optax.chain(amp_optax.grouped_amp(0.1, inner_steps=2, num_groups=1), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  ref_tx = optax.chain(amp_optax.amp(0.1, inner_steps=2), optax.sgd(0.1))
  ref_optimizer = nnx.Optimizer(ref, ref_tx, wrt=nnx.Param)
  batch = make_batch()
  losses = nnx.jit(nnx_grouped_step, static_argnums=3)(model, optimizer, batch, 1)

  @nnx.jit
  def ungrouped(model, optimizer, batch):
    amp_grad_fn = flax_nnx.make_grad_fn(model, nnx_loss, batch)
    loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
    optimizer.update(model, grads, grad_fn=amp_grad_fn)
    return loss

  ref_loss = ungrouped(ref, ref_optimizer, batch)
  # Not bitwise: XLA fuses the size-1 vmap differently (float32 rounding).
  np.testing.assert_allclose(losses[0], ref_loss, rtol=1e-6)
  tree_allclose(nnx.as_pure(nnx.state(model, nnx.Param)), nnx.as_pure(nnx.state(ref, nnx.Param)),
                rtol=1e-6, atol=1e-8)
  tree_allclose(nnx.as_pure(nnx.state(model, nnx.BatchStat)),
                nnx.as_pure(nnx.state(ref, nnx.BatchStat)), rtol=1e-6, atol=1e-8)
  tree_equal(nnx.as_pure(nnx.state(model, nnx.RngCount)),
             nnx.as_pure(nnx.state(ref, nnx.RngCount)))


def test_nnx_four_groups_is_the_core_grouped_helper():
  model = NnxNet(False, nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)
  tx = optax.chain(amp_optax.grouped_amp(0.1, inner_steps=2, num_groups=G), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  ref_state = tx.init(params)

  def pure_loss(p, b):
    return nnx_loss(nnx.merge(graphdef, p), b)

  step = nnx.jit(nnx_grouped_step, static_argnums=3)
  for seed in range(2):
    batch = make_batch(seed=seed)
    losses = step(model, optimizer, batch, G)
    ref_losses, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(pure_loss)(
        params, amp_optax.group_batch(batch, G))
    updates, ref_state = tx.update(grads, ref_state, params, grad_fn=amp_grad_fn)
    params = optax.apply_updates(params, updates)
    tree_allclose(losses, ref_losses)
    tree_allclose(nnx.as_pure(nnx.state(model, nnx.Param)), params)


def test_nnx_epsilon_zero_is_ghost_batch_norm_erm():
  model = NnxNet(True, nnx.Rngs(0))
  start = nnx.clone(model)
  tx = optax.chain(amp_optax.grouped_amp(0.0, num_groups=G), optax.sgd(0.1))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch, m = make_batch(), N // G
  nnx.jit(nnx_grouped_step, static_argnums=3)(model, optimizer, batch, G)

  # ERM on the ghost-BN loss, group by group in Python: group j on a copy with keys folded by j.
  grads, stats, counts = [], [], []
  for j in range(G):
    copy = nnx_fold_keys(nnx.clone(start), j)
    group = jax.tree.map(lambda x: x[j * m:(j + 1) * m], batch)  # noqa: B023
    grads.append(nnx.as_pure(nnx.grad(nnx_loss)(copy, group)))
    stats.append(nnx.as_pure(nnx.state(copy, nnx.BatchStat)))
    counts.append(nnx.as_pure(nnx.state(copy, nnx.RngCount)))
  mean_grad = jax.tree.map(lambda *g: sum(g) / G, *grads)
  ref_params = jax.tree.map(lambda p, g: p - 0.1 * g, nnx.as_pure(nnx.state(start, nnx.Param)),
                            mean_grad)
  tree_allclose(nnx.as_pure(nnx.state(model, nnx.Param)), ref_params, rtol=1e-6, atol=1e-7)
  tree_allclose(nnx.as_pure(nnx.state(model, nnx.BatchStat)),
                jax.tree.map(lambda *s: sum(s) / G, *stats), rtol=1e-6, atol=1e-7)
  tree_equal(nnx.as_pure(nnx.state(model, nnx.RngCount)), counts[0])  # advanced once


def test_nnx_learns_and_traces_once():
  model = NnxNet(True, nnx.Rngs(0))
  tx = optax.chain(amp_optax.grouped_amp(0.05, num_groups=G), optax.sgd(0.1, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer, batch):
    traces.append(1)
    return nnx_grouped_step(model, optimizer, batch, G).mean()

  batch = make_batch()
  losses = [float(step(model, optimizer, batch)) for _ in range(40)]
  assert len(traces) == 1
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_nnx_has_aux_and_extra_args():
  """has_aux=True gives (losses, aux) stacked per group; an argument after the grouped batch
  is passed to every group as it is. Losses and the step equal those without aux."""
  model = NnxNet(True, nnx.Rngs(0))
  ref = nnx.clone(model)
  batch = amp_optax.group_batch(make_batch(), G)

  def loss_with_aux(model, batch, scale):
    loss = scale * nnx_loss(model, batch)
    return loss, {"twice": 2 * loss}

  @nnx.jit
  def both(model, ref, batch):
    (losses, aux), grads, _ = flax_nnx.grouped_value_and_grad(loss_with_aux, has_aux=True)(
        model, batch, jnp.float32(3.0))
    want, want_grads, _ = flax_nnx.grouped_value_and_grad(
        lambda m, b: 3.0 * nnx_loss(m, b))(ref, batch)
    return losses, aux, grads, want, want_grads

  losses, aux, grads, want, want_grads = both(model, ref, batch)
  assert losses.shape == aux["twice"].shape == (G,)
  tree_allclose(losses, want, rtol=1e-6, atol=0)
  np.testing.assert_allclose(aux["twice"], 2 * losses, rtol=1e-6)
  tree_allclose(nnx.as_pure(grads), nnx.as_pure(want_grads), rtol=1e-6, atol=1e-8)
  tree_equal(nnx.as_pure(nnx.state(model, nnx.BatchStat)),
             nnx.as_pure(nnx.state(ref, nnx.BatchStat)))


def test_equinox_grouped_value_and_grad_matches_the_pure_helper():
  eqx = pytest.importorskip("equinox")
  from amp_optax import equinox as amp_eqx

  class Net(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.hidden = eqx.nn.Linear(5, 8, key=k1)
      self.out = eqx.nn.Linear(8, 2, key=k2)

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  def loss_fn(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  model = Net(jax.random.key(0))
  kx, ky = jax.random.split(jax.random.key(1))
  x, y = jax.random.normal(kx, (16, 5)), jax.random.normal(ky, (16, 2))
  tx = amp_optax.grouped_amp(0.1, inner_steps=2, num_groups=4)
  params, static = eqx.partition(model, eqx.is_inexact_array)

  @eqx.filter_jit
  def step(model):
    _, grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(loss_fn)(
        model, *amp_optax.group_batch((x, y), 4))
    p = eqx.filter(model, eqx.is_inexact_array)
    return tx.update(grads, tx.init(p), p, grad_fn=amp_grad_fn)[0]

  got = step(model)
  pure = lambda p, b: loss_fn(eqx.combine(p, static), b["x"], b["y"])  # noqa: E731
  _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(pure)(
      params, amp_optax.group_batch({"x": x, "y": y}, 4))
  want, _ = tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

  _, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(2, axis_name="batch", mode="batch")
  with pytest.raises(TypeError, match="stateless models only"):
    amp_eqx.grouped_value_and_grad(lambda m, s, x: 0.0)(model, state, x)


def _recording(inner):
  """``inner``, recording whether ``updates`` are the arrays the helper returned with grad_fn."""
  seen = {}

  def update(updates, state, params=None, **extra_args):
    seen["same"] = ({id(x) for x in jax.tree.leaves(updates)}
                    == extra_args["grad_fn"].clean_ids)
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update), seen


def test_nnx_optimizer_hands_grouped_amp_the_helper_s_own_gradients():
  # What grouped_amp's check under batch_axis_name relies on (no false error through
  # nnx.Optimizer): the arrays reaching tx.update are the ones the helper returned.
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(2, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.fc2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.bn(self.fc1(x))))

  model = Net(nnx.Rngs(0))
  tx, seen = _recording(optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1)))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)

  @nnx.jit
  def train_step(model, optimizer, batch):
    _, grads, amp_grad_fn = flax_nnx.grouped_value_and_grad(loss_fn)(
        model, amp_optax.group_batch(batch, 4))
    optimizer.update(model, grads, grad_fn=amp_grad_fn)

  train_step(model, optimizer, {"x": jnp.ones((8, 2)), "y": jnp.zeros((8, 1))})
  assert seen == {"same": True}


def test_equinox_and_plain_helpers_hand_grouped_amp_their_own_gradients():
  eqx = pytest.importorskip("equinox")
  from amp_optax import equinox as amp_eqx
  x, y = jnp.ones((8, 2)), jnp.zeros((8, 1))
  model = eqx.nn.MLP(2, 1, 8, 1, key=jax.random.key(0))
  tx, seen = _recording(optax.chain(amp_optax.grouped_amp(0.05, num_groups=4), optax.sgd(0.1)))
  params = eqx.filter(model, eqx.is_array)

  def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)

  _, grads, amp_grad_fn = amp_eqx.grouped_value_and_grad(loss)(
      model, *amp_optax.group_batch((x, y), 4))
  tx.update(grads, tx.init(params), params, grad_fn=amp_grad_fn)
  assert seen == {"same": True}
  _, grads, amp_grad_fn = amp_optax.grouped_value_and_grad(
      lambda p, b: loss(eqx.combine(p, eqx.filter(model, eqx.is_array, inverse=True)), *b))(
          params, amp_optax.group_batch((x, y), 4))
  tx.update(jax.tree.map(lambda g: g * 1.0, grads), tx.init(params), params,
            grad_fn=amp_grad_fn)
  assert seen == {"same": False}  # a changed gradient is seen as changed
