"""scikit-learn's bundled 8x8 digits as Flax's MNIST examples hold MNIST: dicts of arrays."""

import numpy as np
from sklearn.datasets import load_digits


def get_datasets(train_size: int | None = None, test_size: int = 360, seed: int = 0):
  """``(train_ds, test_ds)``: dicts with ``"image"`` (N, 8, 8, 1) in [0, 1] and ``"label"``."""
  digits = load_digits()
  order = np.random.default_rng(seed).permutation(len(digits.target))
  images = (digits.images[order] / 16.0).astype(np.float32)[..., None]
  labels = digits.target[order].astype(np.int32)
  test = {"image": images[:test_size], "label": labels[:test_size]}
  end = None if train_size is None else test_size + train_size
  train = {"image": images[test_size:end], "label": labels[test_size:end]}
  return train, test


def batches(ds: dict, batch_size: int, rng: np.random.Generator):
  """Shuffled full batches of one epoch (the incomplete last batch is skipped, as in Flax's)."""
  n = len(ds["label"])
  steps = n // batch_size
  perms = rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size)
  for perm in perms:
    yield {k: v[perm] for k, v in ds.items()}
