"""ERM vs AMP (vs SAM) on CIFAR-10: accuracy over seeds, and sharpness of the minima found.

Trains each setting with several seeds through ``examples.cifar.train`` (the example's own
recipe: SGD with Nesterov momentum, step-decayed learning rate, weight decay, crop and flip
augmented on the device) and reports, per setting, mean +- std over the seeds of

* test accuracy after the last epoch, and the best test accuracy of any epoch (an optimistic,
  test-set-selected figure: labelled "best epoch", never mixed with the final one);
* the mean clean training loss over the last epoch (augmented batches);
* sharpness at the final parameters, on a fixed batch of (unaugmented) training images with
  BatchNorm in inference mode, from :mod:`amp_optax.diagnostics`: the top Hessian eigenvalue
  (power iteration) and the mean loss increase under random perturbations of a fixed norm.

Data: ``--data-dir`` (a folder in the official "python version" layout), or, by default, the
CIFAR-10 JPEG copy next to the repository, decoded by ``../shared/data/cifar-10-jpeg/build.py``
into a temporary folder; figures on it are "CIFAR-10 (JPEG copy)". ``--smoke`` trains on a
synthetic in-memory stand-in, so it runs anywhere.

Presets (any flag given explicitly overrides the preset)::

    python -m benchmarks.reproduce --preset cpu          # tiny CNN, 5,000 images, minutes on CPU
    python -m benchmarks.reproduce --preset cpu --sweep  # epsilon sweep, both norms, 5,000 images
    python -m benchmarks.reproduce --preset gpu          # PreActResNet18, all 50,000, 3 seeds
    python -m benchmarks.reproduce --preset paper        # + the paper's 200 epochs, batch 50
    python -m benchmarks.reproduce --smoke               # CI: seconds, synthetic data
    python -m benchmarks.reproduce --preset study-sweep  # the CPU study (benchmarks/study/):
    python -m benchmarks.reproduce --preset study-final  #   epsilon/rho sweeps, then 5 seeds

Writes ``reproduce_<preset>[_sweep].json`` and ``.md`` to ``benchmarks/results/`` (or ``--out``).
"""

import argparse
from collections.abc import Iterator
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from amp_optax import diagnostics
from examples.cifar import data as cifar_data
from examples.cifar import models as cifar_models
from examples.cifar import train as cifar_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")

PRESETS: dict[str, dict[str, Any]] = {
    # Minutes on a small CPU: a tiny CNN on a real 5,000-image subset, all 10,000 test images.
    "cpu": dict(model="tiny_cnn", train_size=5000, test_size=10000, epochs=6, batch_size=128,
                seeds=3, sharpness_batch=512, hessian_iters=20, perturb_samples=20),
    # A GPU: the paper's model on all of CIFAR-10, a shortened schedule.
    "gpu": dict(model="preactresnet18", train_size=50000, test_size=10000, epochs=30,
                batch_size=128, seeds=3, sharpness_batch=1000, hessian_iters=20,
                perturb_samples=20),
    # The paper's recipe (PreActResNet18, 200 epochs, batch 50): hours per run on one GPU.
    "paper": dict(model="preactresnet18", train_size=50000, test_size=10000, epochs=200,
                  batch_size=50, seeds=3, sharpness_batch=1000, hessian_iters=20,
                  perturb_samples=20),
    # CI: synthetic data, a very small CNN, one epoch.
    "smoke": dict(model="tiny_cnn", train_size=128, test_size=64, epochs=1, batch_size=32,
                  seeds=2, sharpness_batch=32, hessian_iters=3, perturb_samples=2),
}
SWEEP_EPSILONS = (0.02, 0.05, 0.1, 0.2, 0.5)
SWEEP_TRAIN_SIZE = 5000


@dataclasses.dataclass(frozen=True)
class Setting:
  """One row of the results: an optimiser and its hyper-parameters."""

  method: str  # erm, amp or sam
  epsilon: float | None = None
  norm: str | None = None
  inner_steps: int | None = None
  rho: float | None = None

  @property
  def label(self) -> str:
    if self.method == "amp":
      return f"AMP eps={self.epsilon:g} {self.norm} K={self.inner_steps}"
    if self.method == "sam":
      return f"SAM rho={self.rho:g}"
    return "ERM"


# ---------------------------------------------------------------------------------------------
# Data.


