"""A run's directory: what is written there, and the checks before a run writes anything.

A run directory (``--out-dir``) holds ``config.json`` (the resolved settings), ``metrics.jsonl``
(one JSON object per epoch), ``curves.png`` and ``checkpoints/`` (Orbax, one per epoch, the last
two kept). ``--resume`` continues from it only with the settings it was started with.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

from examples.cifar.config import RESUME_FREE
from examples.cifar.config import Config
from examples.cifar.config import ConfigError

OUTPUTS = ("config.json", "metrics.jsonl", "curves.png", "checkpoints")


def holds_run(c: Config) -> bool:
  """Whether ``c.out_dir`` already holds metrics or checkpoints of a run."""
  return any(os.path.exists(os.path.join(c.out_dir, f)) for f in ("metrics.jsonl", "checkpoints"))


def check_out_dir(c: Config) -> None:
  """Raises, before anything is written, if ``c.out_dir`` cannot be used as asked."""
  if holds_run(c) and not c.resume and not c.overwrite:
    raise FileExistsError(f"{c.out_dir} already holds a run. Pass --resume to continue it, "
                          "--overwrite to start it afresh, or choose another --out-dir.")
  if c.resume:
    _check_resume_config(c)


def prepare_out_dir(c: Config) -> None:
  """Clears an overwritten run, creates ``c.out_dir`` and writes ``config.json``."""
  if not c.resume:
    for f in ("metrics.jsonl", "config.json", "curves.png"):
      if os.path.exists(os.path.join(c.out_dir, f)):
        os.remove(os.path.join(c.out_dir, f))
    shutil.rmtree(os.path.join(c.out_dir, "checkpoints"), ignore_errors=True)
  os.makedirs(c.out_dir, exist_ok=True)
  with open(os.path.join(c.out_dir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(c), f, indent=2)


def _check_resume_config(c: Config) -> None:
  path = os.path.join(c.out_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  now = dataclasses.asdict(c)
  diff = [f"  {k}: saved {saved[k]!r}, now {v!r}" for k, v in now.items()
          if k not in RESUME_FREE and k in saved and saved[k] != v]
  if diff:
    raise ConfigError(f"--resume with settings that differ from the run in {c.out_dir}:\n"
                      + "\n".join(diff)
                      + "\nResume with the same settings, or start a new --out-dir.")


def written_outputs(out_dir: str) -> list[str]:
  """The outputs present in ``out_dir``, in the order of :data:`OUTPUTS` (folders end in /)."""
  found = []
  for name in OUTPUTS:
    path = os.path.join(out_dir, name)
    if os.path.isdir(path):
      found.append(name + "/")
    elif os.path.exists(path):
      found.append(name)
  return found


def read_history(path: str, up_to_epoch: int) -> list[dict[str, Any]]:
  """The rows of ``metrics.jsonl`` for epochs ``<= up_to_epoch`` (none if absent)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["epoch"] <= up_to_epoch]


def write_history(path: str, history: list[dict[str, Any]]) -> None:
  """Writes ``metrics.jsonl`` atomically (a crash leaves the old file, never half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for row in history:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def plot_curves(history: list[dict[str, Any]], path: str, title: str = "") -> None:
  """Saves loss and accuracy curves (train and test per epoch) as a PNG."""
  from matplotlib.figure import Figure  # no pyplot: no GUI backend needed

  epochs = [r["epoch"] for r in history]
  fig = Figure(figsize=(10, 4), layout="constrained")
  ax_loss, ax_acc = fig.subplots(1, 2)
  for split in ("train", "test"):
    ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], marker=".", label=split)
    ax_acc.plot(epochs, [100 * r[f"{split}_acc"] for r in history], marker=".", label=split)
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
  ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=100)


def checkpoint_manager(c: Config) -> Any:
  """An Orbax manager for ``c.out_dir/checkpoints`` (keeps the last two epochs)."""
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(c.out_dir, "checkpoints")),
                               options=options)
