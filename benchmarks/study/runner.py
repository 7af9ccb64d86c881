"""Training runs: the optimiser of a setting, the jitted train steps (one, or two alternated from
Python for the cheaper step), evaluation, sharpness at the final parameters, and step time.

A :class:`~benchmarks.study.presets.Setting` keeps the field names of the published JSON (0.1's
vocabulary); :func:`make_tx` maps them to the 0.2 API: ``radius="relative"`` is
``relative=True``, ``between="reuse"`` is ``amp(..., reuse_correction=True)``, ``ascent_every=k``
is ``tx.update(..., ascend=step % k == 0)`` decided in Python (:func:`make_python_dispatched`),
and ``num_groups=G > 1`` is :func:`amp_optax.grouped_amp`.
"""

import dataclasses
import time
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import amp_optax
from amp_optax import diagnostics
from amp_optax import flax_linen
from benchmarks.study.data import MEAN
from benchmarks.study.data import STD
from benchmarks.study.data import Data
from benchmarks.study.models import get_model
from benchmarks.study.presets import LATE_FRACTIONS
from benchmarks.study.presets import PLAIN_VARIANTS
from benchmarks.study.presets import SAM_INNER_LR
from benchmarks.study.presets import Config
from benchmarks.study.presets import Setting
from benchmarks.study.presets import calls_per_step
from examples.cifar import data as cifar_data


def _base(config: Config, total_steps: int) -> optax.GradientTransformation:
  lr = optax.cosine_decay_schedule(config.lr, total_steps)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(lr, momentum=0.9, nesterov=True))


def _relative(setting: Setting) -> bool:
  if setting.radius not in ("absolute", "relative"):
    raise ValueError(f"{setting.label}: radius must be 'absolute' or 'relative'")
  return setting.radius == "relative"


def _reuse(setting: Setting) -> bool:
  if setting.between not in ("clean", "reuse"):
    raise ValueError(f"{setting.label}: between must be 'clean' or 'reuse'")
  return setting.between == "reuse" and setting.ascent_every > 1


def _amp(setting: Setting) -> optax.GradientTransformation:
  """The setting's AMP (K = 1); with ``between="reuse"`` and ``ascent_every > 1`` it keeps the
  last ascent's correction for the steps called with ``ascend=False``."""
  return amp_optax.amp(setting.epsilon, inner_lr=setting.inner_lr, inner_steps=1,
                       norm=setting.norm, relative=_relative(setting),
                       reuse_correction=_reuse(setting))


class MomentumDirectionState(NamedTuple):
  """:func:`momentum_direction`'s state (the fields of ``DropInAmpState`` it needs)."""
  count: jax.Array
  theta: Any
  momentum: Any
  delta_norm: jax.Array
  inner_state: Any


def _sphere(tree, epsilon: float, norm: str, relative: bool, scale_of):
  """``tree`` scaled onto the sphere of radius epsilon (global, or per tensor), relative to
  ``scale_of``'s norms when ``relative``; a zero tree stays zero."""
  if norm == "global":
    radius = epsilon * (amp_optax.global_l2_norm(scale_of) if relative else 1.0)
    n = amp_optax.global_l2_norm(tree)
    f = jnp.where(n > 0, radius / jnp.where(n > 0, n, 1.0), 0.0)
    return jax.tree.map(lambda x: f * x, tree)

  def leaf(x, p):
    radius = epsilon * (jnp.linalg.norm(p.ravel()) if relative else 1.0)
    n = jnp.linalg.norm(x.ravel())
    return jnp.where(n > 0, radius / jnp.where(n > 0, n, 1.0), 0.0) * x

  return jax.tree.map(leaf, tree, scale_of)


