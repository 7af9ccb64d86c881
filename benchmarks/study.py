"""Where does AMP help? ERM vs AMP vs SAM where a regulariser matters, on CPU.

A small CIFAR-10 training set (1,000 images of the JPEG copy, 500 more held out for choosing
epsilon and rho, 2,000 test images), schedules long enough that plain training (ERM) drives the
training loss near zero and overfits, two model sizes (:class:`MidCNN` below, three
conv-BatchNorm stages and a BatchNorm hidden layer, at two widths: ``small``, 40k parameters,
and ``mid``, 156k), with and without augmentation.

Tables (each one command, resumable: finished ``(setting, seed)`` runs are kept in the JSON and
not redone; partial results are written after every run)::

    python -m benchmarks.study --preset study-sweep   # epsilon sweeps (both norms, both radii)
                                                       #   and SAM's rho sweep, 2 seeds, no aug
    python -m benchmarks.study --preset study-final   # ERM vs AMP vs SAM vs the cheaper step,
                                                       #   5 paired seeds, with/without aug,
                                                       #   plus the interleaved step-time ratios
    python -m benchmarks.study --preset study-smoke   # CI: synthetic data, a tiny model

Several processes may fill one table at once (``--models``, ``--blocks``, ``--methods`` split
the work; the JSON is locked, merged and rewritten after every run).

(``python -m benchmarks.reproduce --preset study-sweep`` etc. dispatch here.) The final table's
AMP epsilon and SAM rho are chosen per model by *validation* accuracy (a held-out part of the
training pool, never the test set) from the sweep's JSON when the final table is first run, and
kept in its JSON from then on; without a sweep, the fallbacks in :data:`FALLBACK_CHOICE` are
used and the table says so.

The cheaper step (``ascent_every`` > 1) is trained Python-dispatched (two jitted steps, see
:func:`make_python_dispatched`): the library's ``lax.cond`` form does the same arithmetic, but
XLA:CPU runs convolutions inside a conditional's branches slowly; the step-time table times both.

Every run: SGD with Nesterov momentum 0.9, weight decay 5e-4 (decoupled from the ascent, as in
the authors' code), cosine learning-rate decay; one jitted train step called from Python per
batch (XLA:CPU runs convolutions inside ``lax.scan``/loops far slower). Runs with the same seed
share the initialisation, the data order and the augmentation draws (paired by seed). Reported
per run: final-epoch test and validation accuracy, mean training loss over the last epoch,
and sharpness at the final parameters on a fixed batch of unaugmented training images with
BatchNorm in inference mode (:mod:`amp_optax.diagnostics`: the top Hessian eigenvalue, and the
mean loss increase under random global-norm perturbations of 5% of the parameter norm).
Per setting: mean +- std over seeds, and the mean paired difference to ERM with a 95%
t-interval.

Without ``../shared/data`` (and no ``--data-dir``) the real presets stop with a message saying
so; ``study-smoke`` needs nothing.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import amp_optax
from amp_optax import diagnostics
from examples.cifar import data as cifar_data
from examples.cifar import models as cifar_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _conv_bn_relu_pool(x: jnp.ndarray, features: int, train: bool) -> jnp.ndarray:
  x = nn.Conv(features, (3, 3), padding=1, use_bias=False, kernel_init=cifar_models.conv_init)(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
  return nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))


class MidCNN(nn.Module):
  """Three conv-BN-ReLU-pool stages, a BN-ReLU hidden dense layer, a linear head.

  The study's two sizes are this architecture at two widths: ``mid`` (16, 32, 64 channels,
  hidden 128: 160k parameters) and ``small`` (8, 16, 32, hidden 64: 39k parameters, a third of
  the compute). ``examples.cifar.models.TinyCNN`` (global average pooling, 5k parameters) is
  not in the study: it underfits 1,000 images (training loss 1.49 after 40 epochs, measured),
  so no regulariser can help it.

  Attributes:
    num_classes: number of output logits.
    widths: channels of the conv stages.
    hidden: width of the hidden dense layer.
  """

  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    for w in self.widths:
      x = _conv_bn_relu_pool(x, w, train)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden, use_bias=False, kernel_init=cifar_models.dense_init)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    return nn.Dense(self.num_classes, kernel_init=cifar_models.dense_init)(x)


MODEL_NAMES = ("small", "mid", "tiny", "micro")


def get_model(name: str) -> nn.Module:
  """``small`` / ``mid`` (the study's), ``tiny`` (TinyCNN), ``micro`` (the smoke test's)."""
  if name == "small":
    return MidCNN(widths=(8, 16, 32), hidden=64)
  if name == "mid":
    return MidCNN()
  if name == "tiny":
    return cifar_models.TinyCNN(num_classes=10, width=16)
  if name == "micro":  # seconds to compile and run.
    return MidCNN(widths=(4, 4, 4), hidden=8)
  raise ValueError(f"unknown model {name!r}: use one of {MODEL_NAMES}")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One optimiser configuration (a row of a table)."""

  method: str  # "erm", "amp" or "sam"
  epsilon: float = 0.0
  norm: str = "per_tensor"
  radius: str = "absolute"
  inner_lr: float = 1.0
  ascent_every: int = 1
  between: str = "clean"
  rho: float = 0.0
  dispatch: str = "cond"  # the cheaper step: "cond" (the library's) or "python" (two jits)

  @property
  def label(self) -> str:
    if self.method == "erm":
      return "ERM"
    if self.method == "sam":
      return f"SAM rho={self.rho:g}"
    s = f"AMP {self.radius[:3]} {self.norm} eps={self.epsilon:g}"
    if self.ascent_every > 1:
      s += f" every={self.ascent_every} {self.between}"
      if self.dispatch == "python":
        s += " (python)"
    return s

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Config:
  """A training configuration: model, data and schedule."""

  model: str
  augment: bool
  train_size: int
  val_size: int
  epochs: int
  batch_size: int = 128
  lr: float = 0.05
  weight_decay: float = 5e-4

  @property
  def label(self) -> str:
    return f"{self.model} {'aug' if self.augment else 'noaug'} n={self.train_size}"


