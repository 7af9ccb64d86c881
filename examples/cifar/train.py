"""Train a CIFAR classifier with ERM, AMP or SAM (JAX, Flax Linen, Optax).

Examples (from the repository root)::

    python -m examples.cifar.train --quick                      # ~1 min on CPU, no download
    python -m examples.cifar.train --quick --optimizer erm      # the same without AMP
    python -m examples.cifar.train --data-dir DATA              # the paper's recipe: AMP,
                                                                # PreActResNet18, 200 epochs
    python -m examples.cifar.train --data-dir DATA --optimizer sam --rho 0.05
    python -m examples.cifar.train --data-dir DATA --out-dir runs/x --resume   # continue a run

The recipe follows Zheng et al. (CVPR 2021): SGD with Nesterov momentum 0.9, learning rate 0.1
divided by 10 at 50% and 75% of the epochs, weight decay 5e-4, batch size 50, random crop and
flip; AMP with epsilon 0.5, inner learning rate 1 and one inner step, per-tensor norm balls.
Weight decay is applied to the parameters outside the ascent::

    optax.chain(amp_optax.amp(...), optax.add_decayed_weights(wd), optax.sgd(...))

The whole dataset lives on the device; each step gathers its batch by a per-epoch permutation
and augments it inside the jitted step. With several local devices the batch is sharded over a
1-D mesh and the parameters are replicated (data parallelism through ``jax.jit``); results
match a single device up to float rounding. Everything random derives from ``--seed`` and the
epoch number, so ``--resume`` from the per-epoch checkpoint continues exactly as an
uninterrupted run would.

Outputs in ``--out-dir``: ``config.json``, ``metrics.jsonl`` (one JSON object per epoch),
``curves.png`` and ``checkpoints/`` (Orbax).

Reusable pieces (for benchmarks): :func:`make_optimizer`, :func:`make_lr_schedule`,
:func:`init_train_state`, :func:`make_train_step`, :func:`make_eval_step`,
:func:`make_data_mesh`; the models are in :mod:`examples.cifar.models`.
"""

import argparse
from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import amp_optax
from examples.cifar import data as cifar_data
from examples.cifar import models

Batch = tuple[jax.Array, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[Any, Any, Any, Batch, jax.Array], tuple[Any, Any, Any, Metrics]]

OPTIMIZERS = ("erm", "amp", "sam")
NORMS = ("per_tensor", "global")
DATA_AXIS = "batch"


# ---------------------------------------------------------------------------------------------
# Configuration.


class ConfigError(ValueError):
  """Settings that cannot work together (reported without a traceback on the command line)."""


@dataclasses.dataclass
class Config:
  """Everything a run depends on. ``None`` fields take the defaults of the mode (see
  :meth:`resolved`): the paper's recipe, or a small CPU-sized run with ``quick=True``."""

  optimizer: str = "amp"
  model: str | None = None  # preactresnet18; tiny_cnn with quick
  dataset: str = "cifar10"
  data_dir: str | None = None  # None with quick: a synthetic in-memory dataset
  epochs: int | None = None  # 200; 4 with quick
  batch_size: int | None = None  # 50; 64 with quick
  lr: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  epsilon: float = 0.5
  inner_lr: float = 1.0
  inner_steps: int = 1
  norm: str = "per_tensor"
  rho: float = 0.05
  augment: bool = True
  cutout: int = 0
  train_size: int | None = None  # all; quick: 2048 synthetic or the first 5000 real images
  test_size: int | None = None  # all; quick: 512 synthetic or the first 1000 real images
  dtype: str = "float32"
  seed: int = 0
  out_dir: str | None = None
  resume: bool = False
  overwrite: bool = False
  stop_after: int | None = None
  num_devices: int | None = None  # all local devices
  eval_batch_size: int = 500
  quick: bool = False
  checkpoint: bool = True
  plot: bool = True
  progress: bool = True
  verbose: bool = True

  def resolved(self) -> "Config":
    """A copy with every ``None`` default filled in for the mode; validates the values."""
    c = dataclasses.replace(self)
    if c.model is None:
      c.model = "tiny_cnn" if c.quick else "preactresnet18"
    if c.epochs is None:
      c.epochs = 4 if c.quick else 200
    if c.batch_size is None:
      c.batch_size = 64 if c.quick else 50
    if c.quick and c.train_size is None:
      c.train_size = 2048 if c.data_dir is None else 5000
    if c.quick and c.test_size is None:
      c.test_size = 512 if c.data_dir is None else 1000
    if c.out_dir is None:
      suffix = "-quick" if c.quick else ""
      c.out_dir = os.path.join(
          "runs", "cifar", f"{c.dataset}-{c.model}-{c.optimizer}-s{c.seed}{suffix}")
    if c.optimizer not in OPTIMIZERS:
      raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
    if c.dataset not in cifar_data.NUM_CLASSES:
      raise ConfigError(f"dataset must be cifar10 or cifar100, got {c.dataset!r}")
    if c.data_dir is None and not c.quick:
      raise ConfigError("--data-dir is required without --quick (--quick alone trains on a "
                       "synthetic dataset).")
    if c.epochs < 1 or c.batch_size < 1:
      raise ConfigError("epochs and batch size must be >= 1")
    if c.dtype not in ("float32", "bfloat16", "float16"):
      raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {c.dtype!r}")
    return c


