"""Loss scaling (Flax's DynamicScale, float16) with the Linen and NNX helpers.

The perturbed passes are scaled and unscaled as the clean one, and a non-finite perturbed
gradient joins the step's skip decision. With ``epsilon=0`` an AMP step is the ERM
DynamicScale step bit for bit on one device, skipped steps included.
"""

import functools
from typing import Any

from flax import jax_utils
from flax import nnx
import flax.linen as nn
from flax.training import dynamic_scale as dynamic_scale_lib
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import _policies
from amp_optax import flax_linen
from amp_optax import flax_nnx

pytestmark = pytest.mark.slow

DynamicScale = dynamic_scale_lib.DynamicScale
# Scales at which the float16 backward pass of these models overflows: the first steps are
# skipped and the scale backs off until it fits (2**16 for the NNX MLP).
OVERFLOWING_SCALE = 2.0**24
NNX_OVERFLOWING_SCALE = 2.0**19


class HalfNet(nn.Module):
  """Computes in float16, float32 parameters and statistics, as Flax's ImageNet ResNet."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(16, dtype=jnp.float16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=jnp.float16)(x)
    return nn.Dense(3, dtype=jnp.float16)(nn.relu(x))


MODEL = HalfNet()


class TrainState(flax_linen.TrainState):
  """Flax's ImageNet example's state, on ours."""

  batch_stats: Any
  dynamic_scale: DynamicScale


def _batches(n_steps, n=32, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 6)) * 2.0
  out = []
  for _ in range(n_steps):
    labels = rng.integers(0, 3, size=n)
    x = centres[labels] + rng.normal(size=(n, 6))
    out.append({"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels)})
  return out


def _state(epsilon=None, scale=OVERFLOWING_SCALE, batch_axis_name=None):
  variables = MODEL.init(jax.random.key(0), jnp.ones((1, 6)), train=False)
  tx = optax.sgd(0.05, momentum=0.9)
  if epsilon is not None:
    tx = optax.chain(amp_optax.amp(epsilon, batch_axis_name=batch_axis_name), tx)
  return TrainState.create(apply_fn=MODEL.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"],
                           dynamic_scale=DynamicScale(scale=scale))


def _own_step(amp):
  """The ImageNet example's step on one device; with AMP, the lines marked AMP."""

  @jax.jit
  def train_step(state, batch):
    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"],
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), batch["label"]).mean()
      return loss, (new_model_state, logits)

    grad_fn = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True)
    dynamic_scale, is_fin, aux, grads = grad_fn(state.params)
    new_model_state, _ = aux[1]
    extra = {}
    if amp:  # AMP
      extra["grad_fn"] = flax_linen.make_grad_fn(loss_fn, has_aux=True,
                                                 dynamic_scale=state.dynamic_scale)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"],
                                      **extra)
    if amp:  # AMP
      dynamic_scale, is_fin = flax_linen.dynamic_scale_after_amp(
          state.dynamic_scale, is_fin, new_state.opt_state)
    keep = functools.partial(jnp.where, is_fin)
    return new_state.replace(
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        params=jax.tree.map(keep, new_state.params, state.params),
        dynamic_scale=dynamic_scale), is_fin

  return train_step


def _explicit_loss(params, batch_stats, batch, rng):
  logits, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["label"]).mean()
  return loss, (logits, updates)


@jax.jit
def _amp_step(state, batch):
  return flax_linen.amp_step(state, _explicit_loss, batch, has_aux=True)


def _run(step, state, batches):
  history = []
  for batch in batches:
    new_state, _ = step(state, batch)
    history.append((state, new_state))
    state = new_state
  return state, history


def _identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _assert_skipped(before, after):
  _identical(after.params, before.params)
  _identical(after.opt_state, before.opt_state)
  assert float(after.dynamic_scale.scale) == float(before.dynamic_scale.scale) / 2
  assert int(after.dynamic_scale.fin_steps) == 0


