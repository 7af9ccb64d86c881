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


def ratio_ci(x, y, level: float = 0.95) -> tuple[float, float]:
  """Fieller's interval for ``mean(x) / mean(y)`` with ``x``, ``y`` paired by position.

  The set of ratios ``r`` for which a paired t-test of ``x - r y`` does not reject mean 0 at
  ``level``: ``(lo, hi)``, or ``(-inf, inf)`` when it is not a bounded interval (``mean(y)``
  is not clearly away from 0, so the ratio is not pinned down).
  """
  import scipy.stats  # pylint: disable=g-import-not-at-top

  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  n = len(x)
  if n < 2:
    return float("-inf"), float("inf")
  t2 = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1)) ** 2 / n
  cov = np.cov(x, y, ddof=1)
  mx, my = float(x.mean()), float(y.mean())
  # (mx - r my)^2 <= t2 * var(x - r y): a r^2 + b r + c <= 0.
  a = my * my - t2 * cov[1, 1]
  b = -2.0 * (mx * my - t2 * cov[0, 1])
  c = mx * mx - t2 * cov[0, 0]
  disc = b * b - 4 * a * c
  if a <= 0 or disc < 0:
    return float("-inf"), float("inf")
  root = math.sqrt(disc)
  return (-b - root) / (2 * a), (-b + root) / (2 * a)


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
