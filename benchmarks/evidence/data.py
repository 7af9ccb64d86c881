"""CIFAR-10 for the evidence: a training pool split into train and a held-out validation slice,
and the whole test set, as normalised float vectors (an MLP's input).

Real data is built by the JPEG copy's ``build.py`` in the data folder beside the checkout (it
writes the official layout for a nested subset); the smoke preset uses synthetic images.
"""

import os
import subprocess
import sys

import numpy as np

from benchmarks.evidence.presets import Preset
from examples.cifar import data as cifar_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")
MEAN = np.asarray((0.4914, 0.4822, 0.4465), np.float32)
STD = np.asarray((0.2470, 0.2435, 0.2616), np.float32)


def _flat(images: np.ndarray, downsample: int = 1) -> np.ndarray:
  x = (images.astype(np.float32) / 255.0 - MEAN) / STD
  if downsample > 1:  # average pooling, downsample x downsample pixels per output pixel
    n, h, w, c = x.shape
    x = x.reshape(n, h // downsample, downsample, w // downsample, downsample, c).mean((2, 4))
  return x.reshape(len(images), -1)


def load(p: Preset, workdir: str) -> dict[str, np.ndarray]:
  """``{"train_x", "train_y", "val_x", "val_y", "test_x", "test_y"}`` on the host."""
  pool = p.train_size + p.val_size
  if p.synthetic:
    d = cifar_data.synthetic_cifar(pool, p.test_size, seed=0)
  else:
    data_dir = os.path.join(workdir, f"cifar_{pool}_{p.test_size}")
    if not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
      if not os.path.exists(BUILD_PY):
        raise SystemExit(f"evidence: no data ({BUILD_PY} is absent); run --preset smoke.")
      subprocess.run([sys.executable, BUILD_PY, data_dir, "--train", str(pool),
                      "--test", str(p.test_size)], check=True, capture_output=True)
    d = cifar_data.load_cifar(data_dir)
  if len(d.train_images) < pool or len(d.test_images) < p.test_size:
    raise ValueError(f"need {pool} training-pool and {p.test_size} test images")
  return {"train_x": _flat(d.train_images[:p.train_size], p.downsample),
          "train_y": d.train_labels[:p.train_size].astype(np.int32),
          "val_x": _flat(d.train_images[p.train_size:pool], p.downsample),
          "val_y": d.train_labels[p.train_size:pool].astype(np.int32),
          "test_x": _flat(d.test_images[:p.test_size], p.downsample),
          "test_y": d.test_labels[:p.test_size].astype(np.int32)}