def momentum_direction(base: optax.GradientTransformation, epsilon: float, sign: float,
                       norm: str = "global", relative: bool = False,
                       decay: float = 0.9) -> optax.GradientTransformation:
  """The momentum-direction ascent of ``drop_in_amp(ascent="momentum")`` on the sphere, with a
  sign: a drop-in transformation (the step holds ``theta + Delta``; one gradient per step).

  Each call: theta <- theta + base's update (the gradient was taken at theta + Delta), m <-
  decay m + (1 - decay) g, Delta <- sign * epsilon * m / |m| (global or per tensor, relative to
  theta's norms when ``relative``), and the parameters move to theta + Delta. ``sign = -1`` is
  the library's ``drop_in_amp(ascent="momentum", inner_lr=large)`` (theta - rho m/|m|,
  Momentum-SAM's: along the descent direction), ``+1`` the other sign (theta + rho m/|m|,
  along the averaged gradient: an ascent direction, AMP's and SAM's sign).
  """

  def init(params):
    return MomentumDirectionState(
        count=jnp.zeros((), jnp.int32), theta=jax.tree.map(jnp.array, params),
        momentum=jax.tree.map(jnp.zeros_like, params), delta_norm=jnp.zeros((), jnp.float32),
        inner_state=base.init(params))

  def update(grads, state, params=None):
    base_updates, inner = base.update(grads, state.inner_state, state.theta)
    theta = optax.apply_updates(state.theta, base_updates)
    m = jax.tree.map(lambda a, g: decay * a + (1.0 - decay) * g, state.momentum, grads)
    delta = jax.tree.map(lambda d: sign * d, _sphere(m, epsilon, norm, relative, theta))
    target = jax.tree.map(jnp.add, theta, delta)
    updates = jax.tree.map(jnp.subtract, target, params)
    applied = amp_optax.global_l2_norm(jax.tree.map(jnp.subtract, target, theta))
    return updates, MomentumDirectionState(optax.safe_increment(state.count), theta, m,
                                           applied.astype(jnp.float32), inner)

  return optax.GradientTransformation(init, update)


def random_drop_in(base: optax.GradientTransformation, epsilon: float, norm: str = "global",
                   relative: bool = False, seed: int = 0) -> optax.GradientTransformation:
  """:func:`random_direction`'s perturbation in one pass, as a drop-in transformation: the step
  holds theta + Delta and its gradient (the only one) is taken there; each call theta <- theta +
  base's update and a fresh Delta on the sphere (of theta's norm when ``relative``). ERM's cost
  (one forward/backward), not AMP's. The state is :class:`MomentumDirectionState` with the PRNG
  key in ``momentum``."""

  def init(params):
    return MomentumDirectionState(
        count=jnp.zeros((), jnp.int32), theta=jax.tree.map(jnp.array, params),
        momentum=jax.random.PRNGKey(seed), delta_norm=jnp.zeros((), jnp.float32),
        inner_state=base.init(params))

  def update(grads, state, params=None):
    base_updates, inner = base.update(grads, state.inner_state, state.theta)
    theta = optax.apply_updates(state.theta, base_updates)
    key, sub = jax.random.split(state.momentum)
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(sub, len(leaves))
    gauss = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, p.dtype)
                                         for k, p in zip(keys, leaves, strict=True)])
    target = jax.tree.map(jnp.add, theta, _sphere(gauss, epsilon, norm, relative, theta))
    applied = amp_optax.global_l2_norm(jax.tree.map(jnp.subtract, target, theta))
    return jax.tree.map(jnp.subtract, target, params), MomentumDirectionState(
        optax.safe_increment(state.count), theta, key, applied.astype(jnp.float32), inner)

  return optax.GradientTransformation(init, update)


class RandomDirectionState(NamedTuple):
  key: jax.Array
  delta_norm: jax.Array


def random_direction(epsilon: float, norm: str = "global", relative: bool = False,
                     seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """A control for AMP's ascent: the gradient at ``params + Delta``, Delta a random direction
  on the sphere of radius epsilon (drawn afresh each step; global, or one sphere per tensor;
  relative to the parameters' norms when ``relative``), in place of the clean gradient. Called
  like :func:`amp_optax.amp` (``grad_fn``): one extra forward/backward, as AMP's."""
  def init(params):
    del params
    return RandomDirectionState(jax.random.PRNGKey(seed), jnp.zeros((), jnp.float32))

  def update(updates, state, params=None, *, grad_fn=None, **extra):
    del updates, extra
    key, sub = jax.random.split(state.key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(sub, len(leaves))
    gauss = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, p.dtype)
                                         for k, p in zip(keys, leaves, strict=True)])
    u = _sphere(gauss, epsilon, norm, relative, params)  # isotropic: uniform on the sphere
    grads = grad_fn(optax.apply_updates(params, u), 0)
    return grads, RandomDirectionState(key, amp_optax.global_l2_norm(u).astype(jnp.float32))

  return optax.GradientTransformationExtraArgs(init, update)


