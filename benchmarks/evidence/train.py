"""One training run: the optimiser of a row, its jitted step, the epoch loop and evaluation."""

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amp_optax
from benchmarks.evidence import model
from benchmarks.evidence.presets import SAM_INNER_LR
from benchmarks.evidence.presets import Preset
from benchmarks.evidence.presets import Row


def make_tx(row: Row, p: Preset, total_steps: int, grouped: bool) -> optax.GradientTransformation:
  """SGD (Nesterov 0.9, cosine decay) with decoupled weight decay after the ascent, so the decay
  sees theta, not theta + Delta; AMP or SAM first in the chain (both global-norm balls)."""
  base = optax.chain(optax.add_decayed_weights(p.weight_decay),
                     optax.sgd(optax.cosine_decay_schedule(p.lr, total_steps), momentum=0.9,
                               nesterov=True))
  if row.method == "erm":
    return base
  inner_lr = SAM_INNER_LR if row.method == "sam" else 1.0
  if grouped:
    ascent = amp_optax.grouped_amp(row.radius, num_groups=row.groups, inner_lr=inner_lr,
                                   norm="global")
  else:
    ascent = amp_optax.amp(row.radius, inner_lr=inner_lr, norm="global")
  return optax.chain(ascent, base)


def _loss(params, x, y):
  logits, batch_stats = model.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), batch_stats


# How the groups' batch statistics become one update of the running statistics, each kept
# beside the others in every run (running statistics do not feed back into training, so one run
# evaluates them all, paired): "groups_mean" is the helpers' policy (the mean over groups of each
# group's mean and biased variance); "unbiased" scales that variance by m / (m - 1); and
# "whole_batch" adds the variance of the group means, which gives the whole batch's biased
# variance, as a BatchNorm over the ungrouped batch would.
POLICIES = ("groups_mean", "unbiased", "whole_batch")


def _batch_statistic(policy: str, mean: jax.Array, var: jax.Array, m: int):
  """One layer's (mean, variance) from per-group ``mean`` and ``var`` (leading group axis)."""
  v = jnp.mean(var, 0)
  if policy == "unbiased":
    v = v * m / (m - 1)
  elif policy == "whole_batch":
    v = v + jnp.var(mean, 0)
  return jnp.mean(mean, 0), v


def update_running(running: dict[str, model.Stats], group_stats: model.Stats, m: int,
                   momentum: float) -> dict[str, model.Stats]:
  """Every policy's running statistics after one step; ``group_stats`` per layer, stacked on a
  leading group axis (size 1 for an ungrouped step)."""
  out = {}
  for policy, layers in running.items():
    new = []
    for r, s in zip(layers, group_stats, strict=True):
      mean, var = _batch_statistic(policy, s["mean"], s["var"], m)
      new.append({"mean": momentum * r["mean"] + (1 - momentum) * mean,
                  "var": momentum * r["var"] + (1 - momentum) * var})
    out[policy] = new
  return out


@functools.cache
def make_step(row: Row, p: Preset, total_steps: int, grouped: bool | None = None):
  """``(tx, step)``; ``step(params, opt_state, x_all, y_all, idx) -> (params, opt_state, loss)``
  on the batch ``idx`` of the device-resident training set. ``grouped`` (default: G > 1) takes
  the grouped path (``grouped_value_and_grad`` + ``grouped_amp``), also at G = 1. Cached: a
  row compiles once per process, for every seed and every :class:`Trainer`."""
  grouped = row.groups > 1 if grouped is None else grouped
  if row.method == "erm" and row.groups > 1:
    raise ValueError("ERM has no groups: for ERM with each group's own BatchNorm statistics "
                     "(ghost BatchNorm) use Row('amp', 0.0, G)")
  tx = make_tx(row, p, total_steps, grouped)

  def step(params, opt_state, running, x_all, y_all, idx):
    x, y = x_all[idx], y_all[idx]
    if grouped:
      gx, gy = amp_optax.group_batch((x, y), row.groups)
      (losses, stats), grads, grad_fn = amp_optax.grouped_value_and_grad(
          _loss, has_aux=True)(params, gx, gy)
      loss = jnp.mean(losses)
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    else:
      (loss, stats), grads = jax.value_and_grad(_loss, has_aux=True)(params, x, y)
      stats = jax.tree.map(lambda s: s[None], stats)  # one group
      extra = {} if row.method == "erm" else {
          "grad_fn": lambda q, _: jax.grad(_loss, has_aux=True)(q, x, y)[0]}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
    running = update_running(running, stats, p.batch_size // row.groups, p.bn_momentum)
    return optax.apply_updates(params, updates), opt_state, running, loss

  return tx, jax.jit(step, donate_argnums=(0, 1, 2))


@jax.jit
def _eval(params, running, x, y):
  logits, _ = model.apply(params, x, running)
  return (jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)),
          jnp.sum(jnp.argmax(logits, -1) == y))