def _base(config: Config, total_steps: int) -> optax.GradientTransformation:
  lr = optax.cosine_decay_schedule(config.lr, total_steps)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(lr, momentum=0.9, nesterov=True))


def _amp(setting: Setting, every: int | None) -> optax.GradientTransformation:
  return amp_optax.amp(setting.epsilon, inner_lr=setting.inner_lr, inner_steps=1,
                       norm=setting.norm, radius=setting.radius, ascent_every=every,
                       between_ascents=setting.between if every else "clean")


def make_tx(setting: Setting, config: Config, total_steps: int) -> optax.GradientTransformation:
  """SGD (Nesterov, decoupled weight decay, cosine decay), plain or under AMP or SAM."""
  base = _base(config, total_steps)
  if setting.method == "erm":
    return base
  if setting.method == "amp":
    every = None if setting.ascent_every == 1 else setting.ascent_every
    return optax.chain(_amp(setting, every), base)
  if setting.method == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(setting.rho))
    return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
  raise ValueError(f"unknown method {setting.method!r}")


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _losses(model: nn.Module, augment: bool):
  """``(images, labels, key, batch_stats) -> (x, loss_fn)`` for one batch."""

  def batch_loss(images, labels, key, batch_stats):
    if augment:
      x = cifar_data.augment(key, images, MEAN, STD)
    else:
      x = cifar_data.normalize(images, MEAN, STD)

    def loss_fn(p):
      logits, new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                     mutable=["batch_stats"])
      return jnp.mean(cross_entropy(logits, labels)), (logits, new_vars["batch_stats"])

    return loss_fn

  return batch_loss


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, augment: bool):
  """A jitted ``(params, batch_stats, opt_state, images_u8, labels, key) -> (..., loss, acc)``.

  The perturbed gradients (AMP's ``grad_fn``, SAM's) use the batch's own statistics, like the
  clean one; only the clean pass updates the running BatchNorm statistics.
  """
  batch_loss = _losses(model, augment)

  def step(params, batch_stats, opt_state, images, labels, key):
    loss_fn = batch_loss(images, labels, key, batch_stats)
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    def grad_fn(p, _inner_step):
      return jax.grad(lambda q: loss_fn(q)[0])(p)

    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return params, new_stats, opt_state, loss, acc

  return jax.jit(step, donate_argnums=(0, 1, 2))