def delta_norm_of(opt_state) -> jax.Array | None:
  """The applied perturbation's global norm from an optimiser state (AmpState, DropInAmpState
  or this module's states: the first ``delta_norm`` found); None without one."""
  for node in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "delta_norm")):
    if hasattr(node, "delta_norm"):
      return node.delta_norm
  return None


def make_tx(setting: Setting, config: Config, total_steps: int) -> optax.GradientTransformation:
  """SGD (Nesterov, decoupled weight decay, cosine decay), plain or under AMP or SAM."""
  base = _base(config, total_steps)
  if setting.method == "erm":
    return base  # with num_groups > 1 the step averages the groups' gradients itself.
  if setting.num_groups > 1 and (setting.ascent_every > 1 or setting.variant):
    raise ValueError(f"{setting.label}: grouping is studied with the full step only")
  if setting.num_groups > 1 and setting.method == "sam":
    return optax.chain(amp_optax.grouped_amp(setting.rho, num_groups=setting.num_groups,
                                             inner_lr=SAM_INNER_LR, norm="global"), base)
  if setting.num_groups > 1 and setting.method == "amp":
    return optax.chain(amp_optax.grouped_amp(
        setting.epsilon, num_groups=setting.num_groups, inner_lr=setting.inner_lr,
        inner_steps=1, norm=setting.norm, relative=_relative(setting)), base)
  if setting.method == "amp" and setting.variant == "momentum+":
    return momentum_direction(base, setting.epsilon, +1.0, norm=setting.norm,
                              relative=_relative(setting))
  if setting.method == "amp" and setting.variant == "random1":
    return random_drop_in(base, setting.epsilon, norm=setting.norm, relative=_relative(setting))
  if setting.method == "amp" and setting.variant == "random":
    return optax.chain(random_direction(setting.epsilon, norm=setting.norm,
                                        relative=_relative(setting)), base)
  if setting.method == "amp" and setting.variant in ("momentum", "drop-in"):
    # The base optimiser's schedule counts descent steps (total_steps of them).
    return amp_optax.drop_in_amp(
        base, setting.epsilon, inner_lr=setting.inner_lr, inner_steps=1, norm=setting.norm,
        relative=_relative(setting),
        ascent="momentum" if setting.variant == "momentum" else "gradient")
  if setting.method == "amp":
    # ascent_every > 1: the step is called with ascend= (make_python_dispatched).
    return optax.chain(_amp(setting), base)
  if setting.method == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(setting.rho))
    return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
  raise ValueError(f"unknown method {setting.method!r}")


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _inputs(images, key, augment: bool):
  """The network's input for a uint8 batch: augmented (crop and flip drawn from ``key``) or not,
  then normalised."""
  if augment:
    return cifar_data.augment(key, images, MEAN, STD)
  return cifar_data.normalize(images, MEAN, STD)


