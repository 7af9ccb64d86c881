"""The study's data: a small CIFAR-10 training pool split into train and validation, and a test set.

``--data-dir`` reads the official CIFAR-10 "python version"; without it the subset is built from
the CIFAR-10 JPEG copy in a data folder beside the checkout (:data:`BUILD_PY`, which writes
the official layout). ``study-smoke`` uses synthetic images.
"""

import argparse
import os
import subprocess
import sys

import numpy as np

from benchmarks.study.presets import PRESETS
from examples.cifar import data as cifar_data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class Data:
  """Train / validation / test arrays on the host (uint8 images, int32 labels)."""

  def __init__(self, d: cifar_data.CifarData, train_size: int, val_size: int, test_size: int):
    need = train_size + val_size
    if len(d.train_images) < need:
      raise ValueError(f"need {need} training-pool images, the data has {len(d.train_images)}")
    self.train_x = d.train_images[:train_size]
    self.train_y = d.train_labels[:train_size].astype(np.int32)
    self.val_x = d.train_images[train_size:need]
    self.val_y = d.train_labels[train_size:need].astype(np.int32)
    self.test_x = d.test_images[:test_size]
    self.test_y = d.test_labels[:test_size].astype(np.int32)



def load_data(args: argparse.Namespace, workdir: str) -> Data:
  p = PRESETS[args.preset]
  if args.preset == "study-smoke":
    d = cifar_data.synthetic_cifar(p["train_size"] + p["val_size"], p["test_size"], seed=0)
  else:
    data_dir = args.data_dir
    if data_dir is None:
      if not os.path.exists(BUILD_PY):
        raise SystemExit(
            f"study: no data. {BUILD_PY} is absent (it writes the subset from a CIFAR-10 JPEG "
            "copy in a data folder beside the checkout); pass --data-dir with an official-layout "
            "CIFAR-10 folder, or run --preset study-smoke (synthetic data).")
      data_dir = os.path.join(workdir, "cifar")
      if not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        subprocess.run([sys.executable, BUILD_PY, data_dir, "--train",
                        str(p["train_size"] + p["val_size"]), "--test", str(p["test_size"])],
                       check=True, capture_output=True)
    d = cifar_data.load_cifar(data_dir)
  return Data(d, p["train_size"], p["val_size"], p["test_size"])
