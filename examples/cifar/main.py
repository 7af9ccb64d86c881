"""Train a CIFAR classifier with ERM, AMP or SAM (JAX, Flax Linen, Optax).

Run as a script (from any folder) or as a module (from the repository root):

  python examples/cifar/train.py --quick                   # under a minute on CPU, synthetic data
  python examples/cifar/train.py --quick --optimizer erm   # the same without AMP
  python -m examples.cifar.train --data-dir DATA           # the paper's recipe: AMP,
                                                           # PreActResNet18, 200 epochs
  python -m examples.cifar.train --data-dir DATA --optimizer sam --rho 0.05
  python -m examples.cifar.train --data-dir DATA --out-dir runs/x --resume   # continue a run

Data: DATA is a folder holding the official CIFAR "python version" (cifar-10-batches-py/ or
cifar-100-python/, extracted from cifar-10-python.tar.gz or cifar-100-python.tar.gz of
https://www.cs.toronto.edu/~kriz/cifar.html), or that folder itself. Nothing is downloaded.
--quick without --data-dir trains on a synthetic dataset.

The defaults are the recipe of Zheng et al. (CVPR 2021): SGD with Nesterov momentum 0.9,
learning rate 0.1 divided by 10 at 50% and 75% of the epochs, weight decay 5e-4 on the
unperturbed parameters, batch size 50, random crop and flip; AMP with epsilon 0.5, inner
learning rate 1, one inner step, a norm ball per parameter array.

Outputs go to the run directory (--out-dir; its path is printed at the start and the end):
config.json, metrics.jsonl (one JSON object per epoch), curves.png and checkpoints/.

Several processes (one per host, or per GPU): start the same command once per process, with
--coordinator-address HOST:PORT --num-processes N --process-id I (or the environment variables
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with --distributed alone on a
TPU pod slice or under SLURM, where JAX finds them itself. The mesh then spans all processes'
devices, --batch-size is the global batch, each process feeds only its rows of each batch,
and process 0 alone prints and writes the run directory's files, except the checkpoints,
which all processes write together (use a directory all of them can reach). On one machine:
python examples/cifar/launch_local.py --num-processes 2 --cpu-devices 2 -- --quick
"""

import argparse
from collections.abc import Sequence
import os
import sys
from typing import Any

if __name__ == "__main__" and not __package__:
  # Run as a script (python examples/cifar/main.py): make `examples.cifar` importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.cifar import data as cifar_data
from examples.cifar import models
from examples.cifar import train
from examples.cifar.config import NORMS
from examples.cifar.config import OPTIMIZERS
from examples.cifar.config import Config
from examples.cifar.config import ConfigError

PROG = "python examples/cifar/train.py"


def build_parser() -> argparse.ArgumentParser:
  """The command-line parser (``--help`` lists every flag with its default, in plain text)."""
  p = argparse.ArgumentParser(
      prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  g = p.add_argument_group("run")
  g.add_argument("--quick", action="store_true",
                 help="small CPU-sized run: tiny_cnn, 4 epochs, batch 64, a synthetic dataset "
                 "(2048/512 images) or, with --data-dir, the first 5000/1000 real images")
  g.add_argument("--optimizer", choices=OPTIMIZERS, default="amp",
                 help="erm: plain SGD; amp: adversarial model perturbation; sam: "
                 "sharpness-aware minimisation (default: amp)")
  g.add_argument("--model", default=None,
                 help=f"one of {models.model_names()} or wrn{{depth}}_{{width}} "
                 "(default: preactresnet18; tiny_cnn with --quick)")
  g.add_argument("--dataset", choices=sorted(cifar_data.NUM_CLASSES), default="cifar10")
  g.add_argument("--data-dir", default=None,
                 help="folder holding cifar-10-batches-py/ or cifar-100-python/ (the official "
                 "'python version'), or that folder itself; optional with --quick")
  g.add_argument("--train-size", type=int, default=None,
                 help="use only the first N training images (default: all)")
  g.add_argument("--test-size", type=int, default=None,
                 help="use only the first N test images (default: all)")
  g.add_argument("--seed", type=int, default=0, help="seeds init, shuffling, augmentation")
  g.add_argument("--out-dir", default=None,
                 help="the run directory: metrics.jsonl, curves.png, config.json and "
                 "checkpoints/ go there (default: runs/cifar/DATASET-MODEL-OPTIMIZER-sSEED, "
                 "-quick appended with --quick)")
  g.add_argument("--resume", action="store_true",
                 help="continue the run in --out-dir from its last checkpoint")
  g.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
  g.add_argument("--stop-after", type=int, default=None,
                 help="stop after this many epochs in total (the schedule still spans "
                 "--epochs); continue later with --resume")
  g.add_argument("--num-devices", type=int, default=None,
                 help="data-parallel over the first N local devices (of each process; "
                 "default: all)")
  g.add_argument("--no-checkpoint", action="store_true", help="do not write checkpoints")
  g.add_argument("--no-plot", action="store_true", help="do not write curves.png")
  g.add_argument("--no-progress", action="store_true", help="no progress bar")

  g = p.add_argument_group(
      "several processes (jax.distributed; each flag defaults to the environment variable "
      "named)")
  g.add_argument("--coordinator-address", default=None,
                 help="HOST:PORT of process 0, the same for all processes "
                 "(JAX_COORDINATOR_ADDRESS)")
  g.add_argument("--num-processes", type=int, default=None,
                 help="how many processes train together (JAX_NUM_PROCESSES)")
  g.add_argument("--process-id", type=int, default=None,
                 help="this process's index, 0..N-1; process 0 writes the outputs "
                 "(JAX_PROCESS_ID)")
  g.add_argument("--distributed", action="store_true",
                 help="join a cluster that JAX detects itself (TPU pod slice, SLURM, Open MPI) "
                 "for the settings not given; without this or the three above: one process")

  g = p.add_argument_group("training recipe (defaults: the AMP paper's)")
  g.add_argument("--epochs", type=int, default=None, help="default: 200 (4 with --quick)")
  g.add_argument("--batch-size", type=int, default=None, help="default: 50 (64 with --quick)")
  g.add_argument("--lr", type=float, default=0.1,
                 help="initial learning rate, x0.1 at 50%% and 75%% of the epochs (default: 0.1)")
  g.add_argument("--momentum", type=float, default=0.9, help="Nesterov momentum (default: 0.9)")
  g.add_argument("--weight-decay", type=float, default=5e-4,
                 help="decoupled from the ascent (default: 5e-4)")
  g.add_argument("--no-augment", action="store_true", help="no random crop and flip")
  g.add_argument("--cutout", type=int, default=0,
                 help="Cutout square side, 0 for none (authors: 16 on CIFAR-10, 8 on CIFAR-100)")
  g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                 help="computation dtype of the model (parameters stay float32)")

  g = p.add_argument_group("AMP")
  g.add_argument("--epsilon", type=float, default=0.5,
                 help="radius of the perturbation ball (default: 0.5)")
  g.add_argument("--inner-lr", type=float, default=1.0,
                 help="step size of the inner ascent (default: 1)")
  g.add_argument("--inner-steps", type=int, default=1,
                 help="number K of ascent steps; a step costs 1 + K gradients (default: 1)")
  g.add_argument("--norm", choices=NORMS, default="per_tensor",
                 help="per_tensor: a ball per parameter array (authors' code); global: one "
                 "ball over all parameters (default: per_tensor)")

  g = p.add_argument_group("SAM")
  g.add_argument("--rho", type=float, default=0.05, help="SAM radius (default: 0.05)")
  return p


