"""The digits CNN with BatchNorm (eqx.nn.State), as in Equinox's stateful example: ERM, then AMP.

    python -m examples.equinox.stateful_cnn                  # 300 steps each, ~20 s on CPU
    python -m examples.equinox.stateful_cnn --epsilon 0      # AMP at epsilon=0 is ERM, bit for bit
    python examples/equinox/stateful_cnn.py --steps 100

The pattern of Equinox's "Stateful operations (e.g. BatchNorm)" example on
:mod:`examples.equinox.mnist_cnn`'s CNN: the model is made with
``eqx.nn.make_with_state``, ``__call__(x, state)`` threads the state through
``eqx.nn.BatchNorm``, the loss vmaps the model with ``axis_name="batch"``,
``in_axes=(0, None)``, ``out_axes=(0, None)`` and returns ``(loss, state)``,
the step rebinds ``state`` to the one the clean pass returns, and evaluation
runs ``eqx.nn.inference_mode(model)`` with the final state fixed by
``eqx.Partial``. AMP changes two lines of ``make_step`` (marked ``# AMP``):
``amp_eqx.value_and_grad`` builds the perturbed passes' ``grad_fn`` from the
clean pass's own ``state``, so rebinding ``state`` does not leak the new
statistics into them. It writes no files.
"""

from pathlib import Path
import sys
import time

if __package__ in (None, ""):  # run as a file: make `examples` and `amp_optax` importable.
  sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from amp_optax import equinox as amp_eqx  # noqa: E402
from examples.equinox.data import get_datasets  # noqa: E402
from examples.equinox.data import infinite_batches  # noqa: E402
from examples.equinox.mnist_cnn import NO_FILES  # noqa: E402
from examples.equinox.mnist_cnn import cross_entropy  # noqa: E402
from examples.equinox.mnist_cnn import make_optimiser  # noqa: E402
from examples.equinox.mnist_cnn import max_abs_diff  # noqa: E402
from examples.equinox.mnist_cnn import parse_args  # noqa: E402


class CNN(eqx.Module):
  """The digits CNN with a BatchNorm after the convolution."""

  conv: eqx.nn.Conv2d
  norm: eqx.nn.BatchNorm
  pool: eqx.nn.MaxPool2d
  linear1: eqx.nn.Linear
  linear2: eqx.nn.Linear

  def __init__(self, key):
    key1, key2, key3 = jax.random.split(key, 3)
    self.conv = eqx.nn.Conv2d(1, 8, kernel_size=3, key=key1)
    self.norm = eqx.nn.BatchNorm(8, axis_name="batch", mode="batch")
    self.pool = eqx.nn.MaxPool2d(kernel_size=2)
    self.linear1 = eqx.nn.Linear(8 * 5 * 5, 64, key=key2)
    self.linear2 = eqx.nn.Linear(64, 10, key=key3)

  def __call__(self, x, state):
    x, state = self.norm(self.conv(x), state)
    x = jnp.ravel(self.pool(jax.nn.relu(x)))
    x = self.linear2(jax.nn.relu(self.linear1(x)))
    return jax.nn.log_softmax(x), state


def compute_loss(model, state, x, y):
  batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
  log_probs, state = batch_model(x, state)
  return cross_entropy(y, log_probs), state


@eqx.filter_jit
def make_step(model, state, opt_state, x, y, optim):
  """Equinox's stateful step (with the loss returned, and the params that adamw needs): ERM."""
  (loss_value, state), grads = eqx.filter_value_and_grad(compute_loss, has_aux=True)(
      model, state, x, y)
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = optim.update(grads, opt_state, params)
  model = eqx.apply_updates(model, updates)
  return model, state, opt_state, loss_value


@eqx.filter_jit
def make_amp_step(model, state, opt_state, x, y, optim):
  """The same step with AMP: two lines differ."""
  (loss_value, state), grads, amp_grad_fn = amp_eqx.value_and_grad(  # AMP
      compute_loss, has_aux=True)(model, state, x, y)
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, opt_state = optim.update(grads, opt_state, params, grad_fn=amp_grad_fn)  # AMP
  model = eqx.apply_updates(model, updates)
  return model, state, opt_state, loss_value


@eqx.filter_jit
def evaluate_batch(inference_model, x, y):
  log_probs, _ = jax.vmap(inference_model)(x)  # the state it returns is discarded
  return cross_entropy(y, log_probs), jnp.mean(jnp.argmax(log_probs, axis=1) == y)


def evaluate(model, state, x_test, y_test):
  """Test loss and accuracy with the running statistics, as Equinox's example infers."""
  inference_model = eqx.Partial(eqx.nn.inference_mode(model), state=state)
  test_loss, test_accuracy = evaluate_batch(inference_model, x_test, y_test)
  return float(test_loss), float(test_accuracy)


def train(model, state, optim, step_fn, args, datasets, label: str):
  """Returns the model, its state, and one row of metrics per evaluation."""
  (x_train, y_train), (x_test, y_test) = datasets
  opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
  history = []
  batches = infinite_batches(x_train, y_train, args.batch_size, seed=args.seed)
  for step, (x, y) in zip(range(args.steps), batches):
    model, state, opt_state, train_loss = step_fn(model, state, opt_state, x, y, optim)
    if step % args.print_every == 0 or step == args.steps - 1:
      test_loss, test_accuracy = evaluate(model, state, x_test, y_test)
      history.append({"step": step, "train_loss": float(train_loss), "test_loss": test_loss,
                      "test_accuracy": test_accuracy})
      print(f"{label} step={step}, train_loss={float(train_loss):.4f}, "
            f"test_loss={test_loss:.4f}, test_accuracy={test_accuracy:.4f}", flush=True)
  return model, state, history


def main(argv=None) -> dict:
  """Trains ERM, then AMP; returns their histories and how far apart the final models are."""
  args = parse_args(argv, description=__doc__.split("\n")[0])
  datasets = get_datasets()
  initial_model, initial_state = eqx.nn.make_with_state(CNN)(jax.random.key(args.seed))
  results = {}
  start = time.perf_counter()
  erm_model, erm_state, results["erm"] = train(
      initial_model, initial_state, make_optimiser(args, False), make_step, args, datasets,
      "erm")
  amp_model, amp_state, results["amp"] = train(
      initial_model, initial_state, make_optimiser(args, True), make_amp_step, args, datasets,
      f"amp(epsilon={args.epsilon:g})")
  results["max_abs_diff"] = max_abs_diff((erm_model, erm_state), (amp_model, amp_state))
  print(f"max |theta_amp - theta_erm| (parameters and BatchNorm statistics) = "
        f"{results['max_abs_diff']:.3g} after {args.steps} steps "
        f"({time.perf_counter() - start:.1f} s on {jax.default_backend()}). {NO_FILES}")
  return results


if __name__ == "__main__":
  main()
