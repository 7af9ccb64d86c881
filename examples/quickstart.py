"""Quick start: ERM vs AMP on scikit-learn's bundled digits (no download).

    python examples/quickstart.py            # about a minute on a 2-core CPU
    python examples/quickstart.py --seeds 3 --epochs 100

Trains the same Flax NNX MLP twice per seed, with the same batches: once with
plain SGD (ERM) and once with ``amp_optax.amp`` first in the chain (AMP), and
prints the test accuracy and loss of both. The train step is the whole
integration: one extra keyword argument, ``grad_fn``. It writes no files: the
printed lines are its whole output (and it says so at the end).
"""

import argparse
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import amp_optax

NO_FILES = "No files written: the lines above are the whole output."


class MLP(nnx.Module):

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(64, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def load_data(n_train: int, seed: int):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 0.1
  x = (x - mean) / std
  return (jnp.asarray(x[:n_train]), jnp.asarray(y[:n_train]),
          jnp.asarray(x[n_train:]), jnp.asarray(y[n_train:]))


def train(args, use_amp: bool, seed: int, data) -> dict:
  x_train, y_train, x_test, y_test = data
  graphdef, params = nnx.split(MLP(args.hidden, rngs=nnx.Rngs(seed)))

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  steps_per_epoch = len(x_train) // args.batch_size
  total = steps_per_epoch * args.epochs
  lr = optax.piecewise_constant_schedule(args.lr, {total // 2: 0.1, (3 * total) // 4: 0.1})
  tx = optax.chain(
      amp_optax.amp(args.epsilon, inner_lr=args.inner_lr, inner_steps=args.inner_steps if use_amp
                    else 0, norm=args.norm),
      optax.add_decayed_weights(args.weight_decay),
      optax.sgd(lr, momentum=0.9, nesterov=True),
  )

  def train_step(carry, batch):
    params, opt_state = carry
    x, y = batch
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(
        grads, opt_state, params, grad_fn=jax.grad(lambda p, _: loss_fn(p, x, y)))
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def train_epoch(params, opt_state, key):
    # The data lives on the device; one epoch is one compiled scan.
    order = jax.random.permutation(key, len(x_train))[: steps_per_epoch * args.batch_size]
    batches = (x_train[order].reshape(steps_per_epoch, args.batch_size, -1),
               y_train[order].reshape(steps_per_epoch, args.batch_size))
    (params, opt_state), losses = jax.lax.scan(train_step, (params, opt_state), batches)
    return params, opt_state, losses.mean()

  @jax.jit
  def evaluate(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  opt_state = tx.init(params)
  key = jax.random.key(seed)
  for epoch in range(args.epochs):
    params, opt_state, train_loss = train_epoch(params, opt_state, jax.random.fold_in(key, epoch))
  test_loss, test_acc = evaluate(params, x_test, y_test)
  _, train_acc = evaluate(params, x_train, y_train)
  return {"train_loss": float(train_loss), "train_acc": float(train_acc),
          "test_loss": float(test_loss), "test_acc": float(test_acc)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--seeds", type=int, default=5, help="runs per method")
  parser.add_argument("--n-train", type=int, default=500,
                      help="training images (of 1797); the rest are the test set")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=50)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--weight-decay", type=float, default=5e-4)
  parser.add_argument("--epsilon", type=float, default=0.5)
  parser.add_argument("--inner-lr", type=float, default=1.0)
  parser.add_argument("--inner-steps", type=int, default=1)
  parser.add_argument("--norm", choices=["per_tensor", "global"], default="per_tensor")
  args = parser.parse_args(argv)

  print(f"digits: {args.n_train} train images, {1797 - args.n_train} test; "
        f"{args.epochs} epochs; AMP eps={args.epsilon} ({args.norm}), "
        f"inner_lr={args.inner_lr}, K={args.inner_steps}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}")
  results = {"erm": [], "amp": []}
  for seed in range(args.seeds):
    data = load_data(args.n_train, seed)
    for name in ("erm", "amp"):
      start = time.perf_counter()
      r = train(args, name == "amp", seed, data)
      results[name].append(r)
      print(f"seed {seed} {name.upper()}: test acc {100 * r['test_acc']:.2f}%  "
            f"test loss {r['test_loss']:.4f}  train loss {r['train_loss']:.4f}  "
            f"({time.perf_counter() - start:.1f}s)")
  for name in ("erm", "amp"):
    acc = np.array([r["test_acc"] for r in results[name]]) * 100
    loss = np.array([r["test_loss"] for r in results[name]])
    print(f"{name.upper()}: test accuracy {acc.mean():.2f} ± {acc.std():.2f} %, "
          f"test loss {loss.mean():.4f}  over {args.seeds} seeds")
  print(NO_FILES)
  return results


if __name__ == "__main__":
  main()
