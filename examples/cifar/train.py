"""The CIFAR training step and loop: ERM, AMP or SAM (JAX, Flax Linen, Optax).

Run it from the repository root, as a script or as a module (the command line is in
:mod:`examples.cifar.main`; ``--help`` lists every flag)::

    python examples/cifar/train.py --quick            # under a minute on CPU, synthetic data
    python -m examples.cifar.train --data-dir DATA    # the paper's recipe

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

With several processes (``jax.distributed``, see :mod:`examples.cifar.main`) the mesh spans
every process's devices. Each process keeps the dataset on the host and sends only its rows of
each batch to its devices (:func:`global_batch`); the batches (the same permutation) and
their augmentation (the same keys, drawn inside the jitted step, whose random numbers do not
depend on how the batch is split) are those of a single-process run, which the results match
up to float rounding. Metrics come out of the jitted step already reduced over all devices.
Process 0 prints and writes the run directory's files; the Orbax checkpoints are saved and
restored by all processes together.

The example is split as Flax's ``examples/imagenet``: :mod:`examples.cifar.config` (settings),
:mod:`examples.cifar.main` (command line), this module (step and loop),
:mod:`examples.cifar.run_dir` (what a run writes), :mod:`examples.cifar.models` and
:mod:`examples.cifar.data`.

Reusable pieces (for benchmarks): :func:`make_optimizer`, :func:`make_lr_schedule`,
:func:`init_train_state`, :func:`make_train_step`, :func:`make_eval_step`,
:func:`make_data_mesh`, :func:`train`.
"""

from collections.abc import Callable
from collections.abc import Sequence
import math
import os
import sys
import time
from typing import Any
from typing import NamedTuple

if __name__ == "__main__" and not __package__:
  # Run as a script (python examples/cifar/train.py): put the repository root on the path, as
  # `python -m examples.cifar.train` does, so that `examples.cifar` can be imported.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import amp_optax
from examples.cifar import data as cifar_data
from examples.cifar import models
from examples.cifar import run_dir
from examples.cifar.config import NORMS  # noqa: F401  (re-exported)
from examples.cifar.config import OPTIMIZERS
from examples.cifar.config import Config
from examples.cifar.config import ConfigError
from examples.cifar.run_dir import plot_curves  # noqa: F401  (re-exported)

Batch = tuple[jax.Array, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[Any, Any, Any, Batch, jax.Array], tuple[Any, Any, Any, Metrics]]

DATA_AXIS = "batch"


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

  With several processes (``jax.distributed``) the mesh is global: the first ``num_devices``
  local devices of every process, ordered by process, so that each process holds one contiguous
  block of every batch (the rows it feeds, see :func:`local_rows`).

  The axis is of type ``Auto`` (sharding propagated by the compiler), which ``jax.jit`` data
  parallelism relies on; newer JAX makes ``Explicit`` the default, so it is asked for here.
  """
  devices = jax.local_devices()
  n = len(devices) if num_devices is None else num_devices
  if not 1 <= n <= len(devices):
    raise ValueError(f"num_devices must be in 1..{len(devices)}, got {n}")
  axis_type = getattr(jax.sharding, "AxisType", None)
  kwargs = {"axis_types": (axis_type.Auto,)} if axis_type is not None else {}
  if jax.process_count() == 1:
    return jax.make_mesh((n,), (DATA_AXIS,), devices=devices[:n], **kwargs)
  # Not jax.make_mesh: on TPU it may order devices by the physical topology, interleaving
  # processes along the batch axis.
  by_process: dict[int, list[Any]] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  if any(len(ds) < n for ds in by_process.values()):
    raise ValueError(f"num_devices {n} is more than a process's devices: "
                     f"{ {p: len(ds) for p, ds in by_process.items()} }")
  grid = np.array([d for p in sorted(by_process) for d in by_process[p][:n]])
  return jax.sharding.Mesh(grid, (DATA_AXIS,), **kwargs)


def local_rows(sharding: jax.sharding.Sharding, global_size: int) -> slice:
  """The rows of a global batch of ``global_size`` that this process's devices hold.

  Each process feeds (loads, and augments inside the step) only these rows; with one process
  they are all rows.

  Raises:
    ValueError: if the rows are not one contiguous block (a mesh not ordered by process).
  """
  index_map = sharding.devices_indices_map((global_size,))
  blocks = sorted({index_map[d][0].indices(global_size)[:2] for d in sharding.addressable_devices})
  for (_, stop), (start, _) in zip(blocks, blocks[1:]):
    if stop != start:
      raise ValueError(f"process {jax.process_index()} holds rows {blocks} of the batch, not one "
                       "block; order the mesh's devices by process (see make_data_mesh).")
  return slice(blocks[0][0], blocks[-1][1])


def global_batch(sharding: jax.sharding.Sharding, indices: np.ndarray,
                 *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Global arrays ``a[indices]`` for each host array ``a``, split over ``sharding``.

  Every process passes the same ``indices`` (one global batch) and its own copy of the
  ``arrays``; it reads only the rows :func:`local_rows` gives it and sends them to its devices
  (``jax.make_array_from_process_local_data``). With one process that is the whole batch.
  """
  local = indices[local_rows(sharding, len(indices))]
  return tuple(jax.make_array_from_process_local_data(sharding, a[local],
                                                      (len(indices), *a.shape[1:]))
               for a in arrays)


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
  if c.verbose and jax.process_index() == 0:
    print(msg, flush=True)


