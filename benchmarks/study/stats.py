"""Statistics over seeds: means, spreads and paired t-intervals of differences to ERM."""

import math
from typing import Any

import numpy as np


def mean_std(values: list[float]) -> tuple[float, float]:
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def paired_ci(a: list[float], b: list[float], level: float = 0.95) -> dict[str, Any]:
  """Mean of ``a - b`` (paired by position) and its t-interval."""
  import scipy.stats  # pylint: disable=g-import-not-at-top

  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = len(d)
  mean = float(d.mean()) if n else float("nan")
  if n < 2:
    return {"n": n, "mean": mean, "lo": float("nan"), "hi": float("nan")}
  half = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
  return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def summarize(runs: dict[str, dict[str, Any]], erm_runs: dict[str, dict[str, Any]] | None):
  """Per-setting aggregate; ``runs`` and ``erm_runs`` map a seed (str) to a run."""
  out: dict[str, Any] = {"seeds": sorted(int(s) for s in runs)}
  for key in ("test_acc", "val_acc", "train_loss", "train_acc", "hessian_top_eigenvalue",
              "perturb_increase"):
    m, s = mean_std([r[key] for r in runs.values()])
    out[key] = {"mean": m, "std": s}
  if erm_runs is not None:
    common = sorted(set(runs) & set(erm_runs), key=int)
    out["test_acc_minus_erm"] = paired_ci([runs[s]["test_acc"] for s in common],
                                          [erm_runs[s]["test_acc"] for s in common])
  return out