def prepare_data(args: argparse.Namespace, workdir: str) -> str | None:
  """The data folder to train on (None: synthetic data), building it if needed."""
  if args.data_dir:
    return args.data_dir
  if args.data == "synthetic":
    return None
  if not os.path.exists(BUILD_PY):
    raise SystemExit(
        f"no --data-dir and no {BUILD_PY} to build CIFAR-10 from. Pass --data-dir DIR "
        "(a folder holding cifar-10-batches-py/), or --data synthetic for a synthetic stand-in.")
  out = os.path.join(workdir, "cifar10")
  if os.path.exists(os.path.join(out, "cifar-10-batches-py", "test_batch")):
    return out  # built by an earlier call with the same --work-dir
  cmd = [sys.executable, BUILD_PY, out, "--train", str(args.train_size),
         "--test", str(args.test_size)]
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  _log(args, f"built CIFAR-10 (JPEG copy): {args.train_size} train / {args.test_size} test "
             f"images in {time.perf_counter() - t0:.1f}s")
  return out


def sharpness_batch(args: argparse.Namespace, data_dir: str | None) -> tuple[Any, Any]:
  """A fixed batch of training images (normalised, unaugmented) and labels."""
  if data_dir is None:
    ds = cifar_data.synthetic_cifar(args.train_size, args.test_size, 10)
  else:
    ds = cifar_data.load_cifar(data_dir, "cifar10")
  n = min(args.sharpness_batch, len(ds.train_labels))
  x = cifar_data.normalize(jnp.asarray(ds.train_images[:n]), cifar_data.MEAN["cifar10"],
                           cifar_data.STD["cifar10"])
  return x, jnp.asarray(ds.train_labels[:n])


# ---------------------------------------------------------------------------------------------
# Sharpness.


def make_sharpness_fn(model: Any, args: argparse.Namespace) -> Any:
  """A jitted ``(params, batch_stats, x, y) -> dict`` of sharpness measures."""

  def loss_fn(params, batch_stats, x, y):
    logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  # XLA:CPU runs convolutions inside loops many times slower (jax#12868): unroll there.
  unroll = True if jax.default_backend() == "cpu" else 1

  @jax.jit
  def measure(params, batch_stats, x, y):
    key_h, key_p = jax.random.split(jax.random.key(args.sharpness_seed))
    eig = diagnostics.hessian_top_eigenvalue(
        loss_fn, params, batch_stats, x, y, key=key_h, num_iters=args.hessian_iters,
        unroll=unroll)
    pert = diagnostics.random_perturbation_loss_increase(
        loss_fn, params, batch_stats, x, y, radius=args.perturb_radius,
        num_samples=args.perturb_samples, key=key_p, norm=args.perturb_norm, unroll=unroll)
    return {"hessian_top_eigenvalue": eig, "perturbation_increase_mean": pert.mean,
            "perturbation_increase_std": pert.std, "sharpness_batch_loss": pert.base_loss}

  return measure


# ---------------------------------------------------------------------------------------------
# Training.


def run_dir(setting: Setting, seed: int, workdir: str) -> str:
  """A run's folder: named by its setting and seed, so a later call finds it again."""
  slug = "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in setting.label)
  return os.path.join(workdir, "runs", f"{slug}_seed{seed}")


def train_one(setting: Setting, seed: int, args: argparse.Namespace, data_dir: str | None,
              workdir: str) -> dict[str, Any]:
  """Trains (or, with --work-dir, resumes) one setting with one seed; returns the result."""
  persistent = args.work_dir is not None
  config = cifar_train.Config(
      optimizer=setting.method, model=args.model, dataset="cifar10", data_dir=data_dir,
      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
      weight_decay=args.weight_decay, epsilon=setting.epsilon or 0.5,
      inner_lr=args.inner_lr, inner_steps=setting.inner_steps or 1,
      norm=setting.norm or "per_tensor", rho=setting.rho or 0.05,
      train_size=args.train_size, test_size=args.test_size, seed=seed,
      out_dir=run_dir(setting, seed, workdir), overwrite=not persistent, resume=persistent,
      stop_after=args.stop_after, num_devices=args.num_devices, quick=data_dir is None,
      checkpoint=persistent, plot=False,
      progress=False, verbose=args.verbose >= 2)
  return cifar_train.train(config)


