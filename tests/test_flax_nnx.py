"""Tests of amp_optax.flax_nnx: pure grad_fn, nnx.Optimizer pattern, state policies."""


from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from value_recorder import record_value

import amp_optax
from amp_optax import flax_nnx

EPS = 0.3
LR = 0.1


class Net(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
    self.fc1 = nnx.Linear(4, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.dropout(nnx.relu(self.bn(self.fc1(x)))))


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _data(n=96, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 4)) * 2.0
  labels = rng.integers(0, 3, size=n)
  x = centres[labels] + rng.normal(size=(n, 4))
  return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def _setup(dropout=0.0, epsilon=EPS, inner_steps=1, base=None, amp=True):
  model = Net(nnx.Rngs(0, dropout=1), dropout)
  base = optax.sgd(LR) if base is None else base
  tx = optax.chain(amp_optax.amp(epsilon, inner_steps=inner_steps), base) if amp else base
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _pure(model, filt):
  return nnx.as_pure(nnx.state(model, filt))


def _numpy(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _allclose(a, b, **kw):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(_numpy(u), _numpy(v), **kw)


def _max_abs_diff(a, b):
  return max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@nnx.jit(static_argnames=("stats_policy", "rng_policy"))
def _amp_step(model, optimizer, x, y, stats_policy="clean", rng_policy="same"):
  return flax_nnx.amp_step(model, optimizer, loss_fn, x, y, stats_policy=stats_policy,
                           rng_policy=rng_policy)


@pytest.mark.slow
def test_optimizer_update_pattern_trains_batchnorm_dropout_model():
  model, optimizer = _setup(dropout=0.1, inner_steps=2, base=optax.sgd(0.2, momentum=0.9))

  @nnx.jit
  def train_step(model, optimizer, x, y):
    amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, x, y)
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, grad_fn=amp_grad_fn)
    return loss

  x, y = _data()
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(40)]
  assert losses[-1] < 0.3 * losses[0], losses
  assert int(optimizer.step[...]) == 40
  assert float(jnp.abs(model.bn.mean[...]).max()) > 0.1
  assert int(model.dropout.rngs.count[...]) == 40  # one clean pass per step.


def _hand_written_step(model, optimizer, x, y):
  """The nnx.Optimizer pattern with a grad_fn written out by hand."""
  graphdef, _, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
  rng_state, rest = nnx.as_pure(rng_state), nnx.as_pure(rest)  # arrays, not Variables.

  def grad_fn(params, inner_step):
    del inner_step
    def perturbed_loss(p):
      return loss_fn(nnx.merge(graphdef, p, rng_state, rest), x, y)
    return jax.grad(perturbed_loss)(params)

  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