def make_python_dispatched(model: nn.Module, setting: Setting, config: Config, total_steps: int):
  """AMP's cheaper step with the branch chosen in Python: ``(init, step)``.

  The same arithmetic as ``amp(..., ascent_every=k, between_ascents=...)`` (ascend on steps
  0, k, 2k, ...; in between the clean gradient, plus with ``"reuse"`` the last ascent's
  adversarial-minus-clean gradient), but as two jitted steps called alternately from Python,
  so no :func:`jax.lax.cond` holds the convolutions: XLA:CPU runs them slowly inside one,
  as inside loops. ``tests/test_study.py`` checks it against the library's ``lax.cond`` form.
  """
  base = _base(config, total_steps)
  amp_tx = _amp(setting, None)
  reuse = setting.between == "reuse"
  batch_loss = _losses(model, augment=config.augment)

  calls = [0]

  def init(params):
    calls[0] = 0  # a new run starts with an ascent step.
    corr = jax.tree.map(jnp.zeros_like, params) if reuse else ()
    return (amp_tx.init(params), base.init(params), corr)

  def ascent(params, batch_stats, opt_state, images, labels, key):
    amp_state, base_state, corr = opt_state
    loss_fn = batch_loss(images, labels, key, batch_stats)
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    adv, amp_state = amp_tx.update(grads, amp_state, params,
                                   grad_fn=lambda p, _: jax.grad(lambda q: loss_fn(q)[0])(p))
    if reuse:
      corr = jax.tree.map(jnp.subtract, adv, grads)
    updates, base_state = base.update(adv, base_state, params)
    params = optax.apply_updates(params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return params, new_stats, (amp_state, base_state, corr), loss, acc

  def clean(params, batch_stats, opt_state, images, labels, key):
    amp_state, base_state, corr = opt_state
    loss_fn = batch_loss(images, labels, key, batch_stats)
    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if reuse:
      grads = jax.tree.map(jnp.add, grads, corr)
    updates, base_state = base.update(grads, base_state, params)
    params = optax.apply_updates(params, updates)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return params, new_stats, (amp_state, base_state, corr), loss, acc

  jit_ascent = jax.jit(ascent, donate_argnums=(0, 1, 2))
  jit_clean = jax.jit(clean, donate_argnums=(0, 1, 2))

  def step(*args):
    fn = jit_ascent if calls[0] % setting.ascent_every == 0 else jit_clean
    calls[0] += 1
    return fn(*args)

  return init, step


def make_runner(model: nn.Module, setting: Setting, config: Config, total_steps: int):
  """``(init, step)`` of a setting: one jitted step, or two for the Python-dispatched one."""
  if setting.dispatch == "python" and setting.method == "amp" and setting.ascent_every > 1:
    return make_python_dispatched(model, setting, config, total_steps)
  tx = make_tx(setting, config, total_steps)
  return tx.init, make_train_step(model, tx, config.augment)


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


class Data:
  """Train / validation / test arrays on the host (uint8 images, int32 labels)."""

  def __init__(self, d: cifar_data.CifarData, train_size: int, val_size: int, test_size: int):
    need = train_size + val_size
    if len(d.train_images) < need:
      raise ValueError(f"need {need} training-pool images, the data has {len(d.train_images)}")
    self.train_x = d.train_images[:train_size]
    self.train_y = d.train_labels[:train_size].astype(np.int32)
    self.val_x = d.train_images[train_size:need]
    self.val_y = d.train_labels[train_size:need].astype(np.int32)
    self.test_x = d.test_images[:test_size]
    self.test_y = d.test_labels[:test_size].astype(np.int32)


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
    total = steps_per_epoch * config.epochs
    if (config, setting) not in self._runners:
      self._runners[(config, setting)] = make_runner(model, setting, config, total)
    init, step = self._runners[(config, setting)]
    params, stats = self.init(model, seed)
    opt_state = init(params)
    aug_key = jax.random.key(10_000 + seed)
    t0 = time.perf_counter()
    losses = []
    for epoch in range(config.epochs):
      # The data order and augmentation draws depend on the seed only: paired across methods.
      perm = np.random.default_rng([seed, epoch]).permutation(n)
      losses, accs = [], []
      for i in range(steps_per_epoch):
        idx = perm[i * config.batch_size:(i + 1) * config.batch_size]
        params, stats, opt_state, loss, acc = step(
            params, stats, opt_state, self.data.train_x[idx], self.data.train_y[idx],
            jax.random.fold_in(aug_key, epoch * steps_per_epoch + i))
        losses.append(loss)
        accs.append(acc)
      if log is not None and (epoch + 1) % max(1, config.epochs // 4) == 0:
        log(f"    epoch {epoch + 1}/{config.epochs} train loss "
            f"{float(np.mean(jax.device_get(losses))):.4f}")
    train_loss = float(np.mean(jax.device_get(losses)))
    train_acc = float(np.mean(jax.device_get(accs)))
    train_seconds = time.perf_counter() - t0
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
            "train_seconds": train_seconds}


# ---------------------------------------------------------------------------------------------
# Statistics.


def mean_std(values: list[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> dict[str, Any]:
  """Mean of ``a - b`` (paired by position) and its t-interval."""
  import scipy.stats  # pylint: disable=g-import-not-at-top

  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = len(d)
  mean = float(d.mean()) if n else float("nan")
  if n < 2:
    return {"n": n, "mean": mean, "lo": float("nan"), "hi": float("nan")}
  half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
  return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def summarize(runs: dict[str, dict[str, Any]], erm_runs: dict[str, dict[str, Any]] | None):
  """Per-setting aggregate; ``runs`` and ``erm_runs`` map a seed (str) to a run."""
  out: dict[str, Any] = {"seeds": sorted(int(s) for s in runs)}
  for key in ("test_acc", "val_acc", "train_loss", "train_acc", "hessian_top_eigenvalue",
              "perturb_increase"):
    m, s = mean_std([r[key] for r in runs.values()])
    out[key] = {"mean": m, "std": s}
  if erm_runs is not None:
    common = sorted(set(runs) & set(erm_runs), key=int)
    out["test_acc_minus_erm"] = paired_ci([runs[s]["test_acc"] for s in common],
                                          [erm_runs[s]["test_acc"] for s in common])
  return out


# ---------------------------------------------------------------------------------------------
# Presets and the tables.

SWEEP_SEEDS = (100, 101)  # two seeds (CPU budget); not the final table's: less selection bias.
FINAL_SEEDS = (0, 1, 2, 3, 4)
SWEEP_GRID = {
    ("absolute", "per_tensor"): (0.02, 0.05, 0.2, 0.5),
    ("absolute", "global"): (0.03, 0.1, 0.3, 1.0),
    ("relative", "per_tensor"): (0.003, 0.01, 0.03, 0.1),
    ("relative", "global"): (0.003, 0.01, 0.03, 0.1),
}
SAM_RHOS = (0.05, 0.2)
PAPER = Setting("amp", epsilon=0.5, norm="per_tensor", radius="absolute")
FALLBACK_CHOICE = {"amp": Setting("amp", epsilon=0.03, norm="per_tensor", radius="relative"),
                   "sam": Setting("sam", rho=0.05)}

_REAL = dict(models=("small", "mid"), train_size=1000, val_size=500, test_size=2000,
             epochs=None, batch_size=100, hessian_iters=6, perturb_samples=6,
             sharpness_batch=128)
PRESETS: dict[str, dict[str, Any]] = {
    "study-sweep": dict(_REAL, augments=(False,), seeds=SWEEP_SEEDS),
    "study-final": dict(_REAL, augments=(False, True), seeds=FINAL_SEEDS),
    "study-smoke": dict(models=("micro",), augments=(False, True), train_size=96, val_size=32,
                        test_size=64, epochs=2, seeds=(0, 1), hessian_iters=2,
                        perturb_samples=2, sharpness_batch=32, batch_size=32),
}
# Epochs per (model, augment): long enough that ERM's training loss gets near zero without
# augmentation (measured on the 1,000-image set), the same with it.
EPOCHS = {("small", False): 15, ("small", True): 15, ("mid", False): 12, ("mid", True): 12,
          ("tiny", False): 40, ("tiny", True): 40, ("micro", False): 2, ("micro", True): 2}


def sweep_settings(smoke: bool) -> list[Setting]:
  settings = [Setting("erm")]
  for (radius, norm), eps in SWEEP_GRID.items():
    for e in (eps[:1] if smoke else eps):
      settings.append(Setting("amp", epsilon=e, norm=norm, radius=radius))
  if PAPER not in settings:
    settings.append(PAPER)
  settings += [Setting("sam", rho=r) for r in (SAM_RHOS[:1] if smoke else SAM_RHOS)]
  return settings


def choose_from_sweep(sweep: dict[str, Any] | None, model: str) -> tuple[dict[str, Setting], str]:
  """Best AMP setting and SAM rho for ``model`` by mean validation accuracy in the sweep."""
  if sweep is None:
    return dict(FALLBACK_CHOICE), "fallback (no sweep results)"
  best: dict[str, tuple[float, Setting]] = {}
  for group in sweep["groups"]:
    if group["config"]["model"] != model:
      continue
    for row in group["rows"]:
      s = Setting(**row["setting"])
      if s.method == "erm" or not row["runs"]:
        continue
      val = float(np.mean([r["val_acc"] for r in row["runs"].values()]))
      if s.method not in best or val > best[s.method][0]:
        best[s.method] = (val, s)
  if set(best) != {"amp", "sam"}:
    return dict(FALLBACK_CHOICE), "fallback (sweep lacks this model)"
  return {k: v[1] for k, v in best.items()}, "best validation accuracy in the sweep"


def final_settings(choice: dict[str, Setting], smoke: bool) -> list[Setting]:
  amp_best = choice["amp"]
  settings = [Setting("erm"), amp_best, choice["sam"]]
  if PAPER not in settings:
    settings.append(PAPER)
  # Trained Python-dispatched: the same arithmetic as the library's lax.cond form (the smoke
  # test checks it), at the cost the cheaper step should have on CPU.
  for every in ((2,) if smoke else (2, 4)):
    for between in ("clean", "reuse"):
      settings.append(dataclasses.replace(amp_best, ascent_every=every, between=between,
                                          dispatch="python"))
  return settings


def timing_settings(choice: dict[str, Setting], smoke: bool) -> list[Setting]:
  """The final table's settings, the cheaper step in both forms (lax.cond and Python)."""
  settings = []
  for s in final_settings(choice, smoke):
    if s == PAPER:
      continue  # the same cost as any AMP row.
    if s.ascent_every > 1:
      settings.append(dataclasses.replace(s, dispatch="cond"))
    settings.append(s)
  return settings


# ---------------------------------------------------------------------------------------------
# Step time: interleaved, in one process.


def time_steps(model_name: str, settings: list[Setting], batch_size: int, rounds: int = 5,
               blocks: int = 6, block: int = 4) -> list[dict[str, Any]]:
  """Median seconds per step of each setting's train step, interleaved in ``rounds``.

  Each timed call is a block of ``block`` consecutive steps (a multiple of ``ascent_every``)
  waited for at its end, so steps with and without an ascent are averaged as in training.
  """
  model = get_model(model_name)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (batch_size,)).astype(np.int32)
  config = Config(model_name, False, batch_size, 0, 1, batch_size)
  runners = []
  for s in settings:
    init, step = make_runner(model, s, config, 1000)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    state = [variables["params"], variables["batch_stats"], init(variables["params"])]
    key = jax.random.key(0)

    def run_block(step=step, state=state, key=key):
      for _ in range(block):
        state[0], state[1], state[2], loss, _ = step(state[0], state[1], state[2], images,
                                                     labels, key)
      jax.block_until_ready(loss)

    run_block()  # compile and warm up
    runners.append(run_block)
  times: list[list[float]] = [[] for _ in settings]
  for _ in range(rounds):
    for i, r in enumerate(runners):
      for _ in range(blocks):
        t0 = time.perf_counter()
        r()
        times[i].append((time.perf_counter() - t0) / block)
  erm = float(np.median(times[0]))
  rows = []
  for s, t in zip(settings, times, strict=True):
    med = float(np.median(t))
    rows.append({"setting": s.as_dict(), "label": s.label, "ms_median": 1e3 * med,
                 "ms_p10": 1e3 * float(np.percentile(t, 10)),
                 "ms_p90": 1e3 * float(np.percentile(t, 90)), "ratio_vs_erm": med / erm})
  return rows


# ---------------------------------------------------------------------------------------------
# Driver.


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def load_data(args: argparse.Namespace, workdir: str) -> Data:
  p = PRESETS[args.preset]
  if args.preset == "study-smoke":
    d = cifar_data.synthetic_cifar(p["train_size"] + p["val_size"], p["test_size"], seed=0)
  else:
    data_dir = args.data_dir
    if data_dir is None:
      if not os.path.exists(BUILD_PY):
        raise SystemExit(
            f"study: no data. {BUILD_PY} is absent (the shared CIFAR-10 JPEG copy lives next "
            "to the repository); pass --data-dir with an official-layout CIFAR-10 folder, or "
            "run --preset study-smoke (synthetic data).")
      data_dir = os.path.join(workdir, "cifar")
      if not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        subprocess.run([sys.executable, BUILD_PY, data_dir, "--train",
                        str(p["train_size"] + p["val_size"]), "--test", str(p["test_size"])],
                       check=True, capture_output=True)
    d = cifar_data.load_cifar(data_dir)
  return Data(d, p["train_size"], p["val_size"], p["test_size"])


def _rows_for(result: dict[str, Any], config: Config, settings: list[Setting]):
  """The group of ``config`` in ``result`` (created if new), rows for ``settings``."""
  for g in result["groups"]:
    if g["config"] == dataclasses.asdict(config):
      group = g
      break
  else:
    group = {"config": dataclasses.asdict(config), "rows": []}
    result["groups"].append(group)
  by_label = {r["label"]: r for r in group["rows"]}
  rows = []
  for s in settings:
    if s.label not in by_label:
      by_label[s.label] = {"label": s.label, "setting": s.as_dict(), "runs": {}}
      group["rows"].append(by_label[s.label])
    rows.append(by_label[s.label])
  return group, rows


def run_table(args: argparse.Namespace) -> dict[str, Any]:
  p = PRESETS[args.preset]
  smoke = args.preset == "study-smoke"
  out_dir = args.out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  name = args.preset.replace("-", "_")
  json_path = os.path.join(out_dir, f"{name}.json")
  result = {"benchmark": "study", "preset": args.preset, "groups": []}
  if os.path.exists(json_path) and not args.restart:
    with open(json_path) as f:
      result = json.load(f)
  result.update({
      "data": ("synthetic" if smoke else "CIFAR-10 (JPEG copy)"),
      "train_size": p["train_size"], "val_size": p["val_size"], "test_size": p["test_size"],
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "backend": jax.default_backend(), "jax": jax.__version__,
                  "optax": optax.__version__}})
  workdir = args.work_dir or os.path.join(tempfile.gettempdir(), "amp_optax_study")
  os.makedirs(workdir, exist_ok=True)
  data = load_data(args, workdir)
  trainer = Trainer(data, p["hessian_iters"], p["perturb_samples"], p["sharpness_batch"])
  models = args.models or p["models"]
  seeds = p["seeds"][:args.seeds] if args.seeds else p["seeds"]
  sweep = None
  if args.preset == "study-final":
    sweep_path = os.path.join(out_dir, "study_sweep.json")
    if os.path.exists(sweep_path):
      with open(sweep_path) as f:
        sweep = json.load(f)
  elif smoke:
    sweep = None
  result.setdefault("choices", {})
  # Blocks in priority order, each with all its seeds before the next: a study cut short
  # leaves whole blocks behind. Within a block the seeds are outermost (complete seed pairs).
  plan = []
  for model in models:
    def config_for(augment, model=model):
      epochs = p["epochs"] or EPOCHS[(model, augment)]
      return Config(model, augment, p["train_size"], p["val_size"], epochs,
                    p.get("batch_size", 128))

    if args.preset == "study-sweep" or (smoke and args.table == "sweep"):
      plan.append((config_for(False), sweep_settings(smoke)))
      continue
    prev = result["choices"].get(model)
    if prev is not None and not args.restart:
      # Chosen once per table: a sweep extended later must not change a table's rows midway.
      choice = {k: Setting(**prev[k]) for k in ("amp", "sam")}
      why = prev["how"]
    else:
      choice, why = choose_from_sweep(sweep, "small" if smoke else model)
    if not args.methods:  # a process running some methods only leaves the record alone.
      result["choices"][model] = {"amp": choice["amp"].as_dict(),
                                  "sam": choice["sam"].as_dict(), "how": why}
    settings = final_settings(choice, smoke)
    core = [s for s in settings if s.ascent_every == 1 and s != PAPER]
    cheaper = [s for s in settings if s.ascent_every > 1]
    blocks = {"core": (config_for(False), core)}
    if True in p["augments"]:
      blocks["aug"] = (config_for(True), core)
    blocks["cheaper"] = (config_for(False), cheaper)
    if PAPER not in core:
      blocks["paper"] = (config_for(False), [PAPER])
    plan += [b for name, b in blocks.items() if not args.blocks or name in args.blocks]
  if args.methods:
    plan = [(c, [s for s in ss if s.method in args.methods]) for c, ss in plan]
  if args.timing_only:
    plan = []
  total = sum(len(s) for _, s in plan) * len(seeds)
  done = 0
  t_start = time.perf_counter()
  for config, settings in plan:
    for seed in seeds:
      _, rows = _rows_for(result, config, settings)
      for s, row in zip(settings, rows, strict=True):
        done += 1
        if str(seed) in row["runs"]:
          continue
        _log(f"[{done}/{total}] {config.label} | {s.label} | seed {seed}")
        r = trainer.run(config, s, seed, log=_log if args.verbose > 1 else None)
        row["runs"][str(seed)] = r
        _log(f"    test {r['test_acc']:.4f} val {r['val_acc']:.4f} train loss "
             f"{r['train_loss']:.4f} eig {r['hessian_top_eigenvalue']:.3g} "
             f"({r['train_seconds']:.0f}s, {time.perf_counter() - t_start:.0f}s total)")
        finish(result, json_path)
  if args.preset != "study-sweep" and not args.skip_timing:
    result["step_time"] = {}
    result["step_time_batch"] = p.get("batch_size", 128)
    for model in models:
      choice = result["choices"][model]
      settings = timing_settings({k: Setting(**v) for k, v in choice.items() if k != "how"},
                                 smoke)
      _log(f"step time {model}")
      result["step_time"][model] = time_steps(
          model, settings, p.get("batch_size", 128), rounds=2 if smoke else 3,
          blocks=1 if smoke else 3)
    finish(result, json_path)
  return finish(result, json_path)


def _merge_from_disk(result: dict[str, Any], json_path: str) -> None:
  """Adds to ``result`` the runs (and per-model entries) that another process saved."""
  if not os.path.exists(json_path):
    return
  with open(json_path) as f:
    disk = json.load(f)
  for key in ("choices", "step_time"):
    for model, value in disk.get(key, {}).items():
      result.setdefault(key, {}).setdefault(model, value)
  if "step_time_batch" in disk:
    result.setdefault("step_time_batch", disk["step_time_batch"])
  for dgroup in disk.get("groups", []):
    config = Config(**dgroup["config"])
    settings = [Setting(**r["setting"]) for r in dgroup["rows"]]
    _, rows = _rows_for(result, config, settings)
    for drow, row in zip(dgroup["rows"], rows, strict=True):
      for seed, run in drow["runs"].items():
        row["runs"].setdefault(seed, run)


def finish(result: dict[str, Any], json_path: str) -> dict[str, Any]:
  """Merges other processes' runs, recomputes the summaries, writes JSON, markdown, plots.

  Several processes (e.g. one per model) may fill the same table: the file is locked while it
  is read, merged and rewritten.
  """
  import fcntl  # pylint: disable=g-import-not-at-top

  # The lock lives outside the results folder, keyed by the table's absolute path.
  lock_name = "amp_optax_" + os.path.abspath(json_path).replace(os.sep, "_") + ".lock"
  with open(os.path.join(tempfile.gettempdir(), lock_name), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    _merge_from_disk(result, json_path)
    _finish_locked(result, json_path)
  return result


def _finish_locked(result: dict[str, Any], json_path: str) -> None:
  for group in result["groups"]:
    erm = next((r for r in group["rows"] if r["setting"]["method"] == "erm"), None)
    for row in group["rows"]:
      if row["runs"]:
        is_erm = row is erm
        row["summary"] = summarize(row["runs"], None if (erm is None or is_erm) else erm["runs"])
  md = markdown(result)
  result["markdown"] = md
  _write_json(json_path, result)
  with open(json_path[:-5] + ".md", "w") as f:
    f.write(md)
  try:
    plots(result, json_path[:-5])
  except Exception as e:  # pylint: disable=broad-except
    _log(f"plots failed: {e!r}")


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _group_order(group: dict[str, Any]) -> tuple[Any, ...]:
  c = group["config"]
  return (c["model"] != "small", c["model"], c["augment"])


def _row_order(row: dict[str, Any]) -> tuple[Any, ...]:
  st = row["setting"]
  return (("erm", "amp", "sam").index(st["method"]), st["ascent_every"], st["between"],
          st["radius"], st["norm"], st["epsilon"], st["rho"], st.get("dispatch", "cond"))


def markdown(result: dict[str, Any]) -> str:
  lines = [f"# {result['preset']}: {result['data']}, {result['train_size']} training images "
           f"(+{result['val_size']} validation), {result['test_size']} test images", ""]
  if result.get("choices"):
    for m, c in result["choices"].items():
      lines.append(f"- {m}: AMP = {Setting(**c['amp']).label}, SAM = "
                   f"{Setting(**c['sam']).label} ({c['how']})")
    lines.append("")
  for group in sorted(result["groups"], key=_group_order):
    c = group["config"]
    lines += [f"## {c['model']}, {'crop+flip augmentation' if c['augment'] else 'no augmentation'}"
              f", {c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']} (cosine)", "",
              "| setting | seeds | test acc % (mean ± std) | Δ test vs ERM, paired [95% CI] | "
              "val acc % | final train loss | top Hessian eig | loss incr. @5% |",
              "|---|---|---|---|---|---|---|---|"]
    for row in sorted(group["rows"], key=_row_order):
      s = row.get("summary")
      if not s:
        continue
      d = s.get("test_acc_minus_erm")
      diff = "—"
      if d and d["n"] >= 2:
        diff = f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
      elif d and d["n"] == 1:
        diff = f"{100 * d['mean']:+.2f}"
      spread = f" ± {_pct(s['test_acc']['std'])}" if len(s["seeds"]) > 1 else ""
      lines.append(
          f"| {row['label']} | {len(s['seeds'])} | {_pct(s['test_acc']['mean'])}{spread} | "
          f"{diff} | {_pct(s['val_acc']['mean'])} | "
          f"{s['train_loss']['mean']:.4f} | {s['hessian_top_eigenvalue']['mean']:.3g} | "
          f"{s['perturb_increase']['mean']:.3g} |")
    lines.append("")
  if result["preset"] == "study-sweep":
    lines += transfer_lines(result)
  else:
    lines += comparison_lines(result)
  if result.get("step_time"):
    lines += [f"## Step time (interleaved in one process, batch {result.get('step_time_batch')}"
              f", {result['machine']['cpu_count']} CPU cores shared with other jobs)", "",
              "| model | setting | ms/step (median) | ratio to ERM |", "|---|---|---|---|"]
    for m, rows in sorted(result["step_time"].items(), key=lambda kv: (kv[0] != "small", kv[0])):
      for r in rows:
        lines.append(f"| {m} | {r['label']} | {r['ms_median']:.1f} | {r['ratio_vs_erm']:.2f} |")
    lines.append("")
  return "\n".join(lines)


def comparison_lines(result: dict[str, Any]) -> list[str]:
  """AMP vs SAM paired by seed, and the cheaper step's share of AMP's gain and its cost."""
  lines = ["## AMP vs SAM, paired by seed (test accuracy, points)", "",
           "| model, data | AMP − SAM [95% CI] | seeds |", "|---|---|---|"]
  cheap = ["## The cheaper step: share of AMP's gain over ERM, and cost", "",
           "Gain: mean paired test-accuracy difference to ERM; share: the cheaper step's gain "
           "over full AMP's (same epsilon, same seeds). Step-time ratios to ERM from the table "
           "below (Python-dispatched / the library's lax.cond form).", "",
           "| model | setting | gain (points) | share of AMP's gain | step time / ERM (python, "
           "cond) |", "|---|---|---|---|---|"]
  times = {}
  for model, rows in result.get("step_time", {}).items():
    for r in rows:
      st = r["setting"]
      times[(model, st["ascent_every"], st["between"], st.get("dispatch", "cond"),
             st["method"])] = r["ratio_vs_erm"]
  for g in result["groups"]:
    c = g["config"]
    rows = {r["label"]: r for r in g["rows"] if r["runs"]}
    amp = [r for r in rows.values() if r["setting"]["method"] == "amp"
           and r["setting"]["ascent_every"] == 1 and Setting(**r["setting"]) != PAPER]
    sam = [r for r in rows.values() if r["setting"]["method"] == "sam"]
    erm = rows.get("ERM")
    where = f"{c['model']}, {'aug' if c['augment'] else 'no aug'}"
    for a in amp:
      for s_ in sam:
        common = sorted(set(a["runs"]) & set(s_["runs"]), key=int)
        d = paired_ci([a["runs"][k]["test_acc"] for k in common],
                      [s_["runs"][k]["test_acc"] for k in common])
        if d["n"] >= 2:
          lines.append(f"| {where}: {a['label']} vs {s_['label']} | {100 * d['mean']:+.2f} "
                       f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}] | {d['n']} |")
    if erm is None or len(amp) != 1:
      continue
    full = amp[0].get("summary", {}).get("test_acc_minus_erm")
    for r in rows.values():
      st = r["setting"]
      if st["method"] != "amp" or st["ascent_every"] == 1 or not full:
        continue
      d = r["summary"]["test_acc_minus_erm"]
      share = d["mean"] / full["mean"] if full["mean"] > 0 else float("nan")
      t_py = times.get((c["model"], st["ascent_every"], st["between"], "python", "amp"))
      t_cond = times.get((c["model"], st["ascent_every"], st["between"], "cond", "amp"))
      cost = ", ".join("—" if t is None else f"{t:.2f}" for t in (t_py, t_cond))
      cheap.append(f"| {c['model']} | {r['label']} (n={d['n']}) | {100 * d['mean']:+.2f} | "
                   f"{100 * share:.0f}% (AMP: {100 * full['mean']:+.2f}) | {cost} |")
  out = []
  if len(lines) > 4:
    out += lines + [""]
  if len(cheap) > 6:
    out += cheap + [""]
  return out


def transfer_lines(result: dict[str, Any]) -> list[str]:
  """Does a family's best epsilon on one model carry over to the other (no augmentation)?

  For each (radius, norm): the best epsilon of each model by validation accuracy, and the
  *transfer regret*: how much test accuracy each model loses when it uses the other model's
  best epsilon instead of its own (0 when the two agree).
  """
  acc: dict[tuple[str, str], dict[str, dict[float, tuple[float, float]]]] = {}
  models = []
  for g in result["groups"]:
    if g["config"]["augment"]:
      continue
    model = g["config"]["model"]
    models.append(model)
    for r in g["rows"]:
      st = r["setting"]
      if st["method"] != "amp" or st["ascent_every"] != 1 or not r["runs"]:
        continue
      runs = r["runs"].values()
      acc.setdefault((st["radius"], st["norm"]), {}).setdefault(model, {})[st["epsilon"]] = (
          float(np.mean([x["val_acc"] for x in runs])),
          float(np.mean([x["test_acc"] for x in runs])))
  if len(models) != 2:
    return []
  a, b = sorted(models, key=lambda m: (m != "small", m))
  lines = [f"## Does the best epsilon transfer between {a} and {b}? (no augmentation)", "",
           "Best epsilon per model by validation accuracy; regret: test accuracy (points) a "
           "model loses using the other model's best epsilon instead of its own.", "",
           f"| radius, norm | best eps {a} | best eps {b} | regret {a} | regret {b} | "
           f"sum |", "|---|---|---|---|---|---|"]
  for (radius, norm), per_model in acc.items():
    if set(per_model) != {a, b} or set(per_model[a]) != set(per_model[b]):
      continue  # the grid is incomplete for one model.
    best = {m: max(per_model[m], key=lambda e, m=m: per_model[m][e][0]) for m in (a, b)}
    regret = {m: per_model[m][best[m]][1] - per_model[m][best[o]][1]
              for m, o in ((a, b), (b, a))}
    lines.append(f"| {radius}, {norm} | {best[a]:g} | {best[b]:g} | {100 * regret[a]:+.2f} | "
                 f"{100 * regret[b]:+.2f} | {100 * (regret[a] + regret[b]):+.2f} |")
  lines.append("")
  return lines if len(lines) > 7 else []


def plots(result: dict[str, Any], stem: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = [g for g in sorted(result["groups"], key=_group_order)
            if any(r.get("summary") for r in g["rows"])]
  if not groups:
    return
  if result["preset"] in ("study-sweep", "study-smoke"):
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
      erm = next((r for r in g["rows"] if r["setting"]["method"] == "erm" and r.get("summary")),
                 None)
      for (radius, norm), style in zip(SWEEP_GRID, ("o-", "s-", "o--", "s--"), strict=True):
        pts = sorted((r["setting"]["epsilon"], r["summary"]["test_acc"]["mean"],
                      r["summary"]["test_acc"]["std"]) for r in g["rows"]
                     if r.get("summary") and r["setting"]["method"] == "amp"
                     and r["setting"]["radius"] == radius and r["setting"]["norm"] == norm
                     and r["setting"]["ascent_every"] == 1)
        if pts:
          e, m, s = map(np.asarray, zip(*pts))
          ax.errorbar(e, 100 * m, 100 * s, fmt=style, capsize=2, label=f"AMP {radius} {norm}")
      if erm:
        ax.axhline(100 * erm["summary"]["test_acc"]["mean"], color="k", lw=1, label="ERM")
      ax.set_xscale("log")
      ax.set_xlabel("epsilon (absolute: radius; relative: fraction of the norm)")
      ax.set_ylabel("test accuracy %")
      ax.set_title(f"{g['config']['model']} ({'aug' if g['config']['augment'] else 'no aug'})")
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_eps.png", dpi=110)
    plt.close(fig)
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, g in zip(axes[0], groups, strict=True):
    for r in g["rows"]:
      if not r.get("summary"):
        continue
      method = r["setting"]["method"]
      xs = [run["hessian_top_eigenvalue"] for run in r["runs"].values()]
      ys = [100 * run["test_acc"] for run in r["runs"].values()]
      ax.scatter(xs, ys, s=12, marker={"erm": "x", "amp": "o", "sam": "^"}[method],
                 color={"erm": "k", "amp": "C0", "sam": "C3"}[method], alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("top Hessian eigenvalue (train batch, final params)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{g['config']['model']} ({'aug' if g['config']['augment'] else 'no aug'}): "
                 "x ERM, o AMP, ^ SAM", fontsize=9)
  fig.tight_layout()
  fig.savefig(stem + "_sharpness.png", dpi=110)
  plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", choices=sorted(PRESETS), default="study-sweep")
  ap.add_argument("--table", choices=("sweep", "final"), default="final",
                  help="with study-smoke: which table's settings to run")
  ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None)
  ap.add_argument("--methods", nargs="+", choices=("erm", "amp", "sam"), default=None,
                  help="run only these methods' rows (e.g. ERM in a second process early)")
  ap.add_argument("--blocks", nargs="+", choices=("core", "aug", "cheaper", "paper"),
                  default=None, help="study-final: run only these blocks (default: all, in the "
                  "order core (ERM/AMP/SAM, no aug), aug (the same with augmentation), cheaper "
                  "(ascent_every 2 and 4), paper (AMP at the paper's epsilon))")
  ap.add_argument("--seeds", type=int, default=None, help="only the first N of the preset's seeds")
  ap.add_argument("--data-dir", default=None, help="an official-layout CIFAR-10 folder")
  ap.add_argument("--work-dir", default=None, help="where the data subset is built")
  ap.add_argument("--out-dir", default=None, help="default: benchmarks/results")
  ap.add_argument("--restart", action="store_true", help="ignore finished runs in the JSON")
  ap.add_argument("--skip-timing", action="store_true", help="no step-time table")
  ap.add_argument("--timing-only", action="store_true",
                  help="only the step-time table (of the final table's settings)")
  ap.add_argument("-v", "--verbose", type=int, default=1)
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = run_table(args)
  print(out["markdown"])
  return out


if __name__ == "__main__":
  main()
