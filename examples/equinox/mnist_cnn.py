"""Equinox's MNIST CNN example on the bundled digits: ERM, then AMP, from the same start.

    python -m examples.equinox.mnist_cnn                  # 300 steps each, ~15 s on CPU
    python -m examples.equinox.mnist_cnn --epsilon 0      # AMP at epsilon=0 is ERM, bit for bit
    python examples/equinox/mnist_cnn.py --steps 100 --inner-steps 2

The shape of Equinox's "Convolutional Neural Network on MNIST" example: a CNN
that holds a list of layers (``eqx.nn.Conv2d``, ``eqx.nn.MaxPool2d``, JAX
activations, ``jnp.ravel``, ``eqx.nn.Linear``), a vmapped cross-entropy loss,
``optax.adamw``, an ``eqx.filter_jit`` ``make_step`` over
``eqx.filter_value_and_grad`` that passes ``eqx.filter(model, eqx.is_array)``
to the optimiser, and an evaluation every ``--print-every`` steps. AMP
changes two lines of ``make_step`` (marked ``# AMP``) and puts
``amp_optax.amp`` first in the optimiser's chain. Both runs see the same
initial model and the same batches. It writes no files.
"""

import argparse
from pathlib import Path
import sys
import time

if __package__ in (None, ""):  # run as a file: make `examples` and `amp_optax` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import amp_optax  # noqa: E402
from amp_optax import equinox as amp_eqx  # noqa: E402
from examples.equinox.data import get_datasets  # noqa: E402
from examples.equinox.data import infinite_batches  # noqa: E402

NO_FILES = "No files written."


class CNN(eqx.Module):
  """Equinox's MNIST CNN, sized for 1x8x8 digits."""

  layers: list

  def __init__(self, key):
    key1, key2, key3 = jax.random.split(key, 3)
    self.layers = [
        eqx.nn.Conv2d(1, 8, kernel_size=3, key=key1),  # 1x8x8 -> 8x6x6
        eqx.nn.MaxPool2d(kernel_size=2),  # -> 8x5x5 (stride 1, as in Equinox's)
        jax.nn.relu,
        jnp.ravel,
        eqx.nn.Linear(8 * 5 * 5, 64, key=key2),
        jax.nn.relu,
        eqx.nn.Linear(64, 10, key=key3),
        jax.nn.log_softmax,
    ]

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


def cross_entropy(y, log_probs):
  """Mean negative log-likelihood of the integer labels ``y`` under log-softmax outputs."""
  return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def loss(model, x, y):
  return cross_entropy(y, jax.vmap(model)(x))


@eqx.filter_jit
def compute_accuracy(model, x, y):
  return jnp.mean(jnp.argmax(jax.vmap(model)(x), axis=1) == y)


def evaluate(model, x_test, y_test):
  """Test loss and accuracy, over the whole (small) test set at once."""
  return float(eqx.filter_jit(loss)(model, x_test, y_test)), float(
      compute_accuracy(model, x_test, y_test))


@eqx.filter_jit
def make_step(model, opt_state, x, y, optim):
  """Equinox's step: ERM."""
  loss_value, grads = eqx.filter_value_and_grad(loss)(model, x, y)
  updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
  model = eqx.apply_updates(model, updates)
  return model, opt_state, loss_value


@eqx.filter_jit
def make_amp_step(model, opt_state, x, y, optim):
  """Equinox's step with AMP: two lines differ."""
  loss_value, grads, amp_grad_fn = amp_eqx.value_and_grad(loss)(model, x, y)  # AMP
  updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array),
                                    grad_fn=amp_grad_fn)  # AMP: grad_fn=
  model = eqx.apply_updates(model, updates)
  return model, opt_state, loss_value


def make_optimiser(args, use_amp: bool) -> optax.GradientTransformation:
  optim = optax.adamw(args.learning_rate)
  if use_amp:  # AMP: first in the chain
    optim = optax.chain(amp_optax.amp(args.epsilon, inner_lr=args.inner_lr,
                                      inner_steps=args.inner_steps), optim)
  return optim


def train(model, optim, step_fn, args, datasets, label: str):
  """Equinox's training loop; returns the model and one row of metrics per evaluation."""
  (x_train, y_train), (x_test, y_test) = datasets
  opt_state = optim.init(eqx.filter(model, eqx.is_array))
  history = []
  batches = infinite_batches(x_train, y_train, args.batch_size, seed=args.seed)
  for step, (x, y) in zip(range(args.steps), batches):
    model, opt_state, train_loss = step_fn(model, opt_state, x, y, optim)
    if step % args.print_every == 0 or step == args.steps - 1:
      test_loss, test_accuracy = evaluate(model, x_test, y_test)
      history.append({"step": step, "train_loss": float(train_loss), "test_loss": test_loss,
                      "test_accuracy": test_accuracy})
      print(f"{label} step={step}, train_loss={float(train_loss):.4f}, "
            f"test_loss={test_loss:.4f}, test_accuracy={test_accuracy:.4f}", flush=True)
  return model, history


def max_abs_diff(model_a, model_b) -> float:
  """The largest difference between the two models' arrays (0.0: identical)."""
  # In float32, so that integer and boolean arrays (a BatchNorm's counters) subtract too.
  diffs = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a.astype(jnp.float32) - b)),
                       eqx.filter(model_a, eqx.is_array), eqx.filter(model_b, eqx.is_array))
  return max(float(d) for d in jax.tree.leaves(diffs))


def parse_args(argv=None, description=None):
  parser = argparse.ArgumentParser(description=description or __doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--epsilon", type=float, default=0.05,
                      help="AMP's ball radius (absolute, per tensor; the project's default)")
  parser.add_argument("--inner-lr", type=float, default=1.0)
  parser.add_argument("--inner-steps", type=int, default=1)
  parser.add_argument("--learning-rate", type=float, default=3e-3)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--print-every", type=int, default=100)
  parser.add_argument("--seed", type=int, default=5678)
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  """Trains ERM, then AMP; returns their histories and how far apart the final models are."""
  args = parse_args(argv)
  datasets = get_datasets()
  initial = CNN(jax.random.key(args.seed))
  results = {}
  start = time.perf_counter()
  erm_model, results["erm"] = train(initial, make_optimiser(args, False), make_step, args,
                                    datasets, "erm")
  amp_model, results["amp"] = train(initial, make_optimiser(args, True), make_amp_step, args,
                                    datasets, f"amp(epsilon={args.epsilon:g})")
  results["max_abs_diff"] = max_abs_diff(erm_model, amp_model)
  print(f"max |theta_amp - theta_erm| = {results['max_abs_diff']:.3g} after {args.steps} steps"
        f" ({time.perf_counter() - start:.1f} s on {jax.default_backend()}). {NO_FILES}")
  return results


if __name__ == "__main__":
  main()
