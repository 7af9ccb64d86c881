"""The settings of a CIFAR run: one dataclass, its defaults and its validation.

:class:`Config` holds everything a run depends on; :meth:`Config.resolved` fills the defaults
of the mode (the AMP paper's recipe, or a small CPU-sized run with ``quick=True``) and checks the
values. The command line (:mod:`examples.cifar.main`) only turns flags into a :class:`Config`.
"""

import dataclasses
import os

from examples.cifar import data as cifar_data

OPTIMIZERS = ("erm", "amp", "sam")
NORMS = ("per_tensor", "global")
DTYPES = ("float32", "bfloat16", "float16")

# Fields that may differ between a run and its --resume without changing the result.
RESUME_FREE = ("data_dir", "out_dir", "resume", "overwrite", "stop_after", "num_devices",
               "eval_batch_size", "checkpoint", "plot", "progress", "verbose")


class ConfigError(ValueError):
  """Settings that cannot work together (reported without a traceback on the command line)."""


@dataclasses.dataclass
class Config:
  """Everything a run depends on. ``None`` fields take the defaults of the mode (see
  :meth:`resolved`): the paper's recipe, or a small CPU-sized run with ``quick=True``."""

  optimizer: str = "amp"
  model: str | None = None  # preactresnet18; tiny_cnn with quick
  dataset: str = "cifar10"
  data_dir: str | None = None  # None with quick: a synthetic in-memory dataset
  epochs: int | None = None  # 200; 4 with quick
  batch_size: int | None = None  # 50; 64 with quick
  lr: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  epsilon: float = 0.5
  inner_lr: float = 1.0
  inner_steps: int = 1
  norm: str = "per_tensor"
  rho: float = 0.05
  augment: bool = True
  cutout: int = 0
  train_size: int | None = None  # all; quick: 2048 synthetic or the first 5000 real images
  test_size: int | None = None  # all; quick: 512 synthetic or the first 1000 real images
  dtype: str = "float32"
  seed: int = 0
  out_dir: str | None = None
  resume: bool = False
  overwrite: bool = False
  stop_after: int | None = None
  num_devices: int | None = None  # all local devices
  eval_batch_size: int = 500
  quick: bool = False
  checkpoint: bool = True
  plot: bool = True
  progress: bool = True
  verbose: bool = True

  def resolved(self) -> "Config":
    """A copy with every ``None`` default filled in for the mode; validates the values."""
    c = dataclasses.replace(self)
    if c.model is None:
      c.model = "tiny_cnn" if c.quick else "preactresnet18"
    if c.epochs is None:
      c.epochs = 4 if c.quick else 200
    if c.batch_size is None:
      c.batch_size = 64 if c.quick else 50
    if c.quick and c.train_size is None:
      c.train_size = 2048 if c.data_dir is None else 5000
    if c.quick and c.test_size is None:
      c.test_size = 512 if c.data_dir is None else 1000
    if c.out_dir is None:
      suffix = "-quick" if c.quick else ""
      c.out_dir = os.path.join(
          "runs", "cifar", f"{c.dataset}-{c.model}-{c.optimizer}-s{c.seed}{suffix}")
    if c.optimizer not in OPTIMIZERS:
      raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
    if c.dataset not in cifar_data.NUM_CLASSES:
      raise ConfigError(f"dataset must be cifar10 or cifar100, got {c.dataset!r}")
    if c.data_dir is None and not c.quick:
      raise ConfigError("--data-dir is required without --quick (--quick alone trains on a "
                       "synthetic dataset).")
    if c.epochs < 1 or c.batch_size < 1:
      raise ConfigError("epochs and batch size must be >= 1")
    if c.dtype not in DTYPES:
      raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {c.dtype!r}")
    return c