# Fields that may differ between a run and its --resume without changing the result.
_RESUME_FREE = ("data_dir", "out_dir", "resume", "overwrite", "stop_after", "num_devices",
                "eval_batch_size", "checkpoint", "plot", "progress", "verbose")


# ---------------------------------------------------------------------------------------------
# Building blocks, reusable by benchmarks.


def make_lr_schedule(lr: float, epochs: int, steps_per_epoch: int,
                     milestones: Sequence[float] = (0.5, 0.75),
                     factor: float = 0.1) -> optax.Schedule:
  """Step decay: ``lr`` times ``factor`` after each milestone fraction of the epochs.

  As PyTorch's ``MultiStepLR`` stepped once per epoch: with 200 epochs the rate drops after
  epochs 100 and 150. Milestones that round to epoch 0 are dropped.
  """
  scales: dict[int, float] = {}
  for m in milestones:
    epoch = int(m * epochs)
    if epoch > 0:
      step = epoch * steps_per_epoch
      scales[step] = scales.get(step, 1.0) * factor
  return optax.piecewise_constant_schedule(lr, scales)


def make_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    epsilon: float = 0.5,
    inner_lr: float = 1.0,
    inner_steps: int = 1,
    norm: str = "per_tensor",
    rho: float = 0.05,
) -> optax.GradientTransformationExtraArgs:
  """The optimiser of a run: SGD (Nesterov) with weight decay, plain or with AMP or SAM.

  Args:
    name: ``"erm"`` (plain SGD), ``"amp"`` or ``"sam"``.
    learning_rate: a float or a schedule.
    momentum: Nesterov momentum.
    weight_decay: decoupled from the ascent: added to the update of the unperturbed
      parameters, as PyTorch's SGD ``weight_decay`` in the authors' code.
    epsilon, inner_lr, inner_steps, norm: AMP's arguments (see :func:`amp_optax.amp`).
    rho: SAM's radius (``optax.contrib.sam`` with a normalised SGD ascent, opaque mode).

  Returns:
    A transformation whose ``update`` takes ``grad_fn=`` (ignored by ERM).
  """
  base = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=True),
  )
  if name == "erm":
    return base
  if name == "amp":
    return optax.chain(
        # XLA:CPU runs convolutions in loop bodies slowly (jax#12868): unroll K there.
        amp_optax.amp(epsilon, inner_lr=inner_lr, inner_steps=inner_steps, norm=norm,
                      unroll=jax.default_backend() == "cpu"), base)
  if name == "sam":
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def make_data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh (axis ``"batch"``) over the first ``num_devices`` local devices (default all).

  The axis is of type ``Auto`` (sharding propagated by the compiler), which ``jax.jit`` data
  parallelism relies on; newer JAX makes ``Explicit`` the default, so it is asked for here.
  """
  devices = jax.local_devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in 1..{len(devices)}, got {n}")
  axis_type = getattr(jax.sharding, "AxisType", None)
  kwargs = {"axis_types": (axis_type.Auto,)} if axis_type is not None else {}
  return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n], **kwargs)


def init_train_state(model: Any, tx: optax.GradientTransformation, rng: jax.Array,
                     image_shape: Sequence[int] = cifar_data.IMAGE_SHAPE,
                     sharding: jax.sharding.Sharding | None = None) -> tuple[Any, Any, Any]:
  """Initialises ``(params, batch_stats, opt_state)``, placed with ``sharding`` if given."""

  def init(key):
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params)

  return jax.jit(init, out_shardings=sharding)(rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _amp_state(opt_state: Any) -> amp_optax.AmpState | None:
  is_amp = lambda s: isinstance(s, amp_optax.AmpState)
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_amp) if is_amp(s)]
  return found[0] if found else None


def make_train_step(
    model: Any,
    tx: optax.GradientTransformationExtraArgs,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    cutout_size: int = 0,
    data_sharding: jax.sharding.Sharding | None = None,
) -> TrainStep:
  """A pure train step ``(params, batch_stats, opt_state, batch, rng) -> (..., metrics)``.

  ``batch`` is ``(uint8 images NHWC, int labels)``; the step augments the images with ``rng``
  (crop, flip, optional Cutout), normalises them, takes the clean loss and gradient, and calls
  ``tx.update(grads, opt_state, params, grad_fn=grad_fn)``. ``grad_fn`` evaluates the same
  augmented batch at other parameters; BatchNorm runs in training mode there too (batch
  statistics), but only the clean pass's running statistics are kept.

  Args:
    model: a Flax Linen model taking ``train=`` and holding ``batch_stats``.
    tx: from :func:`make_optimizer` (or any transformation accepting ``grad_fn``).
    mean, std: per-channel normalisation in [0, 1].
    augment: crop and flip (Cutout too if ``cutout_size > 0``); else normalisation only.
    cutout_size: side of the Cutout square, 0 for none.
    data_sharding: where to place the batch (e.g. sharded over a mesh's batch axis).

  Returns:
    The step, not jitted (jit it, or compose it into a larger jitted function). ``metrics``
    holds the batch's clean ``loss`` and ``accuracy``, and AMP's diagnostics when ``tx``
    contains :func:`amp_optax.amp`.
  """

  def train_step(params, batch_stats, opt_state, batch, rng):
    images, labels = batch
    if augment:
      x = cifar_data.augment(rng, images, mean, std, cutout_size=cutout_size)
    else:
      x = cifar_data.normalize(images, mean, std)
    if data_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, data_sharding)

    def loss_fn(p):
      logits, new_vars = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                     mutable=["batch_stats"])
      return jnp.mean(cross_entropy(logits, labels)), (logits, new_vars["batch_stats"])

    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    def grad_fn(p, _inner_step):
      return jax.grad(loss_fn, has_aux=True)(p)[0]  # this pass's BatchNorm stats are dropped

    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss,
               "accuracy": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))}
    amp_state = _amp_state(opt_state)
    if amp_state is not None:
      metrics["amp_delta_norm"] = amp_state.delta_norm
      metrics["amp_clean_grad_norm"] = amp_state.clean_grad_norm
      metrics["amp_perturbed_grad_norm"] = amp_state.perturbed_grad_norm
    return params, new_batch_stats, opt_state, metrics

  return train_step


def make_eval_step(model: Any, *, mean: Sequence[float], std: Sequence[float],
                   data_sharding: jax.sharding.Sharding | None = None) -> Callable[..., Any]:
  """``eval_step(params, batch_stats, images, labels, weights) -> (loss_sum, correct_sum)``.

  Inference mode (running BatchNorm statistics); ``weights`` (0 or 1 per example) masks the
  padding of a last, partial batch. Not jitted.
  """

  def eval_step(params, batch_stats, images, labels, weights):
    x = cifar_data.normalize(images, mean, std)
    if data_sharding is not None:
      x = jax.lax.with_sharding_constraint(x, data_sharding)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(cross_entropy(logits, labels) * weights), jnp.sum(correct * weights)

  return eval_step


# ---------------------------------------------------------------------------------------------
# The training loop.


class TrainResult(NamedTuple):
  """What :func:`train` returns: the per-epoch metrics and the final state (on the device)."""

  history: list[dict[str, Any]]
  params: Any
  batch_stats: Any
  opt_state: Any
  config: Config


def _load_data(c: Config) -> cifar_data.CifarData:
  if c.data_dir is None:
    n_classes = cifar_data.NUM_CLASSES[c.dataset]
    return cifar_data.synthetic_cifar(c.train_size or 2048, c.test_size or 512, n_classes)
  d = cifar_data.load_cifar(c.data_dir, c.dataset)
  return d._replace(train_images=d.train_images[:c.train_size],
                    train_labels=d.train_labels[:c.train_size],
                    test_images=d.test_images[:c.test_size],
                    test_labels=d.test_labels[:c.test_size])


def _log(c: Config, msg: str) -> None:
  if c.verbose:
    print(msg, flush=True)


def _holds_run(c: Config) -> bool:
  return any(os.path.exists(os.path.join(c.out_dir, f)) for f in ("metrics.jsonl", "checkpoints"))


def _check_out_dir(c: Config) -> None:
  """Raises, before anything is written, if ``out_dir`` cannot be used as asked."""
  if _holds_run(c) and not c.resume and not c.overwrite:
    raise FileExistsError(f"{c.out_dir} already holds a run. Pass --resume to continue it, "
                          "--overwrite to start it afresh, or choose another --out-dir.")
  if c.resume:
    _check_resume_config(c)


def _prepare_out_dir(c: Config) -> None:
  """Clears an overwritten run, creates ``out_dir`` and writes ``config.json``."""
  if not c.resume:
    for f in ("metrics.jsonl", "config.json", "curves.png"):
      if os.path.exists(os.path.join(c.out_dir, f)):
        os.remove(os.path.join(c.out_dir, f))
    shutil.rmtree(os.path.join(c.out_dir, "checkpoints"), ignore_errors=True)
  os.makedirs(c.out_dir, exist_ok=True)
  with open(os.path.join(c.out_dir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(c), f, indent=2)


def _check_resume_config(c: Config) -> None:
  path = os.path.join(c.out_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  now = dataclasses.asdict(c)
  diff = [f"  {k}: saved {saved[k]!r}, now {v!r}" for k, v in now.items()
          if k not in _RESUME_FREE and k in saved and saved[k] != v]
  if diff:
    raise ConfigError(f"--resume with settings that differ from the run in {c.out_dir}:\n"
                      + "\n".join(diff)
                      + "\nResume with the same settings, or start a new --out-dir.")


def _read_history(path: str, up_to_epoch: int) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["epoch"] <= up_to_epoch]


def _write_history(path: str, history: list[dict[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in history:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def plot_curves(history: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Saves loss and accuracy curves (train and test per epoch) as a PNG."""
  from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

  epochs = [r["epoch"] for r in history]
  fig = Figure(figsize=(10, 4), layout="constrained")
  ax_loss, ax_acc = fig.subplots(1, 2)
  for split in ("train", "test"):
    ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker=".", label=split)
    ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], marker=".", label=split)
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=100)