def config_from_args(args: argparse.Namespace) -> Config:
  """Turns parsed flags into a :class:`~examples.cifar.config.Config`."""
  return Config(
      optimizer=args.optimizer, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
      weight_decay=args.weight_decay, epsilon=args.epsilon, inner_lr=args.inner_lr,
      inner_steps=args.inner_steps, norm=args.norm, rho=args.rho, augment=not args.no_augment,
      cutout=args.cutout, train_size=args.train_size, test_size=args.test_size,
      dtype=args.dtype, seed=args.seed, out_dir=args.out_dir, resume=args.resume,
      overwrite=args.overwrite, stop_after=args.stop_after, num_devices=args.num_devices,
      quick=args.quick, checkpoint=not args.no_checkpoint, plot=not args.no_plot,
      progress=not args.no_progress)


def _setting(value: Any, env_var: str, kind: type = str) -> Any:
  if value is not None:
    return value
  raw = os.environ.get(env_var, "").strip()
  if not raw:
    return None
  try:
    return kind(raw)
  except ValueError:
    raise ConfigError(f"{env_var}={raw!r} is not a valid {kind.__name__}") from None


def distributed_settings(args: argparse.Namespace) -> dict[str, Any] | None:
  """The arguments for ``jax.distributed.initialize``, or ``None`` for a single process.

  Flags win over the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``
  and ``JAX_PROCESS_ID``. Without ``--distributed`` either none or all three must be set;
  with it, those not set are left to JAX's cluster detection.

  Raises:
    ConfigError: if only some of the three are set (and no ``--distributed``).
  """
  settings = {
      "coordinator_address": _setting(args.coordinator_address, "JAX_COORDINATOR_ADDRESS"),
      "num_processes": _setting(args.num_processes, "JAX_NUM_PROCESSES", int),
      "process_id": _setting(args.process_id, "JAX_PROCESS_ID", int),
  }
  given = [k for k, v in settings.items() if v is not None]
  if args.distributed:
    return settings
  if not given:
    return None
  if len(given) < len(settings):
    flags = lambda ks: ", ".join("--" + k.replace("_", "-") for k in ks)
    missing = [k for k in settings if k not in given]
    raise ConfigError(f"{flags(given)} given but not {flags(missing)}: pass all three (or "
                      "their JAX_* environment variables), or --distributed to let JAX detect "
                      "the rest on a TPU pod slice or under SLURM.")
  return settings


def initialize_distributed(settings: dict[str, Any]) -> None:
  """Joins the processes (``jax.distributed.initialize``) before JAX starts its backends."""
  import jax

  # CPU processes exchange data through gloo (the default in recent JAX, "none" in older
  # ones, which cannot run a computation that spans processes).
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**settings)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; returns the final metrics.

  Args:
    argv: the flags (default: ``sys.argv[1:]``). When given, errors in the settings or the data
      are raised; otherwise they end the process with a one-line message.

  Returns:
    The last epoch's metrics (empty if no epoch ran).
  """
  args = build_parser().parse_args(argv)
  config = config_from_args(args)
  try:
    settings = distributed_settings(args)
    if settings is not None:
      initialize_distributed(settings)
    metrics = train.run(config)
  except (cifar_data.CifarFormatError, FileExistsError, ConfigError) as e:
    if argv is not None:
      raise
    sys.exit(f"error: {e}")
  import jax

  if metrics and jax.process_index() == 0:
    print(f"final: test acc {100 * metrics['test_acc']:.2f}%  test loss "
          f"{metrics['test_loss']:.4f}  train acc {100 * metrics['train_acc']:.2f}%")
  if settings is not None:
    jax.distributed.shutdown()
  return metrics


if __name__ == "__main__":
  main()
