"""Flax NNX users' own training steps, as Flax's MNIST example and tutorial write them, with AMP.

The ERM step is Flax's: ``loss_fn(model, batch, rngs) -> (loss, logits)``, ``rngs`` passed in
(and/or stored in the model), BatchNorm + Dropout, ``nnx.MultiMetric`` updated in the step,
``nnx.Optimizer`` and ``nnx.jit``. The AMP step is the same with two changes. With ``epsilon=0``
it must equal ERM bit for bit (params, batch statistics, RNG keys and counts, optimiser state,
metrics), it must leave the live objects as the clean pass leaves them, and it must trace once.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from amp_optax import flax_nnx

pytestmark = pytest.mark.slow

LR = 0.05


class Net(nnx.Module):
  """Flax's MNIST-tutorial shape, small: Linear, BatchNorm, Dropout (rngs at call or stored)."""

  def __init__(self, rngs: nnx.Rngs, store_rngs: bool = False):
    self.fc1 = nnx.Linear(6, 16, rngs=rngs)
    self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
    self.dropout = nnx.Dropout(0.3)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)
    self.rngs = rngs if store_rngs else None  # the very object (Dropout(rngs=) would fork it).

  def __call__(self, x, rngs=None):
    rngs = self.rngs if rngs is None else rngs
    return self.fc2(self.dropout(nnx.relu(self.bn(self.fc1(x))), rngs=rngs))


def loss_fn(model, batch, rngs=None):
  logits = model(batch["image"], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


def shared_loss_fn(model, batch, rngs):
  """Two draws: one from the Rngs stored in the model, one from the same Rngs passed in."""
  hidden = model.dropout(nnx.relu(model.bn(model.fc1(batch["image"]))), rngs=model.rngs)
  logits = model.fc2(model.dropout(hidden, rngs=rngs))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


def _batches(n_steps=3, n=32, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(3, 6)) * 2.0
  out = []
  for _ in range(n_steps):
    labels = rng.integers(0, 3, size=n)
    x = centres[labels] + rng.normal(size=(n, 6))
    out.append({"image": jnp.asarray(x, jnp.float32), "label": jnp.asarray(labels)})
  return out


def _metrics():
  return nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))


def _tx(base, epsilon=None, inner_steps=1):
  if epsilon is None:
    return base
  return optax.chain(amp_optax.amp(epsilon, inner_steps=inner_steps), base)


def _setup(base, epsilon=None, inner_steps=1, store_rngs=False):
  rngs = nnx.Rngs(0, dropout=1)
  model = Net(rngs, store_rngs=store_rngs)
  optimizer = nnx.Optimizer(model, _tx(base, epsilon, inner_steps), wrt=nnx.Param)
  return model, optimizer, _metrics(), rngs


def _bits(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for u, v in zip(la, lb):
    np.testing.assert_array_equal(_bits(u), _bits(v))


def _base_opt_state(optimizer, amp):
  state = nnx.as_pure(optimizer.opt_state)
  return state[1] if amp else state


def _erm_step(counter, fn=loss_fn):
  @nnx.jit
  def train_step(model, optimizer, metrics, rngs, batch):
    counter.append(1)
    (loss, logits), grads = nnx.value_and_grad(fn, has_aux=True)(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads)

  return train_step


def _amp_step(counter, fn=loss_fn, rng_policy="same"):
  @nnx.jit
  def train_step(model, optimizer, metrics, rngs, batch):
    counter.append(1)
    amp_grad_fn = flax_nnx.make_grad_fn(model, fn, batch, rngs, has_aux=True,
                                        rng_policy=rng_policy)              # the AMP line
    (loss, logits), grads = nnx.value_and_grad(fn, has_aux=True)(model, batch, rngs)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])
    optimizer.update(model, grads, grad_fn=amp_grad_fn)                     # grad_fn=

  return train_step


def _amp_one_call(counter, fn=loss_fn):
  @nnx.jit
  def train_step(model, optimizer, metrics, rngs, batch):
    counter.append(1)
    loss, logits = flax_nnx.amp_step(model, optimizer, fn, batch, rngs, has_aux=True)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])

  return train_step