def test_amp_step_equals_hand_written_reference():
  x, y = _data()
  model, optimizer = _setup(dropout=0.3, inner_steps=2)
  ref_model, ref_optimizer = _setup(dropout=0.3, inner_steps=2)
  ref_step = nnx.jit(_hand_written_step)
  for _ in range(3):
    loss = _amp_step(model, optimizer, x, y)
    ref_loss = ref_step(ref_model, ref_optimizer, x, y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  _allclose(nnx.state(model), nnx.state(ref_model), rtol=1e-5, atol=1e-6)
  _allclose(nnx.state(optimizer), nnx.state(ref_optimizer), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_clean_policy_keeps_the_clean_pass_statistics():
  x, y = _data()
  model, optimizer = _setup(dropout=0.3, inner_steps=2)
  clean = nnx.clone(model)
  clean(x)  # the clean pass alone: BatchNorm statistics and RNG count advance.
  _amp_step(model, optimizer, x, y)
  _allclose(_pure(model, nnx.BatchStat), _pure(clean, nnx.BatchStat), rtol=1e-6, atol=1e-7)
  _allclose(_pure(model, nnx.RngState), _pure(clean, nnx.RngState), rtol=0, atol=0)


@pytest.mark.slow
def test_grad_fn_is_forwarded_and_epsilon_zero_is_erm():
  x, y = _data()
  erm_model, erm_optimizer = _setup(dropout=0.3, amp=False)

  @nnx.jit
  def erm_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  zero_model, zero_optimizer = _setup(dropout=0.3, epsilon=0.0, inner_steps=2)
  amp_model, amp_optimizer = _setup(dropout=0.3)
  for _ in range(2):
    erm_step(erm_model, erm_optimizer, x, y)
    _amp_step(zero_model, zero_optimizer, x, y)
    _amp_step(amp_model, amp_optimizer, x, y)
  _allclose(nnx.state(zero_model), nnx.state(erm_model), rtol=1e-5, atol=1e-7)
  assert _max_abs_diff(_pure(amp_model, nnx.Param), _pure(erm_model, nnx.Param)) > 1e-4


@nnx.jit(static_argnames="inner_steps")
def _manual_authors(start, x, y, inner_steps):
  """AMP by hand (per-tensor ball, inner_lr=1) with sequential BatchNorm updates.

  Every pass starts from the initial RNG state and the previous pass's
  statistics.
  """
  params = _pure(start, nnx.Param)
  clean = nnx.clone(start)
  g = nnx.as_pure(nnx.grad(loss_fn)(clean, x, y))
  clean_stats = stats = _pure(clean, nnx.BatchStat)
  delta = jax.tree.map(jnp.zeros_like, params)
  for _ in range(inner_steps):
    delta = amp_optax.project_per_tensor(jax.tree.map(jnp.add, delta, g), EPS)
    perturbed = nnx.clone(start)
    nnx.update(perturbed, jax.tree.map(jnp.add, params, delta), stats)
    g = nnx.as_pure(nnx.grad(loss_fn)(perturbed, x, y))
    stats = _pure(perturbed, nnx.BatchStat)
  new_params = jax.tree.map(lambda p, gi: p - LR * gi, params, g)
  return new_params, stats, clean_stats, _pure(clean, nnx.RngState)


@pytest.mark.slow
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_authors_policy_equals_sequential_updates(inner_steps):
  x, y = _data()
  model, optimizer = _setup(dropout=0.3, inner_steps=inner_steps)
  want_params, want_stats, clean_stats, clean_rngs = _manual_authors(
      nnx.clone(model), x, y, inner_steps)
  _amp_step(model, optimizer, x, y, stats_policy="authors")
  _allclose(_pure(model, nnx.Param), want_params, rtol=1e-5, atol=1e-6)
  _allclose(_pure(model, nnx.BatchStat), want_stats, rtol=1e-5, atol=1e-6)
  assert _max_abs_diff(_pure(model, nnx.BatchStat), clean_stats) > 1e-4
  # The RNG state advanced once (the clean pass), whatever the policy.
  _allclose(_pure(model, nnx.RngState), clean_rngs, rtol=0, atol=0)


@pytest.mark.slow
def test_grad_fn_is_pure_and_rng_policies():
  x, y = _data()
  model, _ = _setup(dropout=0.5)
  same = flax_nnx.make_grad_fn(model, loss_fn, x, y)  # before the clean pass, as documented.
  folded = flax_nnx.make_grad_fn(model, loss_fn, x, y, rng_policy="fold_in")
  params = _pure(model, nnx.Param)
  clean_grads = nnx.as_pure(nnx.grad(loss_fn)(model, x, y))
  after_clean = nnx.clone(model)
  g_same = jax.jit(same)(params, 0)
  g_fold0, g_fold1 = folded(params, 0), folded(params, jnp.int32(1))
  # grad_fn never touches the model.
  _allclose(nnx.state(model), nnx.state(after_clean), rtol=0, atol=0)
  # At the unperturbed point "same" reproduces the clean pass (same dropout mask).
  _allclose(g_same, clean_grads, rtol=1e-5, atol=1e-6)
  assert _max_abs_diff(g_fold0, clean_grads) > 1e-3
  assert _max_abs_diff(g_fold0, g_fold1) > 1e-3
  with pytest.raises(ValueError, match="rng_policy"):
    flax_nnx.make_grad_fn(model, loss_fn, x, y, rng_policy="new")
  _, optimizer = _setup()
  with pytest.raises(ValueError, match="stats_policy"):
    flax_nnx.amp_step(model, optimizer, loss_fn, x, y, stats_policy="perturbed")


@pytest.mark.slow
def test_fold_in_policy_trains():
  x, y = _data()
  model, optimizer = _setup(dropout=0.2, inner_steps=2)
  losses = [float(_amp_step(model, optimizer, x, y, stats_policy="authors",
                            rng_policy="fold_in")) for _ in range(25)]
  assert losses[-1] < 0.5 * losses[0], losses


def test_has_aux_and_value_pass_through():
  x, y = _data()
  model, optimizer = _setup(base=optax.chain(record_value(), optax.sgd(LR)))

  def loss_with_aux(model, x, y):
    loss = loss_fn(model, x, y)
    return loss, {"twice": 2 * loss}

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, aux = flax_nnx.amp_step(model, optimizer, loss_with_aux, x, y, has_aux=True,
                                  tx_kwargs={"value": jnp.float32(7.0)})
    return loss, aux

  loss, aux = step(model, optimizer, x, y)
  np.testing.assert_allclose(aux["twice"], 2 * loss, rtol=1e-6)
  assert float(optimizer.opt_state[1][0].value[...]) == 7.0
