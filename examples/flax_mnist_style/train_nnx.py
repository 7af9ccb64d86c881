"""Flax's NNX MNIST example on the bundled digits, with ERM or AMP.

    python -m examples.flax_mnist_style.train_nnx                     # AMP, ~20 s on CPU
    python -m examples.flax_mnist_style.train_nnx --optimizer erm
    python examples/flax_mnist_style/train_nnx.py --epsilon 0.05 --inner-steps 2 --epochs 10

The shape of Flax's NNX MNIST example and tutorial: a CNN with BatchNorm and
Dropout whose ``nnx.Rngs`` is passed in (``loss_fn(model, batch, rngs)``),
``nnx.Optimizer`` with SGD and momentum, ``nnx.MultiMetric`` updated in the
step, ``model.train()`` / ``model.eval()``. AMP is two changes to Flax's
step (marked ``# AMP``): ``amp_optax.amp`` first in the optimiser's chain,
and ``grad_fn=amp_grad_fn`` in ``optimizer.update``, built by
``flax_nnx.make_grad_fn`` from the step's own arguments before the clean pass
(named ``amp_grad_fn``: Flax's steps use ``grad_fn`` for
``nnx.value_and_grad``). It writes no files.
"""

import argparse
from pathlib import Path
import sys
import time

if __package__ in (None, ""):  # run as a file: make `examples` and `amp_optax` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import amp_optax  # noqa: E402
from amp_optax import flax_nnx  # noqa: E402
from examples.flax_mnist_style.data import batches  # noqa: E402
from examples.flax_mnist_style.data import get_datasets  # noqa: E402


class CNN(nnx.Module):
  """Flax's tutorial CNN, sized for 8x8 digits."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(16, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.05)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(32, rngs=rngs)
    self.linear1 = nnx.Linear(2 * 2 * 32, 64, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.2)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs)))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nnx.relu(self.batch_norm2(self.conv2(x)))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout2(nnx.relu(self.linear1(x)), rngs=rngs)
    return self.linear2(x)


def loss_fn(model: CNN, batch, rngs: nnx.Rngs | None = None):
  logits = model(batch["image"], rngs)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, logits


@nnx.jit
def train_step(model, optimizer, metrics, rngs, batch):
  """Flax's step, ERM."""
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


@nnx.jit
def amp_train_step(model, optimizer, metrics, rngs, batch):
  """Flax's step with AMP: the same, plus one line and one argument."""
  amp_grad_fn = flax_nnx.make_grad_fn(model, loss_fn, batch, rngs, has_aux=True)  # AMP
  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, rngs)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads, grad_fn=amp_grad_fn)  # AMP: grad_fn=


@nnx.jit
def eval_step(model, metrics, batch):
  loss, logits = loss_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])


def make_tx(args) -> optax.GradientTransformation:
  tx = optax.sgd(args.learning_rate, args.momentum)
  if args.optimizer == "amp":  # AMP: first in the chain
    tx = optax.chain(amp_optax.amp(args.epsilon, inner_lr=args.inner_lr,
                                   inner_steps=args.inner_steps), tx)
  return tx


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--optimizer", choices=("erm", "amp"), default="amp")
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


def main(argv=None) -> list[dict[str, float]]:
  """Trains and evaluates; prints one line per epoch and returns those metrics."""
  args = parse_args(argv)
  train_ds, test_ds = get_datasets(args.train_size, seed=args.seed)
  rngs = nnx.Rngs(args.seed)
  model = CNN(rngs=rngs)
  optimizer = nnx.Optimizer(model, make_tx(args), wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  step = amp_train_step if args.optimizer == "amp" else train_step
  shuffle = np.random.default_rng(args.seed)

  history = []
  start = time.perf_counter()
  for epoch in range(1, args.epochs + 1):
    model.train()
    for batch in batches(train_ds, args.batch_size, shuffle):
      step(model, optimizer, metrics, rngs, batch)
    row = {f"train_{k}": float(v) for k, v in metrics.compute().items()}
    metrics.reset()
    model.eval()
    eval_step(model, metrics, test_ds)
    row.update({f"test_{k}": float(v) for k, v in metrics.compute().items()})
    metrics.reset()
    history.append(row)
    print(f"{args.optimizer} epoch {epoch:2d}: train_loss {row['train_loss']:.4f} "
          f"train_accuracy {100 * row['train_accuracy']:.2f} test_loss {row['test_loss']:.4f} "
          f"test_accuracy {100 * row['test_accuracy']:.2f}", flush=True)
  print(f"{args.optimizer}: {args.epochs} epochs in {time.perf_counter() - start:.1f} s on "
        f"{jax.default_backend()}; no files written.")
  return history


if __name__ == "__main__":
  main()