def _assert_same_run(erm, amp):
  (e_model, e_opt, e_metrics, e_rngs), (a_model, a_opt, a_metrics, a_rngs) = erm, amp
  _identical(nnx.state(a_model, nnx.Param), nnx.state(e_model, nnx.Param))
  _identical(nnx.state(a_model, nnx.BatchStat), nnx.state(e_model, nnx.BatchStat))
  _identical(nnx.state(a_model, nnx.RngState), nnx.state(e_model, nnx.RngState))
  _identical(nnx.state(a_rngs), nnx.state(e_rngs))
  _identical(_base_opt_state(a_opt, True), _base_opt_state(e_opt, False))
  _identical(a_metrics.compute(), e_metrics.compute())


BASES = {"sgd_momentum": lambda: optax.sgd(LR, momentum=0.9),
         "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-3)}


@pytest.mark.parametrize(("base", "inner_steps"),
                         [("sgd_momentum", 1), ("sgd_momentum", 2), ("adamw", 2)])
def test_rngs_argument_epsilon_zero_is_erm_bit_for_bit_and_traces_once(base, inner_steps):
  batches = _batches()
  erm, amp = _setup(BASES[base]()), _setup(BASES[base](), 0.0, inner_steps)
  erm_traces, amp_traces = [], []
  erm_step, amp_step = _erm_step(erm_traces), _amp_step(amp_traces)
  for batch in batches:
    erm_step(*erm, batch)
    amp_step(*amp, batch)
  _assert_same_run(erm, amp)
  assert int(erm[3].dropout.count[...]) == 3  # the clean pass drew once per step.
  assert len(erm_traces) == 1 and len(amp_traces) == 1


def test_rngs_stored_in_the_model_and_passed_in_stay_shared():
  # Flax 0.12.8's nnx.grad rejects one Rngs reached through two arguments ("Inconsistent aliasing
  # detected"), so the clean pass reaches it through the model; make_grad_fn gets both ways in.
  batch = _batches(1)[0]
  model, optimizer, _, rngs = _setup(optax.sgd(LR), 0.0, store_rngs=True)
  assert model.rngs is rngs  # one Rngs, two ways in.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  amp_grad_fn = flax_nnx.make_grad_fn(model, shared_loss_fn, batch, rngs, has_aux=True)
  start = nnx.clone((model, rngs))

  # The clean pass, reaching the one Rngs through the model only.
  clean = nnx.grad(lambda m, b: shared_loss_fn(m, b, m.rngs), has_aux=True)(model, batch)[0]
  assert int(rngs.dropout.count[...]) == 2  # the clean pass drew twice from the one stream.
  after_clean = nnx.clone((model, rngs))
  perturbed = jax.jit(amp_grad_fn)(params, 0)
  # Copies with two streams would draw the same mask twice: another gradient.
  for u, v in zip(jax.tree.leaves(perturbed), jax.tree.leaves(nnx.as_pure(clean)), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)  # eager vs jit rounding only.
  # Two streams (a clone passed in) would draw the same masks twice: another gradient.
  other_model, _ = start
  unshared = flax_nnx.make_grad_fn(other_model, shared_loss_fn, batch, nnx.clone(start[1]),
                                   has_aux=True)
  nnx.grad(lambda m, b: shared_loss_fn(m, b, m.rngs), has_aux=True)(other_model, batch)
  assert max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(
      jax.tree.leaves(unshared(params, 0)), jax.tree.leaves(perturbed))) > 1e-3
  _identical(nnx.state((model, rngs)), nnx.state(after_clean))


def fork_loss_fn(model, batch, rngs):
  return loss_fn(model, batch, rngs.fork())  # fork() advances the Rngs passed in.


@pytest.mark.parametrize("fn", [loss_fn, fork_loss_fn], ids=["rngs", "rngs_fork"])
def test_amp_step_with_rngs_argument_is_erm_at_epsilon_zero(fn):
  batches = _batches()
  erm, amp = _setup(optax.sgd(LR, momentum=0.9)), _setup(optax.sgd(LR, momentum=0.9), 0.0, 2)
  traces = []
  erm_step, amp_step = _erm_step([], fn), _amp_one_call(traces, fn)
  for batch in batches:
    erm_step(*erm, batch)
    amp_step(*amp, batch)
  _assert_same_run(erm, amp)
  assert len(traces) == 1