@pytest.mark.parametrize("form", ["own_step", "amp_step"])
def test_linen_epsilon_zero_is_the_erm_dynamic_scale_step_bit_for_bit(form):
  batches = _batches(8)
  erm, erm_history = _run(_own_step(False), _state(), batches)
  amp, amp_history = _run(_own_step(True) if form == "own_step" else _amp_step, _state(0.0),
                          batches)
  _identical((amp.params, amp.batch_stats, amp.opt_state[1], amp.dynamic_scale, amp.step),
             (erm.params, erm.batch_stats, erm.opt_state, erm.dynamic_scale, erm.step))
  # The run holds skipped steps (the scale overflowed) and applied ones.
  skipped = [float(a.dynamic_scale.scale) < float(b.dynamic_scale.scale) for b, a in amp_history]
  assert skipped[0] and not all(skipped), skipped
  _assert_skipped(*amp_history[0])
  assert int(amp_history[0][1].step) == 1  # the step count advances, as in Flax's example.


class Regression(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, dtype=jnp.float16)(x)


def _regression_loss(params, x, y):
  out = Regression().apply({"params": params}, x)
  return jnp.mean((out.astype(jnp.float32) - y) ** 2)


def _regression_data(n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
  return x, jnp.asarray(rng.normal(size=(n, 1)) * 0.1, jnp.float32)


@jax.jit
def _finite_at(scale, params, x, y):
  return DynamicScale(scale=scale).value_and_grad(_regression_loss)(params, x, y)[1]


def _scale_that_only_a_perturbed_pass_overflows(params, batches, epsilon):
  """The largest power of two at which every clean float16 backward pass is finite, checked to
  overflow the perturbed pass on the first batch (AMP's K=1 ascent raises the loss, and with
  it the cotangents). The ascent starts from the gradient averaged over ``batches``."""
  grads = jax.tree.map(lambda *g: sum(g) / len(g),
                       *[jax.grad(_regression_loss)(params, x, y) for x, y in batches])
  # AMP's single step with inner_lr=1: the gradient, projected into each tensor's ball.
  perturbed = jax.tree.map(
      lambda p, g: p + g * jnp.minimum(1.0, epsilon / jnp.linalg.norm(g)), params, grads)
  scale = max(2.0**k for k in range(64)
              if all(bool(_finite_at(2.0**k, params, x, y)) for x, y in batches))
  assert not bool(_finite_at(scale, perturbed, *batches[0])), "raise epsilon"
  return scale


def test_linen_a_perturbed_overflow_alone_skips_the_step():
  x, y = _regression_data()
  params = Regression().init(jax.random.key(0), x)["params"]
  epsilon = 2.0
  scale = _scale_that_only_a_perturbed_pass_overflows(params, [(x, y)], epsilon)
  state = TrainState.create(
      apply_fn=Regression().apply, params=params, batch_stats=None,
      tx=optax.chain(amp_optax.amp(epsilon), optax.sgd(0.1)),
      dynamic_scale=DynamicScale(scale=scale))

  @jax.jit
  def train_step(state):
    def loss_fn(params):
      return _regression_loss(params, x, y)

    dynamic_scale, is_fin, _, grads = state.dynamic_scale.value_and_grad(loss_fn)(state.params)
    amp_grad_fn = flax_linen.make_grad_fn(loss_fn, dynamic_scale=state.dynamic_scale)
    new_state = state.apply_gradients(grads=grads, grad_fn=amp_grad_fn)
    clean_is_fin = is_fin
    dynamic_scale, is_fin = flax_linen.dynamic_scale_after_amp(
        state.dynamic_scale, is_fin, new_state.opt_state)
    keep = functools.partial(jnp.where, is_fin)
    return new_state.replace(
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        params=jax.tree.map(keep, new_state.params, state.params),
        dynamic_scale=dynamic_scale), clean_is_fin, is_fin

  new_state, clean_is_fin, is_fin = train_step(state)
  assert bool(clean_is_fin) and not bool(is_fin)  # the clean pass alone would have stepped.
  _assert_skipped(state, new_state)
  for _ in range(8):  # the scale backs off until the perturbed pass fits; then steps are taken.
    new_state, _, is_fin = train_step(new_state)
    if bool(is_fin):
      break
  assert bool(is_fin)
  assert not np.array_equal(new_state.params["Dense_0"]["kernel"],
                            state.params["Dense_0"]["kernel"])


def test_pmap_a_perturbed_overflow_on_one_device_skips_on_all():
  devices = jax.devices()[:4]
  x, y = _regression_data(n=16)
  params = Regression().init(jax.random.key(0), x)["params"]
  epsilon = 2.0
  # Device 0's batch has large targets: only its perturbed pass overflows at this scale.
  xs, ys = x.reshape(4, 4, 4), y.reshape(4, 4, 1).at[0].add(3.0)
  scale = _scale_that_only_a_perturbed_pass_overflows(params, list(zip(xs, ys)), epsilon)
  assert all(bool(_finite_at(scale, params, xs[i], ys[i])) for i in range(1, 4))
  tx = optax.chain(amp_optax.amp(epsilon, batch_axis_name="batch"), optax.sgd(0.1))
  state = TrainState.create(apply_fn=Regression().apply, params=params, batch_stats=None, tx=tx,
                            dynamic_scale=DynamicScale(scale=scale))

  def train_step(state, x, y):
    def loss_fn(params):
      return _regression_loss(params, x, y)

    _, is_fin, _, grads = state.dynamic_scale.value_and_grad(loss_fn, axis_name="batch")(
        state.params)
    amp_grad_fn = flax_linen.make_grad_fn(loss_fn, dynamic_scale=state.dynamic_scale)
    new_state = state.apply_gradients(grads=grads, grad_fn=amp_grad_fn)
    clean_is_fin = is_fin
    dynamic_scale, is_fin = flax_linen.dynamic_scale_after_amp(
        state.dynamic_scale, is_fin, new_state.opt_state)
    keep = functools.partial(jnp.where, is_fin)
    return new_state.replace(
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        params=jax.tree.map(keep, new_state.params, state.params),
        dynamic_scale=dynamic_scale), clean_is_fin, is_fin

  replicated = jax_utils.replicate(state, devices=devices)
  new_state, clean_is_fin, is_fin = jax.pmap(train_step, axis_name="batch", devices=devices)(
      replicated, xs, ys)
  assert np.asarray(clean_is_fin).all() and not np.asarray(is_fin).any()
  for i in range(4):  # every replica skipped and backed off alike.
    replica = jax.tree.map(lambda a, i=i: a[i], new_state)
    _assert_skipped(state, replica)


def test_amp_step_under_pmap_averages_over_axis_name():
  devices = jax.devices()[:4]
  batches = [jax.tree.map(lambda a: a.reshape((4, -1) + a.shape[1:]), b) for b in _batches(4)]

  def erm_step(state, batch):  # Flax's ImageNet step, ERM
    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"],
          mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), batch["label"]).mean()
      return loss, (new_model_state, logits)

    grad_fn = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name="batch")
    dynamic_scale, is_fin, aux, grads = grad_fn(state.params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=jax.lax.pmean(aux[1][0]["batch_stats"], "batch"))
    keep = functools.partial(jnp.where, is_fin)
    return new_state.replace(
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        params=jax.tree.map(keep, new_state.params, state.params), dynamic_scale=dynamic_scale)

  def amp_step(state, batch):
    return flax_linen.amp_step(state, _explicit_loss, batch, has_aux=True, axis_name="batch")[0]

  runs = []
  for epsilon, step in ((None, erm_step), (0.0, amp_step)):
    state = jax_utils.replicate(_state(epsilon, batch_axis_name="batch"), devices=devices)
    p_step = jax.pmap(step, axis_name="batch", devices=devices)
    for batch in batches:
      state = p_step(state, batch)
    runs.append(state)
  erm, amp = runs
  for got, want in [(amp.params, erm.params), (amp.batch_stats, erm.batch_stats),
                    (amp.opt_state[1], erm.opt_state), (amp.dynamic_scale, erm.dynamic_scale)]:
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-6)
  assert float(amp.dynamic_scale.scale[0]) < OVERFLOWING_SCALE  # skipped steps included