def evaluate(params, x: np.ndarray, y: np.ndarray, running: model.Stats | None = None,
             chunk: int = 2000) -> tuple[float, float]:
  """(accuracy, mean loss) over all of ``x``, in chunks (one compiled shape but the last);
  BatchNorm layers normalise with ``running``."""
  loss = correct = 0.0
  for i in range(0, len(x), chunk):
    chunk_loss, chunk_correct = _eval(params, running, x[i:i + chunk], y[i:i + chunk])
    loss, correct = loss + float(chunk_loss), correct + float(chunk_correct)
  return correct / len(x), loss / len(x)


def init_params(p: Preset, seed: int, dim: int):
  return model.init(jax.random.key(seed), (dim, *p.hidden, 10), p.batchnorm)


def batch_order(p: Preset, seed: int) -> np.ndarray:
  """``(epochs, steps_per_epoch, B)`` indices from ``seed`` alone: every row of a seed sees the
  same batches in the same order (the last partial batch of each epoch dropped)."""
  rng = np.random.default_rng(seed)
  per_epoch = p.train_size // p.batch_size
  return np.stack([rng.permutation(p.train_size)[:per_epoch * p.batch_size].reshape(
      per_epoch, p.batch_size) for _ in range(p.epochs)]).astype(np.int32)


class Trainer:
  """A preset's training set on the device, and its runs."""

  def __init__(self, p: Preset, data: dict[str, np.ndarray]):
    self.p, self.data = p, data
    self.x_all = jnp.asarray(data["train_x"])
    self.y_all = jnp.asarray(data["train_y"])
    self.total_steps = p.epochs * (p.train_size // p.batch_size)

  def run(self, row: Row, seed: int, grouped: bool | None = None) -> dict[str, Any]:
    """Trains ``row`` from ``seed``'s initialisation and batch order; the record of the run."""
    t0 = time.time()
    tx, step = make_step(row, self.p, self.total_steps, grouped)
    params = init_params(self.p, seed, self.x_all.shape[1])
    opt_state = tx.init(params)
    running = {policy: model.init_stats(params) for policy in POLICIES}
    losses = []
    for epoch in batch_order(self.p, seed):
      for idx in epoch:
        params, opt_state, running, loss = step(params, opt_state, running, self.x_all,
                                                self.y_all, idx)
      losses.append(float(loss))
    d = self.data
    record = {"row": row.as_dict(), "label": row.label, "seed": seed}
    # Without BatchNorm every policy's statistics are empty and the accuracies are one; with
    # it, the headline fields are the helpers' policy, the others under "bn_policies".
    by_policy = {}
    for policy in POLICIES if self.p.batchnorm else POLICIES[:1]:
      acc = {}
      for split in ("train", "val", "test"):
        acc[f"{split}_acc"], acc[f"{split}_loss"] = evaluate(
            params, d[f"{split}_x"], d[f"{split}_y"], running[policy])
      by_policy[policy] = acc
    record |= by_policy[POLICIES[0]]
    if self.p.batchnorm:
      record["bn_policies"] = {k: {key: v[key] for key in ("val_acc", "test_acc", "test_loss")}
                               for k, v in by_policy.items()}
    return record | {"test_images": len(d["test_y"]), "last_batch_loss_per_epoch": losses,
                     "wall_s": time.time() - t0}