def _losses(model: nn.Module, augment: bool):
  """``(images, labels, key, batch_stats) -> loss_fn`` for one batch."""

  def batch_loss(images, labels, key, batch_stats):
    x = _inputs(images, key, augment)

    def loss_fn(p):
      logits, new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                     mutable=["batch_stats"])
      return jnp.mean(cross_entropy(logits, labels)), (logits, new_vars["batch_stats"])

    return loss_fn

  return batch_loss


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: bool,
                    plain: bool = False, ascend: bool | None = None):
  """A jitted ``(params, batch_stats, opt_state, images_u8, labels, key) -> (..., loss, acc)``.

  The perturbed gradients (AMP's ``grad_fn``, SAM's) use the batch's own statistics, like the
  clean one; only the clean pass updates the running BatchNorm statistics. ``plain``: the
  unchanged step of :func:`amp_optax.drop_in_amp` (no ``grad_fn``; every call's pass updates
  the statistics). ``ascend``: passed on to ``tx.update`` when not None.
  """
  batch_loss = _losses(model, augment)
  extra = {} if ascend is None else {"ascend": ascend}

  def step(params, batch_stats, opt_state, images, labels, key):
    loss_fn = batch_loss(images, labels, key, batch_stats)
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    def grad_fn(p, _inner_step):
      return jax.grad(lambda q: loss_fn(q)[0])(p)

    if plain:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, **extra)
    params = optax.apply_updates(params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return params, new_stats, opt_state, loss, acc

  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_grouped_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: bool,
                            num_groups: int, ascent: bool):
  """The grouped step (``num_groups`` G > 1), with :func:`make_train_step`'s signature.

  The batch (augmented as a whole, as in :func:`make_train_step`) is split into G groups of
  consecutive examples; :func:`amp_optax.flax_linen.grouped_value_and_grad` gives each group's
  clean pass (BatchNorm with the group's statistics: ghost batch norm) and the per-group
  ``grad_fn``; the new running statistics are the mean of the groups'. ``ascent=False`` (the
  ghost-BN ERM control): the mean of the groups' clean gradients goes to ``tx`` directly.
  """
  def loss_fn(params, batch_stats, batch, rng):
    del rng  # no dropout; augmentation is drawn for the whole batch before grouping.
    x, y = batch
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                   mutable=["batch_stats"])
    return jnp.mean(cross_entropy(logits, y)), (logits, new_vars)

  def step(params, batch_stats, opt_state, images, labels, key):
    x = _inputs(images, key, augment)
    grouped = amp_optax.group_batch((x, labels), num_groups)
    (losses, (logits, new_stats)), grads, grad_fn = flax_linen.grouped_value_and_grad(
        loss_fn, has_aux=True)(params, batch_stats, grouped)
    if ascent:
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    else:
      mean = jax.tree.map(lambda g: jnp.mean(g, axis=0), grads)
      updates, opt_state = tx.update(mean, opt_state, params)
    params = optax.apply_updates(params, updates)
    acc = jnp.mean(jnp.argmax(logits.reshape(labels.shape + logits.shape[-1:]), -1) == labels)
    return params, new_stats, opt_state, jnp.mean(losses), acc

  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_python_dispatched(model: nn.Module, setting: Setting, config: Config, total_steps: int):
  """AMP's cheaper step, the ascent steps decided in Python: ``(init, step)``.

  One optimiser, ``chain(amp(..., reuse_correction=between == "reuse"), base)``, and two jitted
  steps, ``ascend=True`` on steps 0, k, 2k, ... (``k = ascent_every``) and ``ascend=False`` in
  between (the clean gradient, plus with ``"reuse"`` the last ascent's adversarial-minus-clean
  gradient), called alternately from Python: no :func:`jax.lax.cond` holds the convolutions
  (XLA:CPU runs them slowly inside one, as inside loops). Every cheaper-step row of the study
  ran this arithmetic (0.1 wrote it out by hand around an always-ascending ``amp``;
  ``tests/test_study.py`` checks the two agree), and a setting with ``dispatch="cond"`` (0.1's
  ``amp(ascent_every=k)``, the same arithmetic under a ``lax.cond``) builds it too.
  """
  tx = make_tx(setting, config, total_steps)
  every = setting.ascent_every
  steps = {a: make_train_step(model, tx, config.augment, ascend=a) for a in (False, True)}
  calls = [0]

  def init(params):
    calls[0] = 0  # a new run starts with an ascent step.
    return tx.init(params)

  def step(*args):
    fn = steps[calls[0] % every == 0]
    calls[0] += 1
    return fn(*args)

  return init, step


def make_late(model: nn.Module, setting: Setting, config: Config, total_steps: int):
  """ERM, then full AMP on the last ``LATE_FRACTIONS[variant]`` of the steps: ``(init, step)``.

  One optimiser, ``chain(amp(...), base)``, whose steps are decided in Python with
  ``update(..., ascend=bool)`` (two jitted steps, no ``lax.cond``): the base optimiser's
  momentum and schedule run on unchanged when AMP switches on.
  """
  tx = optax.chain(_amp(setting), _base(config, total_steps))
  start = int(round((1.0 - LATE_FRACTIONS[setting.variant]) * total_steps))
  steps = {a: make_train_step(model, tx, config.augment, ascend=a) for a in (False, True)}
  calls = [0]

  def init(params):
    calls[0] = 0
    return tx.init(params)

  def step(*args):
    fn = steps[calls[0] >= start]
    calls[0] += 1
    return fn(*args)

  return init, step


