"""Flax's Linen MNIST example (TrainState, split jits) on the bundled digits, with ERM or AMP.

    python -m examples.flax_mnist_style.train_linen                   # AMP
    python -m examples.flax_mnist_style.train_linen --optimizer erm
    python -m examples.flax_mnist_style.train_linen --optimizer drop-in  # the step unchanged
    python examples/flax_mnist_style/train_linen.py --epsilon 0.05 --inner-steps 2

The shape of Flax's Linen MNIST example: ``apply_model`` (jitted) computes
the gradients, ``update_model`` (jitted) applies them, with BatchNorm and
Dropout added as users do (a ``TrainState`` with ``batch_stats``). A
``grad_fn`` cannot cross from one jit to the other, so with AMP
``update_model`` takes the batch and the dropout key and
``flax_linen.apply_amp_gradients`` builds it there (lines marked ``# AMP``).

``--optimizer drop-in`` runs AMP with Flax's code as it is (Flax's own ``TrainState``, the ERM
``update_model``, no ``grad_fn``): the only change is the optimiser line,
``tx = amp_optax.drop_in_amp(tx, epsilon=...)`` (``# DROP-IN``), and evaluation reads
``amp_optax.unperturbed_params`` (between calls the state holds perturbed parameters). One AMP
step then takes ``inner_steps + 1`` calls of the step (see the drop-in guide). It writes no files.
"""

import argparse
from pathlib import Path
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a file: make `examples` and `amp_optax` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flax import linen as nn  # noqa: E402
from flax.training import train_state  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import amp_optax  # noqa: E402
from amp_optax import flax_linen  # noqa: E402
from examples.flax_mnist_style.data import batches  # noqa: E402
from examples.flax_mnist_style.data import get_datasets  # noqa: E402


class CNN(nn.Module):
  """Flax's MNIST CNN, sized for 8x8 digits, with BatchNorm and Dropout."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=32, kernel_size=(3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(features=64)(x)))
    return nn.Dense(features=10)(x)


class FlaxTrainState(train_state.TrainState):  # Flax's own: ERM and drop-in
  batch_stats: Any


class TrainState(flax_linen.TrainState):  # AMP: was flax.training.train_state.TrainState
  batch_stats: Any


def loss_fn(params, batch_stats, batch, rng):
  logits, updates = CNN().apply(
      {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
      mutable=["batch_stats"], rngs={"dropout": rng})
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, (logits, updates)


@jax.jit
def apply_model(state, batch, rng):
  """Computes gradients, loss and accuracy for a single batch."""
  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, batch, rng)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
  return grads, updates, loss, accuracy


@jax.jit
def update_model(state, grads, updates):
  """Flax's update: ERM, and drop-in AMP (unchanged)."""
  return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])


@jax.jit
def amp_update_model(state, grads, updates, batch, rng):  # AMP: also the batch and rng
  return flax_linen.apply_amp_gradients(  # AMP
      state, grads=grads, loss_fn=loss_fn, batch=batch, rng=rng, has_aux=True,
      batch_stats=updates["batch_stats"])


def eval_params(state):
  """The parameters to evaluate: with drop-in AMP, the unperturbed ones."""
  if isinstance(state.opt_state, amp_optax.DropInAmpState):  # DROP-IN
    return amp_optax.unperturbed_params(state.params, state.opt_state)
  return state.params


@jax.jit
def eval_model(state, batch):
  logits = CNN().apply({"params": eval_params(state), "batch_stats": state.batch_stats},
                       batch["image"], train=False)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--optimizer", choices=("erm", "amp", "drop-in"), default="amp")
  parser.add_argument("--epsilon", type=float, default=0.05,
                      help="AMP's ball radius (per tensor)")
  parser.add_argument("--inner-lr", type=float, default=1.0)
  parser.add_argument("--inner-steps", type=int, default=1)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--learning-rate", type=float, default=0.05)
  parser.add_argument("--momentum", type=float, default=0.9)
  parser.add_argument("--train-size", type=int, default=None,
                      help="first N training images (default: all 1437)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def create_train_state(rng, args) -> TrainState:
  variables = CNN().init(rng, jnp.ones([1, 8, 8, 1]), train=False)
  tx = optax.sgd(args.learning_rate, args.momentum)
  if args.optimizer == "drop-in":  # DROP-IN: the one line; the step stays Flax's own.
    tx = amp_optax.drop_in_amp(tx, epsilon=args.epsilon, inner_lr=args.inner_lr,
                               inner_steps=args.inner_steps)
  if args.optimizer == "amp":  # AMP: first in the chain
    tx = optax.chain(amp_optax.amp(args.epsilon, inner_lr=args.inner_lr,
                                   inner_steps=args.inner_steps), tx)
  state_class = TrainState if args.optimizer == "amp" else FlaxTrainState
  return state_class.create(apply_fn=CNN().apply, params=variables["params"],
                            batch_stats=variables["batch_stats"], tx=tx)


def main(argv=None) -> list[dict[str, float]]:
  """Trains and evaluates; prints one line per epoch and returns those metrics."""
  args = parse_args(argv)
  train_ds, test_ds = get_datasets(args.train_size, seed=args.seed)
  rng, init_rng = jax.random.split(jax.random.key(args.seed))
  state = create_train_state(init_rng, args)
  shuffle = np.random.default_rng(args.seed)

  history = []
  start = time.perf_counter()
  for epoch in range(1, args.epochs + 1):
    losses, accuracies = [], []
    for batch in batches(train_ds, args.batch_size, shuffle):
      rng, dropout_rng = jax.random.split(rng)
      grads, updates, loss, accuracy = apply_model(state, batch, dropout_rng)
      if args.optimizer == "amp":
        state = amp_update_model(state, grads, updates, batch, dropout_rng)  # AMP
      else:  # ERM, and drop-in AMP: Flax's step as it is
        state = update_model(state, grads, updates)
      losses.append(loss)
      accuracies.append(accuracy)
    test_loss, test_accuracy = eval_model(state, test_ds)
    row = {"train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accuracies)),
           "test_loss": float(test_loss), "test_accuracy": float(test_accuracy)}
    history.append(row)
    print(f"{args.optimizer} epoch {epoch:2d}: train_loss {row['train_loss']:.4f} "
          f"train_accuracy {100 * row['train_accuracy']:.2f} test_loss {row['test_loss']:.4f} "
          f"test_accuracy {100 * row['test_accuracy']:.2f}", flush=True)
  print(f"{args.optimizer}: {args.epochs} epochs in {time.perf_counter() - start:.1f} s on "
        f"{jax.default_backend()}; no files written.")
  return history


if __name__ == "__main__":
  main()