def summarize_run(result: Any, sharp: dict[str, Any]) -> dict[str, Any]:
  history = result.history
  accs = [r["test_acc"] for r in history]
  best = int(np.argmax(accs))
  out = {
      "final_test_acc": history[-1]["test_acc"],
      "best_epoch_test_acc": accs[best],
      "best_epoch": history[best]["epoch"],
      "final_train_loss": history[-1]["train_loss"],
      "final_train_acc": history[-1]["train_acc"],
      "final_test_loss": history[-1]["test_loss"],
      "train_time_s": float(sum(r["epoch_time"] for r in history)),
      "compile_time_s": float(history[0].get("compile_time", float("nan"))),
      "history": history,
  }
  out.update({k: float(v) for k, v in sharp.items()})
  return out


def _mean_std(values: list[float]) -> tuple[float, float]:
  arr = np.asarray(values, np.float64)
  return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


AGG_KEYS = ("final_test_acc", "best_epoch_test_acc", "final_train_loss", "final_test_loss",
            "hessian_top_eigenvalue", "perturbation_increase_mean", "train_time_s")


def aggregate(setting: Setting, runs: list[dict[str, Any]]) -> dict[str, Any]:
  row: dict[str, Any] = {"label": setting.label, **dataclasses.asdict(setting),
                         "seeds": len(runs)}
  for k in AGG_KEYS:
    row[k + "_mean"], row[k + "_std"] = _mean_std([r[k] for r in runs])
  return row


def settings_for(args: argparse.Namespace) -> list[Setting]:
  """The settings to train: the comparison, or the epsilon sweep (with its ERM baseline)."""
  if args.sweep:
    out = [Setting("erm")]
    for norm in args.sweep_norms:
      out += [Setting("amp", eps, norm, args.inner_steps) for eps in args.epsilons]
    return out
  out = []
  for m in args.methods:
    if m == "amp":
      out.append(Setting("amp", args.epsilon, args.norm, args.inner_steps))
    elif m == "sam":
      out.append(Setting("sam", rho=args.rho))
    else:
      out.append(Setting("erm"))
  return out