@pytest.mark.parametrize(("fin_steps", "finite"), [(0, True), (0, False), (3, True), (3, False)])
def test_the_scale_is_updated_by_flax_s_own_rule(fin_steps, finite):
  dynamic_scale = DynamicScale(growth_interval=3, fin_steps=fin_steps, scale=8.0,
                               minimum_scale=6.0)
  want, _, _, _ = dynamic_scale.value_and_grad(lambda x: x * (1.0 if finite else jnp.inf))(1.0)
  got = _policies.dynamic_scale_given(dynamic_scale, jnp.asarray(finite))
  _identical(got, want)


def test_a_wrong_dynamic_scale_or_opt_state_says_what_to_pass():
  with pytest.raises(TypeError, match="DynamicScale"):
    flax_linen.make_grad_fn(lambda p: jnp.sum(p), dynamic_scale=2.0**15)
  with pytest.raises(ValueError, match="exactly one amp_optax.amp"):
    flax_linen.dynamic_scale_after_amp(DynamicScale(), True, optax.sgd(0.1).init({}))


# NNX ------------------------------------------------------------------------------------------


class HalfMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, dtype=jnp.float16, rngs=rngs)
    self.out = nnx.Linear(16, 3, dtype=jnp.float16, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _nnx_loss(model, batch):
  logits = model(batch["image"]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()


def _pure_state(model, optimizer):
  return nnx.as_pure((nnx.state(model, nnx.Param), nnx.state(optimizer.opt_state)))


def _keep_where_finite(is_fin, model, optimizer, before):
  """The ImageNet example's skip: parameters and optimiser state as they were if not finite."""
  after = _pure_state(model, optimizer)
  params, opt_state = jax.tree.map(functools.partial(jnp.where, is_fin), after, before)
  nnx.update(model, params)
  nnx.update(optimizer.opt_state, opt_state)


@nnx.jit
def _nnx_erm_step(model, optimizer, dynamic_scale, batch):
  """An NNX ERM step with DynamicScale, written as a user would: its value_and_grad on a pure
  function of the parameters, and the ImageNet example's skip."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def pure_loss(params):
    return _nnx_loss(nnx.merge(graphdef, params, rest), batch)

  before = _pure_state(model, optimizer)
  new_scale, is_fin, _, grads = dynamic_scale.value_and_grad(pure_loss)(params)
  optimizer.update(model, grads)
  _keep_where_finite(is_fin, model, optimizer, before)
  return new_scale, is_fin


def _nnx_setup(epsilon):
  model = HalfMLP(nnx.Rngs(0))
  tx = optax.sgd(0.05, momentum=0.9)
  if epsilon is not None:
    tx = optax.chain(amp_optax.amp(epsilon), tx)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def _nnx_amp_step(model, optimizer, dynamic_scale, batch):
  _, dynamic_scale, is_fin = flax_nnx.amp_step(model, optimizer, _nnx_loss, batch,
                                               dynamic_scale=dynamic_scale)
  return dynamic_scale, is_fin


@nnx.jit
def _nnx_own_step(model, optimizer, dynamic_scale, batch):
  """A user's NNX step with make_grad_fn and dynamic_scale_after_amp."""
  amp_grad_fn = flax_nnx.make_grad_fn(model, _nnx_loss, batch, dynamic_scale=dynamic_scale)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def pure_loss(params):
    return _nnx_loss(nnx.merge(graphdef, params, rest), batch)

  before = _pure_state(model, optimizer)
  _, is_fin, _, grads = dynamic_scale.value_and_grad(pure_loss)(params)
  optimizer.update(model, grads, grad_fn=amp_grad_fn)
  new_scale, is_fin = flax_nnx.dynamic_scale_after_amp(dynamic_scale, is_fin,
                                                       optimizer.opt_state)
  _keep_where_finite(is_fin, model, optimizer, before)
  return new_scale, is_fin


@pytest.mark.parametrize("step", [_nnx_amp_step, _nnx_own_step], ids=["amp_step", "own_step"])
def test_nnx_epsilon_zero_is_the_erm_dynamic_scale_step_bit_for_bit(step):
  runs = {}
  for name, epsilon, train_step in (("erm", None, _nnx_erm_step), ("amp", 0.0, step)):
    model, optimizer = _nnx_setup(epsilon)
    dynamic_scale, history = DynamicScale(scale=NNX_OVERFLOWING_SCALE), []
    for batch in _batches(6):
      before = (nnx.as_pure(nnx.state(model, nnx.Param)), nnx.as_pure(optimizer.opt_state))
      dynamic_scale, is_fin = train_step(model, optimizer, dynamic_scale, batch)
      history.append((before, bool(is_fin), float(dynamic_scale.scale)))
    runs[name] = (model, optimizer, dynamic_scale, history)
  (erm_model, erm_opt, erm_scale, erm_history), (amp_model, amp_opt, amp_scale, amp_history) = (
      runs["erm"], runs["amp"])
  _identical(nnx.state(amp_model), nnx.state(erm_model))
  _identical(nnx.as_pure(amp_opt.opt_state)[1], nnx.as_pure(erm_opt.opt_state))
  _identical(amp_scale, erm_scale)
  assert [h[1:] for h in amp_history] == [h[1:] for h in erm_history]
  finite = [h[1] for h in amp_history]
  assert not finite[0] and any(finite), finite  # skipped steps, then applied ones.
  (params_before, opt_before), _, scale_after = amp_history[0]
  params_after, opt_after = amp_history[1][0]
  _identical(params_after, params_before)  # the skipped step kept params and opt_state.
  _identical(opt_after, opt_before)
  assert scale_after == NNX_OVERFLOWING_SCALE / 2


def test_nnx_a_perturbed_overflow_alone_skips_the_step():
  x, y = _regression_data()
  model = nnx.Linear(4, 1, dtype=jnp.float16, rngs=nnx.Rngs(0))
  linen_params = {"Dense_0": {"kernel": model.kernel[...], "bias": model.bias[...]}}
  epsilon = 2.0
  scale = _scale_that_only_a_perturbed_pass_overflows(linen_params, [(x, y)], epsilon)

  def loss_fn(model, x, y):
    return jnp.mean((model(x).astype(jnp.float32) - y) ** 2)

  optimizer = nnx.Optimizer(model, optax.chain(amp_optax.amp(epsilon), optax.sgd(0.1)),
                            wrt=nnx.Param)
  before = nnx.as_pure((nnx.state(model), optimizer.opt_state))
  step = nnx.jit(lambda m, o, d: flax_nnx.amp_step(m, o, loss_fn, x, y, dynamic_scale=d))
  _, dynamic_scale, is_fin = step(model, optimizer, DynamicScale(scale=scale))
  assert not bool(is_fin) and float(dynamic_scale.scale) == scale / 2
  _identical(nnx.as_pure((nnx.state(model), optimizer.opt_state)), before)
  # The clean pass alone was finite at that scale: without AMP the step would have been taken.
  grads = nnx.grad(lambda m: scale * loss_fn(m, x, y))(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  for _ in range(8):  # the scale backs off until the perturbed pass fits.
    _, dynamic_scale, is_fin = step(model, optimizer, dynamic_scale)
    if bool(is_fin):
      break
  assert bool(is_fin)