def _sync(name: str) -> None:
  """With several processes: wait until all reach this point (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _to_host(tree: Any) -> Any:
  """Replicated (global) arrays as numpy: every process holds a whole copy."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def _replicated(tree: Any, sharding: NamedSharding) -> Any:
  """Host values (the same on every process) as arrays replicated over the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def train(config: Config) -> TrainResult:
  """Runs (or resumes) training as ``config`` says; writes metrics, plot and checkpoints.

  The outputs go to the run directory ``config.out_dir`` (see :mod:`examples.cifar.run_dir`);
  with ``config.verbose`` its absolute path is printed when the run starts and, with the list
  of what was written there, when it ends.

  With several processes (``jax.distributed.initialize`` called before, as
  :mod:`examples.cifar.main` does), every process calls this with the same ``config``: the mesh
  spans all processes' devices and ``batch_size`` is the global batch. Each process feeds
  only its rows of every batch (:func:`global_batch`); metrics are global (the jitted step
  reduces them over the mesh); only process 0 prints and writes ``config.json``,
  ``metrics.jsonl`` and ``curves.png``, while all write and restore the Orbax checkpoints
  together (the run directory must be on a file system all processes share).

  Returns:
    A :class:`TrainResult`; ``history[-1]`` holds the final metrics.
  """
  c = config.resolved()
  run_dir.check_out_dir(c)
  ds = _load_data(c)
  mesh = make_data_mesh(c.num_devices)
  n_dev = mesh.devices.size
  n_proc = jax.process_count()
  multi = n_proc > 1
  main_process = jax.process_index() == 0
  if c.batch_size % n_dev:
    raise ConfigError(f"batch size {c.batch_size} is not divisible by the {n_dev} devices; "
                      "change --batch-size or --num-devices.")
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(DATA_AXIS))
  n_train, n_test = len(ds.train_labels), len(ds.test_labels)
  steps_per_epoch = n_train // c.batch_size
  if steps_per_epoch == 0:
    raise ConfigError(f"{n_train} training images make no batch of {c.batch_size}.")
  _sync("cifar:checked")  # every process checked the run directory before it changes
  if main_process:
    run_dir.prepare_out_dir(c)
  _sync("cifar:prepared")
  out_dir = os.path.abspath(c.out_dir)
  _log(c, f"run directory: {out_dir}")
  mean, std = cifar_data.MEAN[c.dataset], cifar_data.STD[c.dataset]
  where = f" in {n_proc} processes" if multi else ""
  _log(c, f"{c.dataset}{' (synthetic)' if c.data_dir is None else ''}: {n_train} train, "
          f"{n_test} test images; {c.model}, {c.optimizer}, {c.epochs} epochs of "
          f"{steps_per_epoch} steps, batch {c.batch_size} on {n_dev} {jax.default_backend()} "
          f"device(s){where}")

  model = models.get_model(c.model, ds.num_classes, dtype=jnp.dtype(c.dtype))
  schedule = make_lr_schedule(c.lr, c.epochs, steps_per_epoch)
  tx = make_optimizer(c.optimizer, schedule, momentum=c.momentum, weight_decay=c.weight_decay,
                      epsilon=c.epsilon, inner_lr=c.inner_lr, inner_steps=c.inner_steps,
                      norm=c.norm, rho=c.rho)

  root_key = jax.random.key(c.seed)
  params, batch_stats, opt_state = init_train_state(
      model, tx, jax.random.fold_in(root_key, 0), ds.train_images.shape[1:], replicated)

  eval_bs = min(c.eval_batch_size, n_test)
  eval_bs = -(-eval_bs // n_dev) * n_dev
  n_eval_batches = -(-n_test // eval_bs)
  pad = n_eval_batches * eval_bs - n_test
  test_images = np.pad(ds.test_images, ((0, pad), (0, 0), (0, 0), (0, 0)))
  test_labels = np.pad(ds.test_labels, (0, pad))
  test_weights = np.pad(np.ones(n_test, np.float32), (0, pad))

  train_step = make_train_step(model, tx, mean=mean, std=std, augment=c.augment,
                               cutout_size=c.cutout, data_sharding=sharded)
  eval_step = make_eval_step(model, mean=mean, std=std, data_sharding=sharded)

  def batch_step(params, batch_stats, opt_state, totals, images, labels, index, key):
    params, batch_stats, opt_state, metrics = train_step(
        params, batch_stats, opt_state, (images, labels), jax.random.fold_in(key, index))
    totals = jax.tree.map(jnp.add, totals, metrics)
    return params, batch_stats, opt_state, totals

  def epoch_step(params, batch_stats, opt_state, totals, images, labels, perm, index, key):
    idx = jax.lax.dynamic_slice_in_dim(perm, index * c.batch_size, c.batch_size)
    images, labels = jax.lax.with_sharding_constraint((images[idx], labels[idx]), sharded)
    return batch_step(params, batch_stats, opt_state, totals, images, labels, index, key)

  def eval_chunk(params, batch_stats, images, labels, weights, index):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, index * eval_bs, eval_bs)
    return eval_step(params, batch_stats, sl(images), sl(labels), sl(weights))

  jit_perm = jax.jit(lambda k: jax.random.permutation(k, n_train), out_shardings=replicated)
  if multi:
    # Each process keeps the dataset on the host and sends only its rows of each batch; the
    # batch (indices from the same permutation) and its augmentation (the same key, threefry
    # being partitionable) are those of a single-process run.
    jit_step = jax.jit(batch_step, donate_argnums=(0, 1, 2, 3), out_shardings=replicated)
    jit_eval = jax.jit(eval_step, out_shardings=replicated)
  else:
    # The data, once, on every device; batches are gathered from it inside the step.
    train_x = jax.device_put(ds.train_images, replicated)
    train_y = jax.device_put(ds.train_labels, replicated)
    test_x = jax.device_put(test_images, replicated)
    test_y = jax.device_put(test_labels, replicated)
    test_w = jax.device_put(test_weights, replicated)
    jit_step = jax.jit(epoch_step, donate_argnums=(0, 1, 2, 3), out_shardings=replicated)
    jit_eval = jax.jit(eval_chunk, out_shardings=replicated)

  # Resume.
  start_epoch = 0
  manager = run_dir.checkpoint_manager(c) if c.checkpoint else None
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
  history = run_dir.read_history(metrics_path, start_epoch)
  if main_process:
    run_dir.write_history(metrics_path, history)

  # Compile ahead of time, so that epoch times are pure run time.
  t0 = time.perf_counter()
  step_key = jax.random.fold_in(root_key, 2)
  image_shape = ds.train_images.shape[1:]
  metric_shapes = jax.eval_shape(
      train_step, params, batch_stats, opt_state,
      (jax.ShapeDtypeStruct((c.batch_size, *image_shape), jnp.uint8),
       jax.ShapeDtypeStruct((c.batch_size,), jnp.int32)), step_key)[3]
  zero_totals = lambda: _replicated(
      jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), metric_shapes), replicated)
  if multi:
    batch_spec = lambda n, dtype, shape=(): jax.ShapeDtypeStruct((n, *shape), dtype,
                                                                 sharding=sharded)
    compiled_step = jit_step.lower(
        params, batch_stats, opt_state, zero_totals(),
        batch_spec(c.batch_size, jnp.uint8, image_shape), batch_spec(c.batch_size, jnp.int32),
        0, step_key).compile()
    compiled_eval = jit_eval.lower(
        params, batch_stats, batch_spec(eval_bs, jnp.uint8, image_shape),
        batch_spec(eval_bs, jnp.int32), batch_spec(eval_bs, jnp.float32)).compile()
  else:
    perm0 = jit_perm(jax.random.fold_in(root_key, 1))
    compiled_step = jit_step.lower(params, batch_stats, opt_state, zero_totals(), train_x,
                                   train_y, perm0, 0, step_key).compile()
    compiled_eval = jit_eval.lower(params, batch_stats, test_x, test_y, test_w, 0).compile()
  compile_time = time.perf_counter() - t0

  last_epoch = c.epochs if c.stop_after is None else min(c.epochs, c.stop_after)
  from tqdm.auto import tqdm

  for epoch in range(start_epoch, last_epoch):
    epoch_key = jax.random.fold_in(step_key, epoch)
    perm = jit_perm(jax.random.fold_in(jax.random.fold_in(root_key, 1), epoch))
    if multi:
      perm = _to_host(perm)
    totals = zero_totals()
    t0 = time.perf_counter()
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{c.epochs}",
               disable=None if c.progress and main_process else True, leave=False,
               dynamic_ncols=True)
    refresh = max(1, steps_per_epoch // 20)
    for i in bar:
      if multi:
        images, labels = global_batch(sharded, perm[i * c.batch_size:(i + 1) * c.batch_size],
                                      ds.train_images, ds.train_labels)
        params, batch_stats, opt_state, totals = compiled_step(
            params, batch_stats, opt_state, totals, images, labels, i, epoch_key)
      else:
        params, batch_stats, opt_state, totals = compiled_step(
            params, batch_stats, opt_state, totals, train_x, train_y, perm, i, epoch_key)
      if c.progress and main_process and (i + 1) % refresh == 0:
        done = _to_host(totals)
        bar.set_postfix(loss=f"{done['loss'] / (i + 1):.3f}",
                        acc=f"{100 * done['accuracy'] / (i + 1):.1f}%")
    totals = _to_host(totals)
    epoch_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    if multi:
      sums = [compiled_eval(params, batch_stats, *global_batch(
          sharded, np.arange(j * eval_bs, (j + 1) * eval_bs), test_images, test_labels,
          test_weights)) for j in range(n_eval_batches)]
    else:
      sums = [compiled_eval(params, batch_stats, test_x, test_y, test_w, j)
              for j in range(n_eval_batches)]
    loss_sum, correct_sum = np.sum(np.asarray(_to_host(sums), np.float64), axis=0)
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
    if main_process:
      run_dir.write_history(metrics_path, history)
    if manager is not None:
      import orbax.checkpoint as ocp

      # Every process saves: each writes the shards its devices hold.
      manager.save(epoch + 1, args=ocp.args.StandardSave(
          {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}))
    _log(c, f"epoch {epoch + 1:4d}/{c.epochs}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  "
            f"test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:.2f}%  "
            f"({epoch_time:.1f}s + eval {eval_time:.1f}s)")

  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if c.plot and history and main_process:
    run_dir.plot_curves(history, os.path.join(c.out_dir, "curves.png"),
                        f"{c.dataset} {c.model} {c.optimizer}")
  _log(c, f"wrote {', '.join(run_dir.written_outputs(out_dir))} in run directory {out_dir}")
  return TrainResult(history, params, batch_stats, opt_state, c)


def run(config: Config) -> dict[str, Any]:
  """Trains as :func:`train` does and returns the final epoch's metrics (a dict)."""
  result = train(config)
  return dict(result.history[-1]) if result.history else {}


if __name__ == "__main__":
  from examples.cifar.main import main

  main()