@pytest.mark.parametrize("how", ["make_grad_fn", "amp_step"])
def test_epsilon_positive_leaves_live_objects_as_the_clean_pass(how):
  batch = _batches(1)[0]
  erm = _setup(optax.sgd(LR))
  amp = _setup(optax.sgd(LR), 0.5, inner_steps=2)
  _erm_step([])(*erm, batch)
  (_amp_step([]) if how == "make_grad_fn" else _amp_one_call([]))(*amp, batch)
  # Same start, same clean pass: statistics, RNG state and metrics as ERM's; params moved.
  _identical(nnx.state(amp[0], nnx.BatchStat), nnx.state(erm[0], nnx.BatchStat))
  _identical(nnx.state(amp[3]), nnx.state(erm[3]))
  _identical(amp[2].compute(), erm[2].compute())
  diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), nnx.state(amp[0], nnx.Param),
                      nnx.state(erm[0], nnx.Param))
  assert max(float(d) for d in jax.tree.leaves(diff)) > 1e-4


def test_model_train_eval_and_view():
  """model.train()/model.eval() and nnx.view, as Flax's tutorial switches modes."""
  batches = _batches(4)

  @nnx.jit
  def eval_step(model, metrics, batch):
    loss, logits = loss_fn(model, batch)
    metrics.update(loss=loss, logits=logits, labels=batch["label"])

  results = []
  for run, step in ((_setup(optax.sgd(LR, momentum=0.9)), _erm_step([])),
                    (_setup(optax.sgd(LR, momentum=0.9), 0.0), _amp_step([]))):
    model = run[0]
    model.train()
    step(*run, batches[0])
    model.eval()
    eval_metrics = _metrics()
    eval_step(model, eval_metrics, batches[3])
    model.train()
    # nnx.view shares the variables: training through a view trains the model.
    step(nnx.view(model, deterministic=False, use_running_average=False), *run[1:], batches[1])
    results.append((run, eval_metrics.compute()))
  (erm, erm_eval), (amp, amp_eval) = results
  _assert_same_run(erm, amp)
  _identical(amp_eval, erm_eval)
  assert int(amp[1].step[...]) == 2 and int(amp[3].dropout.count[...]) == 2


def test_fold_in_applies_to_rngs_passed_in():
  batch = _batches(1)[0]
  model, _, _, rngs = _setup(optax.sgd(LR))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  start = nnx.clone((model, rngs))
  folded = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True, rng_policy="fold_in")
  same = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True)
  nnx.grad(loss_fn, has_aux=True)(model, batch, rngs)  # the clean pass.
  got = folded(params, jnp.int32(1))

  # Reference: a copy whose dropout stream starts from fold_in(key, 1), count as at the start.
  ref_model, ref_rngs = start
  key = ref_rngs.dropout.key[...]
  ref_rngs.dropout.key[...] = jax.random.fold_in(key, 1)
  ref_rngs.default.key[...] = jax.random.fold_in(ref_rngs.default.key[...], 1)
  want = nnx.grad(loss_fn, has_aux=True)(ref_model, batch, ref_rngs)
  for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(nnx.as_pure(want))):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(same(params, 1))[0])