def make_runner(model: nn.Module, setting: Setting, config: Config, total_steps: int):
  """``(init, step)`` of a setting: one jitted step, or two for the Python-dispatched one.

  ``total_steps`` counts descent steps; a drop-in gradient-ascent setting takes
  :func:`~benchmarks.study.presets.calls_per_step` calls of ``step`` for each. Every AMP setting
  with ``ascent_every > 1`` is Python-dispatched, whatever its ``dispatch`` says.
  """
  if setting.method == "amp" and setting.ascent_every > 1:
    return make_python_dispatched(model, setting, config, total_steps)
  if setting.method == "amp" and setting.variant in LATE_FRACTIONS:
    return make_late(model, setting, config, total_steps)
  tx = make_tx(setting, config, total_steps)
  if setting.num_groups > 1:
    return tx.init, make_grouped_train_step(model, tx, config.augment, setting.num_groups,
                                            ascent=setting.method != "erm")
  plain = setting.method == "amp" and setting.variant in PLAIN_VARIANTS
  return tx.init, make_train_step(model, tx, config.augment, plain=plain)


def eval_params(setting: Setting, params, opt_state):
  """The parameters to evaluate: theta, without a drop-in setting's perturbation."""
  if setting.method == "amp" and setting.variant in ("momentum+", "random1"):
    return opt_state.theta
  if setting.method == "amp" and setting.variant in ("momentum", "drop-in"):
    return amp_optax.unperturbed_params(params, opt_state)
  return params


def make_eval(model: nn.Module):
  @jax.jit
  def evaluate(params, batch_stats, images, labels):
    x = cifar_data.normalize(images, MEAN, STD)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return (jnp.sum(cross_entropy(logits, labels)),
            jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32)))
  return evaluate


def accuracy(evaluate, params, batch_stats, images, labels, chunk: int = 1000):
  loss = correct = 0.0
  for i in range(0, len(images), chunk):
    batch_loss, c = evaluate(params, batch_stats, images[i:i + chunk], labels[i:i + chunk])
    loss += float(batch_loss)
    correct += float(c)
  return correct / len(images), loss / len(images)