def _checkpoint_manager(c: Config) -> Any:
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(c.out_dir, "checkpoints")),
                               options=options)


def train(config: Config) -> TrainResult:
  """Runs (or resumes) training as ``config`` says; writes metrics, plot and checkpoints.

  Returns:
    A :class:`TrainResult`; ``history[-1]`` holds the final metrics.
  """
  c = config.resolved()
  _check_out_dir(c)
  ds = _load_data(c)
  mesh = make_data_mesh(c.num_devices)
  n_dev = mesh.devices.size
  if c.batch_size % n_dev:
    raise ConfigError(f"batch size {c.batch_size} is not divisible by the {n_dev} devices; "
                      "change --batch-size or --num-devices.")
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(DATA_AXIS))
  n_train, n_test = len(ds.train_labels), len(ds.test_labels)
  steps_per_epoch = n_train // c.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"{n_train} training images make no batch of {c.batch_size}.")
  _prepare_out_dir(c)
  mean, std = cifar_data.MEAN[c.dataset], cifar_data.STD[c.dataset]
  _log(c, f"{c.dataset}{' (synthetic)' if c.data_dir is None else ''}: {n_train} train, "
          f"{n_test} test images; {c.model}, {c.optimizer}, {c.epochs} epochs of "
          f"{steps_per_epoch} steps, batch {c.batch_size} on {n_dev} {jax.default_backend()} "
          f"device(s)")

  model = models.get_model(c.model, ds.num_classes, dtype=jnp.dtype(c.dtype))
  schedule = make_lr_schedule(c.lr, c.epochs, steps_per_epoch)
  tx = make_optimizer(c.optimizer, schedule, momentum=c.momentum, weight_decay=c.weight_decay,
                      epsilon=c.epsilon, inner_lr=c.inner_lr, inner_steps=c.inner_steps,
                      norm=c.norm, rho=c.rho)

  root_key = jax.random.key(c.seed)
  params, batch_stats, opt_state = init_train_state(
      model, tx, jax.random.fold_in(root_key, 0), ds.train_images.shape[1:], replicated)

  # The data, once, on every device; batches are gathered from it inside the step.
  train_x = jax.device_put(ds.train_images, replicated)
  train_y = jax.device_put(ds.train_labels, replicated)
  eval_bs = min(c.eval_batch_size, n_test)
  eval_bs = -(-eval_bs // n_dev) * n_dev
  n_eval_batches = -(-n_test // eval_bs)
  pad = n_eval_batches * eval_bs - n_test
  test_x = jax.device_put(np.pad(ds.test_images, ((0, pad), (0, 0), (0, 0), (0, 0))), replicated)
  test_y = jax.device_put(np.pad(ds.test_labels, (0, pad)), replicated)
  test_w = jax.device_put(np.pad(np.ones(n_test, np.float32), (0, pad)), replicated)

  train_step = make_train_step(model, tx, mean=mean, std=std, augment=c.augment,
                               cutout_size=c.cutout, data_sharding=sharded)
  eval_step = make_eval_step(model, mean=mean, std=std, data_sharding=sharded)

  def epoch_step(params, batch_stats, opt_state, totals, images, labels, perm, index, key):
    idx = jax.lax.dynamic_slice_in_dim(perm, index * c.batch_size, c.batch_size)
    batch = jax.lax.with_sharding_constraint((images[idx], labels[idx]), sharded)
    params, batch_stats, opt_state, metrics = train_step(
        params, batch_stats, opt_state, batch, jax.random.fold_in(key, index))
    totals = jax.tree.map(jnp.add, totals, metrics)
    return params, batch_stats, opt_state, totals

  def eval_chunk(params, batch_stats, images, labels, weights, index):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, index * eval_bs, eval_bs)
    return eval_step(params, batch_stats, sl(images), sl(labels), sl(weights))

  jit_step = jax.jit(epoch_step, donate_argnums=(0, 1, 2, 3), out_shardings=replicated)
  jit_eval = jax.jit(eval_chunk, out_shardings=replicated)
  jit_perm = jax.jit(lambda k: jax.random.permutation(k, n_train), out_shardings=replicated)

  # Resume.
  start_epoch = 0
  manager = _checkpoint_manager(c) if c.checkpoint else None
  if c.resume and manager is not None and manager.latest_step() is not None:
    import orbax.checkpoint as ocp

    start_epoch = manager.latest_step()
    target = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(start_epoch, args=ocp.args.StandardRestore(abstract))
    params, batch_stats, opt_state = (restored["params"], restored["batch_stats"],
                                      restored["opt_state"])
    _log(c, f"resumed from {c.out_dir} after epoch {start_epoch}")
  elif c.resume:
    _log(c, f"--resume: no checkpoint in {c.out_dir}; starting afresh")
  metrics_path = os.path.join(c.out_dir, "metrics.jsonl")
  history = _read_history(metrics_path, start_epoch)
  _write_history(metrics_path, history)

  # Compile ahead of time, so that epoch times are pure run time.
  t0 = time.perf_counter()
  step_key = jax.random.fold_in(root_key, 2)
  metric_shapes = jax.eval_shape(
      train_step, params, batch_stats, opt_state,
      (jax.ShapeDtypeStruct((c.batch_size, *ds.train_images.shape[1:]), jnp.uint8),
       jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)), step_key)[3]
  zero_totals = lambda: jax.device_put(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), metric_shapes), replicated)
  perm0 = jit_perm(jax.random.fold_in(root_key, 1))
  compiled_step = jit_step.lower(params, batch_stats, opt_state, zero_totals(), train_x, train_y,
                                 perm0, 0, step_key).compile()
  compiled_eval = jit_eval.lower(params, batch_stats, test_x, test_y, test_w, 0).compile()
  compile_time = time.perf_counter() - t0

  last_epoch = c.epochs if c.stop_after is None else min(c.epochs, c.stop_after)
  from tqdm.auto import tqdm

  for epoch in range(start_epoch, last_epoch):
    epoch_key = jax.random.fold_in(step_key, epoch)
    perm = jit_perm(jax.random.fold_in(jax.random.fold_in(root_key, 1), epoch))
    totals = zero_totals()
    t0 = time.perf_counter()
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{c.epochs}",
               disable=None if c.progress else True, leave=False, dynamic_ncols=True)
    refresh = max(1, steps_per_epoch // 20)
    for i in bar:
      params, batch_stats, opt_state, totals = compiled_step(
          params, batch_stats, opt_state, totals, train_x, train_y, perm, i, epoch_key)
      if c.progress and (i + 1) % refresh == 0:
        done = jax.device_get(totals)
        bar.set_postfix(loss=f"{done['loss'] / (i + 1):.3f}",
                        acc=f"{100 * done['accuracy'] / (i + 1):.1f}%")
    totals = jax.device_get(totals)
    epoch_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    sums = [compiled_eval(params, batch_stats, test_x, test_y, test_w, j)
            for j in range(n_eval_batches)]
    loss_sum, correct_sum = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    eval_time = time.perf_counter() - t0

    row = {
        "epoch": epoch + 1,
        "step": (epoch + 1) * steps_per_epoch,
        "lr": float(schedule(epoch * steps_per_epoch)),
        "train_loss": float(totals["loss"]) / steps_per_epoch,
        "train_acc": float(totals["accuracy"]) / steps_per_epoch,
        "test_loss": float(loss_sum) / n_test,
        "test_acc": float(correct_sum) / n_test,
        "epoch_time": epoch_time,
        "eval_time": eval_time,
    }
    for k in sorted(totals):
      if k.startswith("amp_"):
        row[k] = float(totals[k]) / steps_per_epoch
    if epoch == start_epoch:
      row["compile_time"] = compile_time
    if not all(math.isfinite(row[k]) for k in ("train_loss", "test_loss")):
      _log(c, f"warning: non-finite loss at epoch {epoch + 1}")
    history.append(row)
    _write_history(metrics_path, history)
    if manager is not None:
      import orbax.checkpoint as ocp

      manager.save(epoch + 1, args=ocp.args.StandardSave(
          {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}))
    _log(c, f"epoch {epoch + 1:4d}/{c.epochs}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
            f"({epoch_time:.1f}s + eval {eval_time:.1f}s)")

  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if c.plot and history:
    plot_curves(history, os.path.join(c.out_dir, "curves.png"),
                f"{c.dataset} {c.model} {c.optimizer}")
  return TrainResult(history, params, batch_stats, opt_state, c)


def run(config: Config) -> dict[str, Any]:
  """Trains as :func:`train` does and returns the final epoch's metrics (a dict)."""
  result = train(config)
  return dict(result.history[-1]) if result.history else {}


# ---------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser (``--help`` lists every flag with its default)."""
  p = argparse.ArgumentParser(
      prog="python -m examples.cifar.train",
      description=__doc__.split("Reusable pieces")[0].rstrip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("run")
  g.add_argument("--quick", action="store_true",
                 help="small CPU-sized run: tiny_cnn, 4 epochs, batch 64, a synthetic dataset "
                 "(2048/512 images) or, with --data-dir, the first 5000/1000 real images")
  g.add_argument("--optimizer", choices=OPTIMIZERS, default="amp",
                 help="erm: plain SGD; amp: adversarial model perturbation; sam: "
                 "sharpness-aware minimisation (default: amp)")
  g.add_argument("--model", default=None,
                 help=f"one of {models.model_names()} or wrn{{depth}}_{{width}} "
                 "(default: preactresnet18; tiny_cnn with --quick)")
  g.add_argument("--dataset", choices=sorted(cifar_data.NUM_CLASSES), default="cifar10")
  g.add_argument("--data-dir", default=None,
                 help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the official "
                 "'python version'), or that folder itself; optional with --quick")
  g.add_argument("--train-size", type=int, default=None,
                 help="use only the first N training images (default: all)")
  g.add_argument("--test-size", type=int, default=None,
                 help="use only the first N test images (default: all)")
  g.add_argument("--seed", type=int, default=0, help="seeds init, shuffling, augmentation")
  g.add_argument("--out-dir", default=None,
                 help="where metrics.jsonl, curves.png, config.json and checkpoints/ go "
                 "(default: runs/cifar/DATASET-MODEL-OPTIMIZER-sSEED)")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --out-dir from its last checkpoint")
  g.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
  g.add_argument("--stop-after", type=int, default=None,
                 help="stop after this many epochs in total (the schedule still spans "
                 "--epochs); continue later with --resume")
  g.add_argument("--num-devices", type=int, default=None,
                 help="data-parallel over the first N local devices (default: all)")
  g.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")

  g = p.add_argument_group("training recipe (defaults: the AMP paper's)")
  g.add_argument("--epochs", type=int, default=None, help="default: 200 (4 with --quick)")
  g.add_argument("--batch-size", type=int, default=None, help="default: 50 (64 with --quick)")
  g.add_argument("--lr", type=float, default=0.1,
                 help="initial learning rate, x0.1 at 50%% and 75%% of the epochs (default: 0.1)")
  g.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (default: 0.9)")
  g.add_argument("--weight-decay", type=float, default=5e-4,
                 help="decoupled from the ascent (default: 5e-4)")
  g.add_argument("--no-augment", action="store_true", help="no random crop and flip")
  g.add_argument("--cutout", type=int, default=0,
                 help="Cutout square side, 0 for none (authors: 16 on CIFAR-10, 8 on CIFAR-100)")
  g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                 help="computation dtype of the model (parameters stay float32)")

  g = p.add_argument_group("AMP")
  g.add_argument("--epsilon", type=float, default=0.5,
                 help="radius of the perturbation ball (default: 0.5)")
  g.add_argument("--inner-lr", type=float, default=1.0,
                 help="step size of the inner ascent (default: 1)")
  g.add_argument("--inner-steps", type=int, default=1,
                 help="number K of ascent steps; a step costs 1 + K gradients (default: 1)")
  g.add_argument("--norm", choices=NORMS, default="per_tensor",
                 help="per_tensor: a ball per parameter array (authors' code); global: one "
                 "ball over all parameters (default: per_tensor)")

  g = p.add_argument_group("SAM")
  g.add_argument("--rho", type=float, default=0.05, help="SAM radius (default: 0.05)")
  return p


def config_from_args(args: argparse.Namespace) -> Config:
  """Turns parsed flags into a :class:`Config`."""
  return Config(
      optimizer=args.optimizer, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
      weight_decay=args.weight_decay, epsilon=args.epsilon, inner_lr=args.inner_lr,
      inner_steps=args.inner_steps, norm=args.norm, rho=args.rho, augment=not args.no_augment,
      cutout=args.cutout, train_size=args.train_size, test_size=args.test_size,
      dtype=args.dtype, seed=args.seed, out_dir=args.out_dir, resume=args.resume,
      overwrite=args.overwrite, stop_after=args.stop_after, num_devices=args.num_devices,
      quick=args.quick, checkpoint=not args.no_checkpoint, progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the final metrics."""
  args = build_parser().parse_args(argv)
  config = config_from_args(args)
  try:
    metrics = run(config)
  except (cifar_data.CifarFormatError, FileExistsError, ConfigError) as e:
    if argv is not None:
      raise
    sys.exit(f"error: {e}")
  if metrics:
    print(f"final: test acc {100 * metrics['test_acc']:.2f}%  test loss "
          f"{metrics['test_loss']:.4f}  train acc {100 * metrics['train_acc']:.2f}%")
  return metrics


if __name__ == "__main__":
  main()