class Teacher(nnx.Module):

  def __init__(self, rngs):
    self.fc = nnx.Linear(6, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(3, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.fc(x))


def distill_loss(model, batch, extras):
  logits = model(batch["image"], extras["rngs"])
  teacher_logits = extras["teacher"](batch["image"])  # train-mode BatchNorm: stats advance.
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  loss = loss + 0.1 * jnp.mean((logits - teacher_logits) ** 2)
  extras["calls"][...] += 1
  return loss, logits


def test_other_modules_nested_in_args_are_copied_not_perturbed():
  batch = _batches(1)[0]
  results = {}
  for eps in (None, 0.0, 0.5):
    model, optimizer, _, rngs = _setup(optax.sgd(LR), eps, inner_steps=2)
    extras = {"rngs": rngs, "teacher": Teacher(nnx.Rngs(5)), "calls": nnx.Variable(jnp.int32(0))}
    teacher_kernel = np.asarray(extras["teacher"].fc.kernel[...])

    @nnx.jit
    def step(model, optimizer, batch, extras, amp=eps is not None):
      if amp:
        amp_grad_fn = flax_nnx.make_grad_fn(model, distill_loss, batch, extras, has_aux=True)
        grads = nnx.grad(distill_loss, has_aux=True)(model, batch, extras)[0]
        optimizer.update(model, grads, grad_fn=amp_grad_fn)
      else:
        grads = nnx.grad(distill_loss, has_aux=True)(model, batch, extras)[0]
        optimizer.update(model, grads)

    step(model, optimizer, batch, extras)
    # The teacher is not trained, its kernel not perturbed; it ran once (the clean pass).
    np.testing.assert_array_equal(extras["teacher"].fc.kernel[...], teacher_kernel)
    assert int(extras["calls"][...]) == 1
    results[eps] = (model, extras)
  erm, zero, amp = results[None], results[0.0], results[0.5]
  _identical(nnx.state(zero[0]), nnx.state(erm[0]))
  _identical(nnx.state(zero[1]["teacher"]), nnx.state(erm[1]["teacher"]))
  _identical(nnx.state(amp[1]["teacher"]), nnx.state(erm[1]["teacher"]))
  _identical(nnx.state(amp[1]["rngs"]), nnx.state(erm[1]["rngs"]))


@pytest.mark.parametrize("inner_steps", [1, 2])
@pytest.mark.parametrize("jit", [True, False])
def test_make_grad_fn_after_the_clean_pass_fails_loudly(jit, inner_steps):
  batch = _batches(1)[0]

  def wrong_order(model, optimizer, rngs, batch):
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
    amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True)  # too late
    optimizer.update(model, grads, grad_fn=amp_grad_fn)

  def right_order(model, optimizer, rngs, batch):
    amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True)
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
    optimizer.update(model, grads, grad_fn=amp_grad_fn)

  wrap = nnx.jit if jit else (lambda f: f)
  model, optimizer, _, rngs = _setup(optax.sgd(LR), 0.1, inner_steps)
  with pytest.raises(RuntimeError, match="before nnx.value_and_grad"):
    wrap(wrong_order)(model, optimizer, rngs, batch)
  model, optimizer, _, rngs = _setup(optax.sgd(LR), 0.1, inner_steps)
  for _ in range(2):
    wrap(right_order)(model, optimizer, rngs, batch)  # no false alarm, eager or jitted.
  assert int(optimizer.step[...]) == 2


def test_missing_has_aux_says_pass_has_aux():
  batch = _batches(1)[0]
  model, optimizer, _, rngs = _setup(optax.sgd(LR), 0.1)
  with pytest.raises(TypeError, match="pass has_aux=True"):
    flax_nnx.amp_step(model, optimizer, loss_fn, batch, rngs)
  model, optimizer, _, rngs = _setup(optax.sgd(LR), 0.1)
  amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs)
  grads = nnx.grad(loss_fn, has_aux=True)(model, batch, rngs)[0]
  with pytest.raises(TypeError, match="pass has_aux=True"):
    optimizer.update(model, grads, grad_fn=amp_grad_fn)


def test_authors_policy_with_rngs_passed_in_equals_rngs_in_the_model():
  # The stored-Rngs form is checked against a hand-written reference in test_flax_nnx.py.
  batches = _batches(2)
  runs = []
  for store in (False, True):
    model, optimizer, _, rngs = _setup(optax.sgd(LR), 0.3, inner_steps=2, store_rngs=store)

    @nnx.jit
    def step(model, optimizer, rngs, batch, store=store):
      args = (batch,) if store else (batch, rngs)
      return flax_nnx.amp_step(model, optimizer, loss_fn, *args, has_aux=True,
                               stats_policy="authors")

    for batch in batches:
      step(model, optimizer, rngs, batch)
    runs.append((model, rngs))
  (passed_in, rngs_a), (stored, rngs_b) = runs
  _identical(nnx.state(passed_in, nnx.Param), nnx.state(stored, nnx.Param))
  _identical(nnx.state(passed_in, nnx.BatchStat), nnx.state(stored, nnx.BatchStat))
  _identical(nnx.state(rngs_a), nnx.state(rngs_b))
  assert int(rngs_a.dropout.count[...]) == 2  # the clean passes only.
