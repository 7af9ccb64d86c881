"""AMP in the shape of Flax's larger examples: our own small models and synthetic data.

* ImageNet-style (Linen): a ResNet with cross-replica BatchNorm, a ``TrainState`` subclass with
  ``batch_stats`` and ``dynamic_scale``, Flax's closure ``loss_fn(params)``, ``jax.pmap`` over
  the axis ``'batch'`` of 4 devices with ``lax.pmean`` of the gradients and statistics, float16
  with DynamicScale (the GPU path) and bfloat16 without (the TPU path). AMP adds the lines under
  ``if amp`` (``make_grad_fn``, ``dynamic_scale_after_amp``) and ``amp(...,
  batch_axis_name='batch')`` first in the chain.
* miniGPT-style (NNX): a transformer with dropout (its ``nnx.Rngs`` in the model),
  ``nnx.jit`` with donated arguments, adam, explicit sharding on a 2x2 ``('batch', 'model')``
  mesh. AMP adds one line, ``grad_fn=amp_grad_fn`` and ``amp`` first in the chain.

What epsilon=0 gives against ERM, measured (max abs difference; to print them again:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_flax_users_code.py``):

* ImageNet-style, 4 devices, 8 steps: 0 in float16 (skipped steps included) and in bfloat16,
  in the parameters, statistics and optimiser state. A float32 variant differs by 6e-8 (1.2e-7
  after 20 steps): the ERM and the AMP step are different programs, which XLA may round
  differently under ``pmap``; one device under ``jit`` is bitwise (test_flax_loss_scale.py).
  Pinned: 1e-6.
* miniGPT-style, 30 steps: in float32, 1.1e-3 in the attention's key bias and 9e-8 elsewhere.
  The key bias has a zero gradient (softmax ignores a shift shared by a query's logits), so
  its gradient is rounding noise, which adam divides by its own size: steps of about the
  learning rate in a random direction. In float64 the noise (about 1e-16 of the gradients' size)
  is far below adam's eps (1e-8) and is not amplified: 2.2e-16. Pinned: 1e-10, in float64.
"""

import functools
from typing import Any

from flax import jax_utils
from flax import nnx
import flax.linen as nn
from flax.training import dynamic_scale as dynamic_scale_lib
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.sharding import reshard
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import flax_linen
from amp_optax import flax_nnx

pytestmark = pytest.mark.slow

# ImageNet-style (Linen, pmap) -------------------------------------------------------------------

NUM_DEVICES = 4
# epsilon=0 against ERM across the 4 devices: identical as measured; float32 rounding allowed.
PMAP_TOLERANCE = 1e-6


class SmallResNet(nn.Module):
  """A ResNet stem and one residual block, with BatchNorm synchronised over 'batch'."""

  num_classes: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name="batch")
    x = nn.relu(norm()(conv(8, (3, 3), (2, 2))(x)))
    y = nn.relu(norm()(conv(8, (3, 3))(x)))
    y = norm(scale_init=nn.initializers.zeros_init())(conv(8, (3, 3))(y))
    x = jnp.mean(nn.relu(x + y), axis=(1, 2))
    return jnp.asarray(nn.Dense(self.num_classes, dtype=self.dtype)(x), self.dtype)


class TrainState(flax_linen.TrainState):  # Flax's ImageNet example subclasses Flax's the same way
  batch_stats: Any
  dynamic_scale: dynamic_scale_lib.DynamicScale