def markdown(out: dict[str, Any]) -> str:
  """The aggregated rows as a markdown table, with a caption saying what was run."""
  a = out["config"]
  pm = lambda m, s, scale=1.0, fmt=".2f": f"{m * scale:{fmt}} ± {s * scale:{fmt}}"
  data = out["data"]
  lines = [
      f"**{data}**, {a['model']}, {a['train_size']} train / {a['test_size']} test images, "
      f"{a['epochs']} epochs, batch {a['batch_size']}, lr {a['lr']} (x0.1 at 50%/75%), "
      f"wd {a['weight_decay']}; mean ± std over {a['seeds']} seeds "
      f"({out['environment']['platform']}, jax {out['environment']['jax']}).",
      "",
      "| setting | test acc, final (%) | test acc, best epoch (%) | train loss, last epoch "
      f"| λ_max (Hessian) | ΔL, random {a['perturb_norm']} r={a['perturb_radius']:g} "
      "| time / run (s) |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in out["rows"]:
    lines.append(
        f"| {r['label']} | {pm(r['final_test_acc_mean'], r['final_test_acc_std'], 100)} "
        f"| {pm(r['best_epoch_test_acc_mean'], r['best_epoch_test_acc_std'], 100)} "
        f"| {pm(r['final_train_loss_mean'], r['final_train_loss_std'], fmt='.4f')} "
        f"| {pm(r['hessian_top_eigenvalue_mean'], r['hessian_top_eigenvalue_std'], fmt='.3g')} "
        f"| {pm(r['perturbation_increase_mean_mean'], r['perturbation_increase_mean_std'], fmt='.3g')} "  # noqa: E501
        f"| {r['train_time_s_mean']:.0f} |")
  lines += [
      "",
      "Final: after the last epoch. Best epoch: the highest test accuracy of any epoch "
      "(selected on the test set, so optimistic). λ_max: top Hessian eigenvalue of the "
      f"training loss on {a['sharpness_batch']} fixed training images (BatchNorm in inference "
      f"mode, {a['hessian_iters']} power iterations). ΔL: mean of L(θ+u) − L(θ) over "
      f"{a['perturb_samples']} random u of {a['perturb_norm']} L2 norm {a['perturb_radius']:g}, "
      "same batch.",
  ]
  if out.get("pending"):
    lines += ["", "Not finished yet (resume with the same --work-dir and a later --stop-after): "
              + ", ".join(f"{p['setting']} seed {p['seed']} ({p['epochs_done']}/{p['epochs']} "
                          "epochs)" for p in out["pending"]) + "."]
  return "\n".join(lines)


def _log(args: argparse.Namespace, msg: str) -> None:
  if args.verbose:
    print(msg, flush=True)


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@contextlib.contextmanager
def compilation_cache(path: str) -> Iterator[None]:
  """Caches compiled programs in ``path`` meanwhile: seeds after the first reuse them."""
  old = {}
  try:
    for name, value in zip(_CACHE_OPTIONS, (path, 0, 0), strict=True):
      old[name] = getattr(jax.config, name)
      jax.config.update(name, value)
  except AttributeError:  # an option this JAX does not have: no cache, still correct.
    pass
  try:
    yield
  finally:
    for name, value in old.items():
      jax.config.update(name, value)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Trains every setting with every seed; returns (and writes) the results."""
  settings = settings_for(args)
  rows, runs_out = [], {}
  if args.work_dir is not None:
    os.makedirs(args.work_dir, exist_ok=True)
    workdir_context = contextlib.nullcontext(args.work_dir)
  else:
    workdir_context = tempfile.TemporaryDirectory(prefix="amp_reproduce_")
  pending = []
  with (workdir_context as workdir,
        compilation_cache(os.path.join(workdir, "jax_cache"))):
    data_dir = prepare_data(args, workdir)
    x_sharp, y_sharp = sharpness_batch(args, data_dir)
    model = cifar_models.get_model(args.model, 10)
    measure = make_sharpness_fn(model, args)
    for setting in settings:
      runs = []
      for seed in range(args.seeds):
        t0 = time.perf_counter()
        result = train_one(setting, seed, args, data_dir, workdir)
        if len(result.history) < args.epochs:  # --stop-after: continue in a later call
          pending.append({"setting": setting.label, "seed": seed,
                          "epochs_done": len(result.history), "epochs": args.epochs})
          _log(args, f"{setting.label:<34} seed {seed}: {len(result.history)}/{args.epochs} "
                     f"epochs so far; continue with the same --work-dir")
          continue
        sharp = jax.device_get(measure(result.params, result.batch_stats, x_sharp, y_sharp))
        run_out = summarize_run(result, sharp)
        runs.append(run_out)
        _log(args, f"{setting.label:<34} seed {seed}: test acc "
                   f"{100 * run_out['final_test_acc']:.2f}% (best "
                   f"{100 * run_out['best_epoch_test_acc']:.2f}% @ {run_out['best_epoch']})"
                   f"  train loss {run_out['final_train_loss']:.4f}  λ_max "
                   f"{run_out['hessian_top_eigenvalue']:.3g}  ΔL "
                   f"{run_out['perturbation_increase_mean']:.3g}  "
                   f"({time.perf_counter() - t0:.0f}s)")
      if runs:
        rows.append(aggregate(setting, runs))
        runs_out[setting.label] = runs

  device = jax.devices()[0]
  if data_dir is None:
    data = "synthetic CIFAR-shaped data"
  elif args.data_dir:
    data = f"CIFAR-10 from {args.data_dir}"
  else:
    data = "CIFAR-10 (JPEG copy)"
  config = {k: v for k, v in vars(args).items() if k not in ("out",)}
  out = {
      "benchmark": "reproduce", "preset": args.preset, "sweep": bool(args.sweep), "data": data,
      "config": config,
      "environment": {"platform": device.platform,
                      "device_kind": getattr(device, "device_kind", "?"),
                      "jax": jax.__version__, "optax": optax.__version__,
                      "python": platform.python_version(), "cpu_count": os.cpu_count()},
      "rows": rows, "runs": runs_out, "pending": pending,
  }
  out["markdown"] = markdown(out)
  base = args.out or os.path.join(
      RESULTS_DIR, f"reproduce_{args.preset}{'_sweep' if args.sweep else ''}.json")
  base = base[:-5] if base.endswith(".json") else base
  os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
  with open(base + ".json", "w") as f:
    json.dump(out, f, indent=2, default=float)
  with open(base + ".md", "w") as f:
    f.write(out["markdown"] + "\n")
  out["paths"] = [base + ".json", base + ".md"]
  return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__.split("Presets")[1].split("\n", 1)[1])
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument("--smoke", action="store_true", help="--preset smoke (synthetic data, seconds)")
  p.add_argument("--sweep", action="store_true",
                 help="sweep AMP's epsilon (--epsilons) for each of --sweep-norms, plus ERM, on "
                 f"a {SWEEP_TRAIN_SIZE}-image training subset")
  p.add_argument("--data-dir", default=None,
                 help="an official-layout CIFAR-10 folder (default: build the JPEG copy)")
  p.add_argument("--data", choices=("auto", "build", "synthetic"), default="auto",
                 help="without --data-dir: build the CIFAR-10 JPEG copy, or use synthetic "
                 "data (auto: synthetic for the smoke preset only)")
  p.add_argument("--methods", nargs="+", choices=("erm", "amp", "sam"),
                 default=["erm", "amp", "sam"])
  p.add_argument("--model", default=None, help="an examples.cifar.models name")
  p.add_argument("--train-size", type=int, default=None)
  p.add_argument("--test-size", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=None)
  p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per setting")
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--weight-decay", type=float, default=5e-4)
  p.add_argument("--epsilon", type=float, default=0.5, help="AMP radius")
  p.add_argument("--norm", choices=("per_tensor", "global"), default="per_tensor")
  p.add_argument("--inner-lr", type=float, default=1.0)
  p.add_argument("--inner-steps", type=int, default=1)
  p.add_argument("--rho", type=float, default=0.05, help="SAM radius")
  p.add_argument("--epsilons", type=float, nargs="+", default=list(SWEEP_EPSILONS))
  p.add_argument("--sweep-norms", nargs="+", choices=("per_tensor", "global"),
                 default=["per_tensor", "global"])
  p.add_argument("--sharpness-batch", type=int, default=None,
                 help="training images the sharpness is measured on")
  p.add_argument("--hessian-iters", type=int, default=None, help="power iterations")
  p.add_argument("--perturb-radius", type=float, default=0.1,
                 help="norm of the random perturbations")
  p.add_argument("--perturb-norm", choices=("global", "per_tensor"), default="per_tensor")
  p.add_argument("--perturb-samples", type=int, default=None)
  p.add_argument("--sharpness-seed", type=int, default=0)
  p.add_argument("--num-devices", type=int, default=1,
                 help="data-parallel over this many local devices")
  p.add_argument("--work-dir", default=None,
                 help="keep runs (checkpoints, metrics) and the built data here, and resume them "
                      "on the next call with the same flags; default: a temporary folder")
  p.add_argument("--stop-after", type=int, default=None,
                 help="with --work-dir: train each run up to this epoch in this call (e.g. 20, "
                      "then 40, ... across sessions); unfinished runs are listed as pending")
  p.add_argument("--out", default=None, help="output path (.json; a .md goes next to it)")
  p.add_argument("-v", "--verbose", type=int, default=1,
                 help="0 quiet, 1 one line per run, 2 also per epoch")
  args = p.parse_args(argv)
  if args.smoke:
    args.preset = "smoke"
  if args.data == "auto":
    args.data = "synthetic" if args.preset == "smoke" else "build"
  for k, v in PRESETS[args.preset].items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.sweep and args.train_size > SWEEP_TRAIN_SIZE:
    args.train_size = SWEEP_TRAIN_SIZE
  if args.smoke:
    args.epsilons = args.epsilons[:2]
  if not math.isfinite(args.perturb_radius) or args.perturb_radius <= 0:
    p.error("--perturb-radius must be > 0")
  if args.stop_after is not None and args.work_dir is None:
    p.error("--stop-after needs --work-dir, where the runs are kept for the next call")
  return args


def _study_preset(argv: list[str]) -> bool:
  """Whether ``argv`` names one of :mod:`benchmarks.study`'s presets (``study-*``)."""
  for i, a in enumerate(argv):
    value = a.split("=", 1)[1] if a.startswith("--preset=") else (
        argv[i + 1] if a == "--preset" and i + 1 < len(argv) else None)
    if value is not None and value.startswith("study"):
      return True
  return False


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else list(argv)
  if _study_preset(argv):
    # The regulariser study has its own harness (Python-driven steps, paired seeds, sweeps).
    from benchmarks import study  # pylint: disable=g-import-not-at-top
    return study.main(argv)
  out = run(parse_args(argv))
  print(out["markdown"])
  print("written: " + ", ".join(out["paths"]))
  return out


if __name__ == "__main__":
  main()
