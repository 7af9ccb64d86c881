"""scikit-learn's bundled 8x8 digits as Equinox's MNIST example holds MNIST: (x, y) batches."""

from collections.abc import Iterator

import numpy as np
from sklearn.datasets import load_digits


def get_datasets(test_size: int = 360, seed: int = 0):
  """``((x_train, y_train), (x_test, y_test))``: images (N, 1, 8, 8) in [-1, 1], int labels.

  Channels first and normalised to mean 0.5, scale 0.5, as Equinox's example
  loads MNIST through torchvision's ``ToTensor`` and ``Normalize((0.5,), (0.5,))``.
  """
  digits = load_digits()
  order = np.random.default_rng(seed).permutation(len(digits.target))
  images = (digits.images[order] / 16.0 - 0.5) / 0.5
  images = images.astype(np.float32)[:, None]
  labels = digits.target[order].astype(np.int32)
  return (images[test_size:], labels[test_size:]), (images[:test_size], labels[:test_size])


def infinite_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                     seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled full batches, epoch after epoch (a shuffling loader, looped forever)."""
  rng = np.random.default_rng(seed)
  steps = len(y) // batch_size
  while True:
    order = rng.permutation(len(y))[:steps * batch_size].reshape(steps, batch_size)
    for idx in order:
      yield x[idx], y[idx]