def imagenet_style_train_step(state, batch, amp):
  """Flax's ImageNet ``train_step``, with the AMP lines under ``if amp``."""

  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"]).mean()
    return loss, (new_model_state, logits)

  dynamic_scale = state.dynamic_scale
  if dynamic_scale:
    grad_fn = dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name="batch")
    dynamic_scale, is_fin, aux, grads = grad_fn(state.params)
  else:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    aux, grads = grad_fn(state.params)
    grads = lax.pmean(grads, axis_name="batch")
  new_model_state, _ = aux[1]
  amp_args = {}
  if amp:  # AMP: the perturbed passes, scaled as the clean one.
    amp_args["grad_fn"] = flax_linen.make_grad_fn(loss_fn, has_aux=True,
                                                  dynamic_scale=state.dynamic_scale)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=lax.pmean(new_model_state["batch_stats"], "batch"), **amp_args)
  if dynamic_scale:
    if amp:  # AMP: skip also when a perturbed gradient is not finite.
      dynamic_scale, is_fin = flax_linen.dynamic_scale_after_amp(
          state.dynamic_scale, is_fin, new_state.opt_state)
    keep = functools.partial(jnp.where, is_fin)
    new_state = new_state.replace(
        opt_state=jax.tree.map(keep, new_state.opt_state, state.opt_state),
        params=jax.tree.map(keep, new_state.params, state.params),
        dynamic_scale=dynamic_scale)
  return new_state, lax.pmean(aux[0], "batch")


def _image_batches(n_steps, per_device=8, seed=0):
  rng = np.random.default_rng(seed)
  prototypes = rng.normal(size=(4, 8, 8, 3))
  out = []
  for _ in range(n_steps):
    labels = rng.integers(0, 4, size=(NUM_DEVICES, per_device))
    images = prototypes[labels] + 0.5 * rng.normal(size=labels.shape + (8, 8, 3))
    out.append({"image": jnp.asarray(images, jnp.float32), "label": jnp.asarray(labels)})
  return out


def _imagenet_style_run(half, epsilon, n_steps, scale=None):
  """Trains on 4 devices; returns the replicated state, the losses and the scale after each step."""
  devices = jax.devices()[:NUM_DEVICES]
  model = SmallResNet(dtype=half)
  variables = jax.jit(model.init, static_argnames="train")(
      jax.random.key(0), jnp.ones((1, 8, 8, 3), half), train=False)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  if epsilon is not None:  # AMP: first in the chain, averaging over the pmap axis.
    tx = optax.chain(amp_optax.amp(epsilon, batch_axis_name="batch"), tx)
  dynamic_scale = None if scale is None else dynamic_scale_lib.DynamicScale(scale=scale)
  state = TrainState.create(apply_fn=functools.partial(model.apply, train=True),
                            params=variables["params"], tx=tx,
                            batch_stats=variables["batch_stats"], dynamic_scale=dynamic_scale)
  traces = []

  def train_step(state, batch):
    traces.append(1)
    return imagenet_style_train_step(state, batch, amp=epsilon is not None)

  p_train_step = jax.pmap(train_step, axis_name="batch", devices=devices)
  state = jax_utils.replicate(state, devices=devices)
  losses, scales = [], []
  for batch in _image_batches(n_steps):
    state, loss = p_train_step(state, batch)
    losses.append(float(loss[0]))
    scales.append(None if scale is None else float(state.dynamic_scale.scale[0]))
  # Twice with or without AMP: jax_utils.replicate's arrays and pmap's outputs have different
  # shardings (mesh axis names), so the second step retraces once.
  assert len(traces) <= 2, len(traces)
  return state, losses, scales