def make_sharpness(model: nn.Module, hessian_iters: int, perturb_samples: int):
  """Sharpness at given parameters, BatchNorm in inference mode, on one batch.

  The top Hessian eigenvalue by power iteration on
  :func:`amp_optax.diagnostics.hessian_vector_product`, and the mean loss increase along
  :func:`amp_optax.diagnostics.random_direction` s of global norm 5% of the parameters' norm
  (BatchNorm makes the conv layers scale-invariant, so an absolute radius would mean different
  things for runs whose weights shrank differently). The iterations are driven from Python
  around one jitted Hessian-vector product (and one jitted perturbed loss): unrolled inside
  one jit (``diagnostics.hessian_top_eigenvalue(..., unroll=True)``) they took minutes to
  compile on this CPU, and a rolled loop runs convolutions slowly on XLA:CPU.
  """

  def loss_fn(params, batch_stats, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return jnp.mean(cross_entropy(logits, y))

  @jax.jit
  def hvp(params, batch_stats, images, y, v):
    x = cifar_data.normalize(images, MEAN, STD)
    hv = diagnostics.hessian_vector_product(loss_fn, params, v, batch_stats, x, y)
    return hv, amp_optax.global_l2_norm(hv), optax.tree.vdot(v, hv)

  @jax.jit
  def perturbed(params, batch_stats, images, y, key):
    x = cifar_data.normalize(images, MEAN, STD)
    radius = 0.05 * amp_optax.global_l2_norm(params)
    u = diagnostics.random_direction(key, params, radius, norm="global")
    return (loss_fn(optax.apply_updates(params, u), batch_stats, x, y)
            - loss_fn(params, batch_stats, x, y))

  def measure(params, batch_stats, images, y):
    v = diagnostics.random_direction(jax.random.key(0), params, 1.0, norm="global")
    eig = jnp.zeros(())
    for _ in range(hessian_iters):
      hv, norm, eig = hvp(params, batch_stats, images, y, v)
      v = jax.tree.map(lambda h, norm=norm: h / norm, hv)
    keys = jax.random.split(jax.random.key(1), perturb_samples)
    incr = [float(perturbed(params, batch_stats, images, y, k)) for k in keys]
    return {"hessian_top_eigenvalue": float(eig), "perturb_increase": float(np.mean(incr))}

  return measure


class Trainer:
  """Caches jitted functions per (model, augment, setting) within one process."""

  def __init__(self, data: Data, hessian_iters: int, perturb_samples: int,
               sharpness_batch: int):
    self.data = data
    self.hessian_iters = hessian_iters
    self.perturb_samples = perturb_samples
    self.sharpness_batch = sharpness_batch
    self._eval: dict[str, Any] = {}
    self._sharp: dict[str, Any] = {}
    self._runners: dict[Any, Any] = {}  # one compile per (config, setting), not per seed.

  def init(self, model: nn.Module, seed: int):
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    variables = model.init(jax.random.key(seed), x, train=False)
    return variables["params"], variables["batch_stats"]

  def run(self, config: Config, setting: Setting, seed: int, log=None) -> dict[str, Any]:
    model = get_model(config.model)
    n = len(self.data.train_x)
    steps_per_epoch = n // config.batch_size
    total = steps_per_epoch * config.epochs  # descent steps
    if (config, setting) not in self._runners:
      self._runners[(config, setting)] = make_runner(model, setting, config, total)
    init, step = self._runners[(config, setting)]
    params, stats = self.init(model, seed)
    opt_state = init(params)
    aug_key = jax.random.key(10_000 + seed)
    t0 = time.perf_counter()
    losses = []
    # The drop-in gradient ascent takes calls_per_step calls per descent step, each on the next
    # batch: the same number of descent steps takes that many passes over the data.
    epochs = config.epochs * calls_per_step(setting)
    for epoch in range(epochs):
      # The data order and augmentation draws depend on the seed only: paired across methods.
      perm = np.random.default_rng([seed, epoch]).permutation(n)
      losses, accs, deltas = [], [], []
      for i in range(steps_per_epoch):
        idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
        params, stats, opt_state, loss, acc = step(
            params, stats, opt_state, self.data.train_x[idx], self.data.train_y[idx],
            jax.random.fold_in(aug_key, epoch * steps_per_epoch + i))
        losses.append(loss)
        accs.append(acc)
        if epoch == epochs - 1:
          dn = delta_norm_of(opt_state)  # copied: the next step donates the state
          deltas.append(None if dn is None else jnp.array(dn, copy=True))
      if log is not None and (epoch + 1) % max(1, epochs // 4) == 0:
        log(f"    epoch {epoch + 1}/{epochs} train loss "
            f"{float(np.mean(jax.device_get(losses))):.4f}")
    train_loss = float(np.mean(jax.device_get(losses)))
    train_acc = float(np.mean(jax.device_get(accs)))
    train_seconds = time.perf_counter() - t0
    # The applied perturbation over the last epoch: its mean over the steps that perturbed
    # (every-k: the ascent steps; drop-in: the calls that moved to theta + Delta), and the
    # share of the steps that did.
    applied = (np.asarray(jax.device_get(deltas), np.float64) if deltas and deltas[0] is not None
               else np.zeros(0))
    on = applied[applied > 0]
    params = eval_params(setting, params, opt_state)
    if config.model not in self._eval:
      self._eval[config.model] = make_eval(model)
      self._sharp[config.model] = make_sharpness(model, self.hessian_iters,
                                                 self.perturb_samples)
    evaluate = self._eval[config.model]
    test_acc, test_loss = accuracy(evaluate, params, stats, self.data.test_x, self.data.test_y)
    val_acc, _ = accuracy(evaluate, params, stats, self.data.val_x, self.data.val_y)
    k = self.sharpness_batch
    sharp = jax.device_get(self._sharp[config.model](
        params, stats, self.data.train_x[:k], self.data.train_y[:k]))
    return {"seed": seed, "test_acc": test_acc, "test_loss": test_loss, "val_acc": val_acc,
            "train_loss": train_loss, "train_acc": train_acc,
            "hessian_top_eigenvalue": float(sharp["hessian_top_eigenvalue"]),
            "perturb_increase": float(sharp["perturb_increase"]),
            "param_norm": float(amp_optax.global_l2_norm(params)),
            "delta_norm_last_epoch": float(on.mean()) if len(on) else (
                0.0 if len(applied) else None),
            "perturbed_share_last_epoch": float(len(on) / len(applied)) if len(applied) else None,
            "train_seconds": train_seconds}



def time_steps(model_name: str, settings: list[Setting], batch_size: int, rounds: int = 5,
               blocks: int = 6, block: int = 8) -> list[dict[str, Any]]:
  """Median seconds per (descent) step of each setting's train step, interleaved in ``rounds``.

  Each timed call is a block of ``block`` consecutive descent steps (for a setting with
  ``ascent_every = k > 1``, the smallest multiple of k that is at least ``block``; with the
  drop-in gradient ascent ``calls_per_step`` calls each) waited for at its end, so steps with
  and without an ascent are averaged as in training. A late-phase setting is not timed itself:
  its rows are derived from the ERM row and the full AMP row (same epsilon, norm, radius and
  inner_lr, else the table's full AMP row) of the same timing, ``(1 - f) * ERM + f * AMP`` for
  its fraction f (the two steps it alternates between; see :func:`make_late`), and say so
  (``"derived"``).
  """
  model = get_model(model_name)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (batch_size,)).astype(np.int32)
  config = Config(model_name, False, batch_size, 0, 1, batch_size)
  timed = [s for s in settings if s.variant not in LATE_FRACTIONS]
  runners = []
  sizes = []
  for s in timed:
    init, step = make_runner(model, s, config, 1000)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    state = [variables["params"], variables["batch_stats"], init(variables["params"])]
    key = jax.random.key(0)
    k = max(1, s.ascent_every)
    size = -(-block // k) * k
    n_calls = size * calls_per_step(s)

    def run_block(step=step, state=state, key=key, calls=n_calls):
      for _ in range(calls):
        state[0], state[1], state[2], loss, _ = step(state[0], state[1], state[2], images,
                                                     labels, key)
      jax.block_until_ready(loss)

    run_block()  # compile and warm up
    runners.append(run_block)
    sizes.append(size)
  times: list[list[float]] = [[] for _ in timed]
  for _ in range(rounds):
    for i, r in enumerate(runners):
      for _ in range(blocks):
        t0 = time.perf_counter()
        r()
        times[i].append((time.perf_counter() - t0) / sizes[i])
  erm = float(np.median(times[0]))
  by_setting = {}
  for s, t in zip(timed, times, strict=True):
    med = float(np.median(t))
    by_setting[s] = {"setting": s.as_dict(), "label": s.label, "ms_median": 1e3 * med,
                     "ms_p10": 1e3 * float(np.percentile(t, 10)),
                     "ms_p90": 1e3 * float(np.percentile(t, 90)), "ratio_vs_erm": med / erm}
  rows = []
  for s in settings:
    if s.variant not in LATE_FRACTIONS:
      rows.append(by_setting[s])
      continue
    full = dataclasses.replace(s, variant="")
    if full not in by_setting:  # e.g. a late row on the sphere: the step of full AMP's row
      full = next((x for x in timed if x.method == "amp" and x.ascent_every == 1
                   and not x.variant), full)
    if full not in by_setting or timed[0].method != "erm":
      continue
    f = LATE_FRACTIONS[s.variant]
    row = {"setting": s.as_dict(), "label": s.label, "derived": True}
    for k in ("ms_median", "ratio_vs_erm"):  # no percentiles: not timed itself
      row[k] = (1 - f) * by_setting[timed[0]][k] + f * by_setting[full][k]
    rows.append(row)
  return rows
