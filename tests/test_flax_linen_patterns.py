"""Flax Linen users' own training steps (Flax's MNIST example, with BatchNorm and Dropout) with AMP.

The ERM step is Flax's: a ``TrainState`` with ``batch_stats``, ``loss_fn`` returning
``(loss, (logits, updates))``, in one jit or split in two (``apply_model`` computes the
gradients, ``update_model`` applies them). The AMP step changes the optimiser and the line that
applies the gradients. With ``epsilon=0`` it must equal ERM bit for bit, and trace once.
"""

import subprocess
import sys
import textwrap
from typing import Any

import flax.linen as nn
from flax.training import dynamic_scale as dynamic_scale_lib
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import flax_linen

pytestmark = pytest.mark.slow

LR = 0.05


class CNN(nn.Module):
  """Flax's MNIST model, small, with BatchNorm and Dropout added as users do."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(16)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


MODEL = CNN()


class FlaxTrainState(train_state.TrainState):
  """What a Flax user writes for BatchNorm."""
  batch_stats: Any


def loss_fn(params, batch_stats, batch, rng):
  logits, updates = MODEL.apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
      mutable=["batch_stats"], rngs={"dropout": rng})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, (logits, updates)


def _batches(n_steps=3, n=32, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 6)) * 2.0
  out = []
  for _ in range(n_steps):
    labels = rng.integers(0, 3, size=n)
    x = centres[labels] + rng.normal(size=(n, 6))
    out.append({"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels)})
  return out


def _state(epsilon=None, inner_steps=1, cls=flax_linen.TrainState):
  variables = MODEL.init(jax.random.key(0), jnp.ones((1, 6)), train=False)
  tx = optax.sgd(LR, momentum=0.9)
  if epsilon is not None:
    tx = optax.chain(amp_optax.amp(epsilon, inner_steps=inner_steps), tx)
  return cls.create(apply_fn=MODEL.apply, params=variables["params"],
                    batch_stats=variables["batch_stats"], tx=tx)


def _identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _assert_same(erm, amp):
  _identical(amp.params, erm.params)
  _identical(amp.batch_stats, erm.batch_stats)
  _identical(amp.opt_state[1], erm.opt_state)
  assert int(amp.step) == int(erm.step)


def _run(step, state, batches):
  for i, batch in enumerate(batches):
    state = step(state, batch, jax.random.fold_in(jax.random.key(1), i))
  return state


def _one_jit(amp, traces):
  @jax.jit
  def train_step(state, batch, rng):
    traces.append(1)
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    if amp:
      amp_grad_fn = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng,
                                            has_aux=True)
      return state.apply_gradients(grads=grads, grad_fn=amp_grad_fn,
                                   batch_stats=updates["batch_stats"])
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])

  return train_step


def _split(amp, traces):
  @jax.jit
  def apply_model(state, batch, rng):
    traces.append("apply")
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, rng)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return grads, updates, loss, accuracy

  @jax.jit
  def erm_update(state, grads, updates):
    traces.append("update")
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])

  @jax.jit
  def amp_update(state, grads, updates, batch, rng):
    traces.append("update")
    return flax_linen.apply_amp_gradients(state, grads=grads, loss_fn=loss_fn, batch=batch,
                                          rng=rng, has_aux=True,
                                          batch_stats=updates["batch_stats"])

  def train_step(state, batch, rng):
    grads, updates, _, _ = apply_model(state, batch, rng)
    if amp:
      return amp_update(state, grads, updates, batch, rng)
    return erm_update(state, grads, updates)

  return train_step


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("form", ["one_jit", "split_jits"])
def test_epsilon_zero_is_erm_bit_for_bit_and_traces_once(form, inner_steps):
  make = _one_jit if form == "one_jit" else _split
  batches = _batches()
  erm_traces, amp_traces = [], []
  erm = _run(make(False, erm_traces), _state(cls=FlaxTrainState), batches)
  amp = _run(make(True, amp_traces), _state(0.0, inner_steps), batches)
  _assert_same(erm, amp)
  assert sorted(erm_traces) == sorted(amp_traces) == sorted(set(amp_traces))  # once each.


@pytest.mark.parametrize("form", ["one_jit", "split_jits"])
def test_epsilon_positive_keeps_the_clean_pass_statistics(form):
  make = _one_jit if form == "one_jit" else _split
  batches = _batches(1)
  erm = _run(make(False, []), _state(cls=FlaxTrainState), batches)
  amp = _run(make(True, []), _state(0.5, 2), batches)
  _identical(amp.batch_stats, erm.batch_stats)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(amp.params), jax.tree.leaves(erm.params))) > 1e-4


def test_grad_fn_cannot_cross_a_jit_boundary_but_the_data_can():
  state, batch, rng = _state(0.1), _batches(1)[0], jax.random.key(1)

  @jax.jit
  def returns_grad_fn(state, batch, rng):
    return flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=True)

  with pytest.raises(TypeError, match="function"):
    returns_grad_fn(state, batch, rng)
  new = _split(True, [])(state, batch, rng)
  assert int(new.step) == 1


@pytest.mark.parametrize("order", ["flax", "flax_stats_only", "ours", "ours_updates"])
def test_aux_in_either_order(order):
  state, batch, rng = _state(0.1), _batches(1)[0], jax.random.key(1)

  def reordered(params, batch_stats, batch, rng):
    loss, (logits, updates) = loss_fn(params, batch_stats, batch, rng)
    return loss, {"flax": (logits, updates),
                  "flax_stats_only": (logits, updates["batch_stats"]),
                  "ours": (updates["batch_stats"], logits),
                  "ours_updates": (updates, logits)}[order]

  want = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=True)
  got = flax_linen.make_grad_fn(reordered, state.batch_stats, batch, rng, has_aux=True)
  _identical(got(state.params, 0), want(state.params, 0))
  new_state, (loss, logits) = flax_linen.amp_step(state, reordered, batch, rng, has_aux=True)
  ref_state, (ref_loss, ref_logits) = flax_linen.amp_step(state, loss_fn, batch, rng,
                                                          has_aux=True)
  _identical((new_state.params, new_state.batch_stats, loss, logits),
             (ref_state.params, ref_state.batch_stats, ref_loss, ref_logits))
  # The clean pass's statistics, not the logits, became the new batch_stats.
  clean_updates = loss_fn(state.params, state.batch_stats, batch, rng)[1][1]
  _identical(new_state.batch_stats, clean_updates["batch_stats"])


def test_wrong_aux_says_what_is_expected():
  state, batch, rng = _state(0.1), _batches(1)[0], jax.random.key(1)

  def no_stats(params, batch_stats, batch, rng):
    loss, (logits, _) = loss_fn(params, batch_stats, batch, rng)
    return loss, (logits, logits)

  with pytest.raises(ValueError, match=r"(?s)\(loss, \(aux, new_batch_stats\)\).*"
                                       r"\(loss, \(new_batch_stats, aux\)\)"):
    flax_linen.amp_step(state, no_stats, batch, rng, has_aux=True)
  # Flax's (loss, (logits, updates)) without has_aux: JAX alone would say "Gradient only
  # defined for scalar-output functions".
  with pytest.raises(TypeError, match="pass has_aux=True"):
    flax_linen.amp_step(state, loss_fn, batch, rng)
  with pytest.raises(TypeError, match="pass has_aux=True"):
    flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng)(state.params, 0)


def test_flax_train_state_drops_grad_fn_and_the_error_names_ours():
  state, batch, rng = _state(0.1, cls=FlaxTrainState), _batches(1)[0], jax.random.key(1)
  (_, (_, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, batch, rng)
  amp_grad_fn = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=True)
  with pytest.raises(ValueError, match=r"amp_optax\.flax_linen\.TrainState"):
    state.apply_gradients(grads=grads, grad_fn=amp_grad_fn, batch_stats=updates["batch_stats"])


def test_train_state_is_a_drop_in_for_flax():
  variables = MODEL.init(jax.random.key(0), jnp.ones((1, 6)), train=False)
  tx = optax.adam(1e-2)
  batch, rng = _batches(1)[0], jax.random.key(1)
  grads = jax.grad(loss_fn, has_aux=True)(variables["params"], variables["batch_stats"], batch,
                                          rng)[0]
  # Without batch_stats, as Flax's MNIST example creates it.
  ours = flax_linen.TrainState.create(apply_fn=MODEL.apply, params=variables["params"], tx=tx)
  theirs = train_state.TrainState.create(apply_fn=MODEL.apply, params=variables["params"], tx=tx)
  assert ours.batch_stats is None and isinstance(ours, train_state.TrainState)
  ours, theirs = ours.apply_gradients(grads=grads), theirs.apply_gradients(grads=grads)
  _identical((ours.params, ours.opt_state, ours.step), (theirs.params, theirs.opt_state,
                                                        theirs.step))
  # With batch_stats, as users subclass Flax's.
  ours = _state(cls=flax_linen.TrainState).replace(tx=tx, opt_state=tx.init(variables["params"]))
  theirs = _state(cls=FlaxTrainState).replace(tx=tx, opt_state=tx.init(variables["params"]))
  stats = jax.tree.map(lambda s: s + 1, variables["batch_stats"])
  ours, theirs = (s.apply_gradients(grads=grads, batch_stats=stats) for s in (ours, theirs))
  _identical((ours.params, ours.batch_stats, ours.opt_state),
             (theirs.params, theirs.batch_stats, theirs.opt_state))


def test_train_state_subclasses_as_flax_s_imagenet_example():
  class ImageNetTrainState(flax_linen.TrainState):  # Flax's ImageNet example, on ours
    batch_stats: Any
    dynamic_scale: dynamic_scale_lib.DynamicScale

  class ScaledTrainState(flax_linen.TrainState):  # batch_stats inherited, still optional
    dynamic_scale: dynamic_scale_lib.DynamicScale

  variables = MODEL.init(jax.random.key(0), jnp.ones((1, 6)), train=False)
  common = {"apply_fn": MODEL.apply, "params": variables["params"], "tx": optax.sgd(LR)}
  state = ImageNetTrainState.create(**common, batch_stats=variables["batch_stats"],
                                    dynamic_scale=None)
  _identical(state.batch_stats, variables["batch_stats"])
  with pytest.raises(TypeError, match="batch_stats"):  # required, as in Flax's own subclass
    ImageNetTrainState.create(**common, dynamic_scale=None)
  scaled = ScaledTrainState.create(**common, dynamic_scale=dynamic_scale_lib.DynamicScale())
  assert scaled.batch_stats is None and float(scaled.dynamic_scale.scale) == 2.0**16


def _closure_step(amp, traces):
  """Flax's ImageNet step shape: loss_fn(params) closes over the state, batch and key."""

  @jax.jit
  def train_step(state, batch, rng):
    traces.append(1)

    def loss_fn(params):
      logits, new_model_state = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
          mutable=["batch_stats"], rngs={"dropout": rng})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (new_model_state, logits)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (new_model_state, _)), grads = grad_fn(state.params)
    extra = {"grad_fn": flax_linen.make_grad_fn(loss_fn, has_aux=True)} if amp else {}
    return state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"],
                                 **extra)

  return train_step


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_closure_loss_fn_epsilon_zero_is_erm_bit_for_bit_and_traces_once(inner_steps):
  batches = _batches()
  erm_traces, amp_traces = [], []
  erm = _run(_closure_step(False, erm_traces), _state(cls=FlaxTrainState), batches)
  amp = _run(_closure_step(True, amp_traces), _state(0.0, inner_steps), batches)
  _assert_same(erm, amp)
  assert len(erm_traces) == len(amp_traces) == 1