def _max_abs_diff(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  def diff(x, y):  # in float32, or float64 for float64 arrays
    dtype = jnp.promote_types(jnp.result_type(x), jnp.float32)
    return float(jnp.max(jnp.abs(jnp.asarray(x, dtype) - jnp.asarray(y, dtype))))

  return max(diff(x, y) for x, y in zip(la, lb))


def _assert_replicas_identical(state):
  for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
    for i in range(1, NUM_DEVICES):
      np.testing.assert_array_equal(np.asarray(leaf[i]), np.asarray(leaf[0]))


@pytest.mark.parametrize(("half", "scale"), [(jnp.float16, 2.0**20), (jnp.bfloat16, None)],
                         ids=["float16_dynamic_scale", "bfloat16"])
def test_imagenet_style_epsilon_zero_matches_erm_across_devices(half, scale):
  erm, erm_losses, erm_scales = _imagenet_style_run(half, None, 8, scale)
  amp, amp_losses, amp_scales = _imagenet_style_run(half, 0.0, 8, scale)
  _assert_replicas_identical(amp)
  for got, want in [(amp.params, erm.params), (amp.batch_stats, erm.batch_stats),
                    (amp.opt_state[1], erm.opt_state)]:
    assert _max_abs_diff(got, want) <= PMAP_TOLERANCE
  np.testing.assert_allclose(amp_losses, erm_losses, rtol=0, atol=PMAP_TOLERANCE)
  if scale is not None:
    # The same steps were skipped: 2**20 overflows float16 at first, then the scale fits.
    assert amp_scales == erm_scales and amp_scales[0] < scale and amp_scales[-1] == amp_scales[-2]
    assert _max_abs_diff(amp.dynamic_scale, erm.dynamic_scale) == 0.0


def test_imagenet_style_amp_learns_in_float16_with_dynamic_scale():
  amp, losses, scales = _imagenet_style_run(jnp.float16, 0.05, 12, scale=2.0**15)
  _assert_replicas_identical(amp)
  assert all(s == 2.0**15 for s in scales), scales  # no step was skipped at this scale.
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses


# miniGPT-style (NNX, explicit sharding) --------------------------------------------------------

VOCAB, LENGTH, WIDTH, HEADS = 16, 8, 16, 2
MODEL_SHARDED = {"kernel_metadata": {"out_sharding": P(None, "model")},
                 "bias_metadata": {"out_sharding": P("model")}}
NORM_SHARDED = {"scale_metadata": {"out_sharding": P("model")},
                "bias_metadata": {"out_sharding": P("model")}}
# epsilon=0 against ERM in float64 (see the module docstring): measured 2.1e-12.
FLOAT64_TOLERANCE = 1e-10


class DecoderBlock(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=WIDTH, decode=False,
                                            rngs=rngs, **MODEL_SHARDED)
    self.attention_dropout = nnx.Dropout(0.1, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(WIDTH, epsilon=1e-6, rngs=rngs, **NORM_SHARDED)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs, **MODEL_SHARDED)
    self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs, **MODEL_SHARDED)
    self.mlp_dropout = nnx.Dropout(0.1, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(WIDTH, epsilon=1e-6, rngs=rngs, **NORM_SHARDED)

  def __call__(self, x):
    x = self.attention_norm(x + self.attention_dropout(self.attention(x, is_causal=True)))
    return self.mlp_norm(x + self.mlp_dropout(self.down(nnx.relu(self.up(x)))))


class TinyGPT(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.token_embedding = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.position_embedding = nnx.Embed(LENGTH, WIDTH, rngs=rngs)
    self.block = DecoderBlock(rngs=rngs)
    self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs, **MODEL_SHARDED)

  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[1])[None]
    x = (self.token_embedding(tokens, out_sharding=jax.typeof(tokens).sharding)
         + self.position_embedding(positions))
    return reshard(self.head(self.block(x)), jax.typeof(tokens).sharding)


def gpt_loss_fn(model, batch):
  logits = model(batch[0])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
  return loss, logits


def _gpt_train_step(amp, traces):
  @nnx.jit(donate_argnums=(0, 1, 3))
  def train_step(model, optimizer, metrics, batch):
    traces.append(1)
    if amp:  # AMP: before the clean pass, and not named grad_fn (the next line uses that name).
      amp_grad_fn = flax_nnx.make_grad_fn(model, gpt_loss_fn, batch, has_aux=True)
    grad_fn = nnx.value_and_grad(gpt_loss_fn, has_aux=True)
    (loss, _), grads = grad_fn(model, batch)
    metrics.update(loss=loss)
    if amp:
      optimizer.update(model, grads, grad_fn=amp_grad_fn)  # AMP
    else:
      optimizer.update(model, grads)

  return train_step


def _token_batches(n_steps, size=8, seed=0):
  """Sequences counting up modulo VOCAB from a random start: the next token is learnable."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n_steps):
    tokens = (rng.integers(0, VOCAB, size=(size, 1)) + np.arange(LENGTH + 1)) % VOCAB
    out.append((jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])))
  return out


def _gpt_run(epsilon, n_steps, dtype=jnp.float32):
  model = TinyGPT(rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), params))
  tx = optax.adam(3e-3)
  if epsilon is not None:  # AMP: first in the chain.
    tx = optax.chain(amp_optax.amp(epsilon), tx)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(loss=nnx.metrics.Average("loss"))
  traces, losses = [], []
  train_step = _gpt_train_step(epsilon is not None, traces)
  for batch in _token_batches(n_steps):
    train_step(model, optimizer, metrics, jax.device_put(batch, P("batch", None)))
    losses.append(float(metrics.compute()["loss"]))
    metrics.reset()
  assert len(traces) == 1  # traced once, donation and sharding included.
  return model, losses


def _rng_data(x):
  return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x


@pytest.fixture
def batch_model_mesh():
  with jax.set_mesh(jax.make_mesh((2, 2), ("batch", "model"))):
    yield


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.usefixtures("batch_model_mesh")
def test_minigpt_style_amp_traces_once_learns_and_keeps_the_sharding():
  model, losses = _gpt_run(0.05, 30)
  assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
  kernel = model.block.up.kernel[...]
  assert jax.typeof(kernel).sharding.spec == P(None, "model")


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
# nnx.metrics.Average keeps float32 totals; a float64 loss is cast into them with a warning.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.usefixtures("batch_model_mesh")
def test_minigpt_style_epsilon_zero_is_erm_in_float64():
  with jax.enable_x64(True):  # also around the comparison: outside, float64 becomes float32.
    erm, erm_losses = _gpt_run(None, 30, jnp.float64)
    amp, amp_losses = _gpt_run(0.0, 30, jnp.float64)
    params = nnx.state(amp, nnx.Param)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    assert _max_abs_diff(params, nnx.state(erm, nnx.Param)) <= FLOAT64_TOLERANCE
  # Dropout drew the same keys, once per step: the perturbed passes reused the clean pass's.
  rng_amp, rng_erm = (jax.tree.map(_rng_data, nnx.as_pure(nnx.state(m, nnx.RngState)))
                      for m in (amp, erm))
  assert jax.tree.all(jax.tree.map(np.array_equal, rng_amp, rng_erm))
  np.testing.assert_allclose(amp_losses, erm_losses, rtol=1e-6)  # the metric's float32
  assert erm_losses[-1] < 0.8 * erm_losses[0]


def _measure():
  """Prints epsilon=0 against ERM for both patterns (the numbers in the module docstring)."""
  for half, scale in ((jnp.float16, 2.0**20), (jnp.bfloat16, None), (jnp.float32, None)):
    erm, _, _ = _imagenet_style_run(half, None, 8, scale)
    amp, _, _ = _imagenet_style_run(half, 0.0, 8, scale)
    print(f"ImageNet-style {half.__name__}, 4 devices, 8 steps: params "
          f"{_max_abs_diff(amp.params, erm.params):.2g}, batch_stats "
          f"{_max_abs_diff(amp.batch_stats, erm.batch_stats):.2g}, opt_state "
          f"{_max_abs_diff(amp.opt_state[1], erm.opt_state):.2g}")
  with jax.set_mesh(jax.make_mesh((2, 2), ("batch", "model"))):
    for dtype in (jnp.float32, jnp.float64):
      with jax.enable_x64(dtype == jnp.float64):
        erm, _ = _gpt_run(None, 30, dtype)
        amp, _ = _gpt_run(0.0, 30, dtype)
        flat = jax.tree_util.tree_flatten_with_path(nnx.state(erm, nnx.Param))[0]
        diffs = sorted(((_max_abs_diff(a, b), jax.tree_util.keystr(path)) for (path, a), b in
                        zip(flat, jax.tree.leaves(nnx.state(amp, nnx.Param)))), reverse=True)
      print(f"miniGPT-style {dtype.__name__}, 30 steps: {diffs[0][0]:.2g} at {diffs[0][1]}, "
            f"then {diffs[1][0]:.2g} at {diffs[1][1]}")


if __name__ == "__main__":
  _measure()