def test_closure_loss_fn_gives_the_explicit_form_s_gradient():
  state, batch, rng = _state(0.5), _batches(1)[0], jax.random.key(1)
  perturbed = jax.tree.map(lambda p: p + 0.1, state.params)

  def closure(params):
    return loss_fn(params, state.batch_stats, batch, rng)[0]

  explicit = flax_linen.make_grad_fn(loss_fn, state.batch_stats, batch, rng, has_aux=True)
  _identical(flax_linen.make_grad_fn(closure)(perturbed, 0), explicit(perturbed, 0))
  # One step of each form, one jit or none: the same state.
  closure_state = _run(_closure_step(True, []), state, [batch])
  explicit_state = _run(_one_jit(True, []), state, [batch])
  _identical(closure_state.params, explicit_state.params)


def test_make_grad_fn_says_which_form_to_write():
  state, batch, rng = _state(0.1), _batches(1)[0], jax.random.key(1)

  def closure(params):
    return loss_fn(params, state.batch_stats, batch, rng)

  with pytest.raises(TypeError, match=r"takes params only.*make_grad_fn\(loss_fn, has_aux"):
    flax_linen.make_grad_fn(closure, state.batch_stats, batch, rng, has_aux=True)
  with pytest.raises(TypeError, match=r"make_grad_fn\(loss_fn, state\.batch_stats, batch, rng"):
    flax_linen.make_grad_fn(loss_fn, has_aux=True)
  with pytest.raises(TypeError, match="both `batch_stats` and `batch`"):
    flax_linen.make_grad_fn(loss_fn, state.batch_stats)
  with pytest.raises(TypeError, match="reads its key itself"):
    flax_linen.make_grad_fn(closure, rng=rng, has_aux=True)
  with pytest.raises(ValueError, match="rng_policy='fold_in' needs the key"):
    flax_linen.make_grad_fn(closure, has_aux=True, rng_policy="fold_in")
  # Flax's (loss, (new_model_state, logits)) without has_aux.
  with pytest.raises(TypeError, match="pass has_aux=True"):
    flax_linen.make_grad_fn(closure)(state.params, 0)


@pytest.mark.parametrize("module", ["amp_optax.flax_nnx", "amp_optax.flax_linen"])
def test_import_without_flax_names_the_extra(module):
  code = textwrap.dedent(f"""
      import sys
      sys.modules["flax"] = None  # as if Flax were not installed.
      try:
        import {module}
      except ModuleNotFoundError as e:
        assert e.name == "flax", e.name
        print(e)
      else:
        raise SystemExit("imported without flax")
      import amp_optax  # the core needs no Flax.
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert 'pip install -e ".[flax]"' in out.stdout and module in out.stdout
