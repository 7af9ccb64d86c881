"""What the study runs: settings (a table's rows), training configurations, the presets, and the
final table's rows chosen from the sweep by validation accuracy."""

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Setting:
  """One optimiser configuration (a row of a table).

  The fields keep the names the published JSON holds (amp_optax 0.1's words); the runner
  (:func:`~benchmarks.study.runner.make_tx`) builds the 0.2 optimiser from them.
  """

  method: str  # "erm", "amp" or "sam"
  epsilon: float = 0.0
  norm: str = "per_tensor"
  radius: str = "absolute"  # "relative": amp(..., relative=True)
  inner_lr: float = 1.0
  # The cheaper step: ascend on every ascent_every-th step only, decided in Python
  # (tx.update(..., ascend=step % k == 0)); between="reuse": amp(..., reuse_correction=True).
  ascent_every: int = 1
  between: str = "clean"
  rho: float = 0.0
  # How 0.1 ran the cheaper step: "cond" (the library's lax.cond, amp(ascent_every=k); only the
  # study_final step-time rows without "(python)" were timed so) or "python" (two jits, every
  # trained row). 0.2 has only the Python form; both values build it.
  dispatch: str = "cond"
  # AMP at ERM's cost (issue 16), with the AMP row's epsilon, norm and radius:
  # "momentum": drop_in_amp(ascent="momentum"), one gradient per step;
  # "drop-in": drop_in_amp(ascent="gradient", K=1) in a plain loop, successive batches: an
  #   ascent call and a descent call per step, each on the next batch;
  # "late": ERM, then full AMP for the last LATE_FRACTION of the steps (update(..., ascend=)).
  variant: str = ""
  # Grouped ascent (issue 17): the batch in G groups, each with its own perturbation (SAM's
  # "m-sharpness"); BatchNorm per group (ghost batch norm). ERM with G > 1 is the same ghost-BN
  # step without an ascent (what grouped AMP is at epsilon 0); SAM with G > 1 is
  # grouped_amp(rho, num_groups=G, inner_lr=SAM_INNER_LR, norm="global"): each group's step to
  # the sphere along its own gradient, SAM's perturbation.
  num_groups: int = 1

  @property
  def label(self) -> str:
    group = f" G={self.num_groups}" if self.num_groups > 1 else ""
    if self.method == "erm":
      return f"ERM ghost-BN{group}" if group else "ERM"
    if self.method == "sam":
      return f"SAM rho={self.rho:g}{group}"
    s = f"AMP {self.radius[:3]} {self.norm} eps={self.epsilon:g}"
    if self.inner_lr != 1.0:  # study-cheap2: inner_lr = SAM_INNER_LR puts the step on the sphere
      s += " sphere" if self.inner_lr == SAM_INNER_LR else f" inner_lr={self.inner_lr:g}"
    if self.ascent_every > 1:
      s += f" every={self.ascent_every} {self.between}"
      if self.dispatch == "python":
        s += " (python)"
    if self.variant:
      s += " " + VARIANT_LABELS[self.variant]
    return s + group

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Config:
  """A training configuration: model, data and schedule."""

  model: str
  augment: bool
  train_size: int
  val_size: int
  epochs: int
  batch_size: int = 128
  lr: float = 0.05
  weight_decay: float = 5e-4

  @property
  def label(self) -> str:
    return f"{self.model} {'aug' if self.augment else 'noaug'} n={self.train_size}"



VARIANTS = ("momentum", "drop-in", "late")
LATE_FRACTION = 0.25  # "late": AMP on the last quarter of the steps, ERM before.
# study-cheap2 (issue 25) adds: "late10" (AMP on the last 10% of the steps), "momentum+" (the
# momentum direction with the other sign: theta + rho * m/|m|; the library's "momentum" is
# theta - rho * m/|m|, Momentum-SAM's), and "random" (a random direction on the sphere of
# radius epsilon each step, one extra forward/backward like AMP: a control).
LATE_FRACTIONS = {"late": LATE_FRACTION, "late10": 0.10}
VARIANT_LABELS = {"momentum": "momentum ascent (drop-in)",
                  "drop-in": "drop-in K=1 successive batches",
                  "late": f"last {100 * LATE_FRACTION:g}% of steps only",
                  "late10": f"last {100 * LATE_FRACTIONS['late10']:g}% of steps only",
                  "momentum+": "momentum ascent +m (theta + rho m/|m|)",
                  "random": "random direction (control)",
                  "random1": "random direction, one pass (drop-in)"}
# Drop-in style: the step holds theta + Delta.
PLAIN_VARIANTS = ("momentum", "momentum+", "drop-in", "random1")


def calls_per_step(setting: Setting) -> int:
  """Train-step calls (and batches) per descent step: 2 for the drop-in gradient ascent."""
  return 2 if setting.variant == "drop-in" else 1


SWEEP_SEEDS = (100, 101)  # two seeds (CPU budget); not the final table's: less selection bias.
FINAL_SEEDS = (0, 1, 2, 3, 4)
SWEEP_GRID = {
    ("absolute", "per_tensor"): (0.02, 0.05, 0.2, 0.5),
    ("absolute", "global"): (0.03, 0.1, 0.3, 1.0),
    ("relative", "per_tensor"): (0.003, 0.01, 0.03, 0.1),
    ("relative", "global"): (0.003, 0.01, 0.03, 0.1),
}
SAM_RHOS = (0.05, 0.2)
PAPER = Setting("amp", epsilon=0.5, norm="per_tensor", radius="absolute")
FALLBACK_CHOICE = {"amp": Setting("amp", epsilon=0.03, norm="per_tensor", radius="relative"),
                   "sam": Setting("sam", rho=0.05)}

_REAL = dict(models=("small", "mid"), train_size=1000, val_size=500, test_size=2000,
             epochs=None, batch_size=100, hessian_iters=6, perturb_samples=6,
             sharpness_batch=128)
# Grouped ascent (issue 17) at batch 100: m = 25 (a quarter of the batch) and m = 5 (1/20: the
# divisor of 100 nearest to 1/16; batch 100 is kept so that the m = whole-batch rows are
# study_final's).
GROUPS = (4, 20)
GROUPED_SAM_RHOS = (0.01, 0.02, *SAM_RHOS)
SAM_INNER_LR = 1e6  # inner_lr * ||g|| >= rho: amp's step lands on the sphere, as SAM's does.
PRESETS: dict[str, dict[str, Any]] = {
    "study-sweep": dict(_REAL, augments=(False,), seeds=SWEEP_SEEDS),
    "study-final": dict(_REAL, augments=(False, True), seeds=FINAL_SEEDS),
    # AMP at ERM's cost (issue 16): no augmentation (where AMP helps), the final table's seeds.
    "study-cheap": dict(_REAL, augments=(False,), seeds=FINAL_SEEDS),
    # Grouped ascent (issue 17): epsilon and rho re-chosen per G on validation (two seeds, the
    # study_final AMP row's norm and radius), then 5 paired seeds with a ghost-BN ERM control.
    "study-grouped-sweep": dict(_REAL, augments=(False,), seeds=SWEEP_SEEDS, groups=GROUPS),
    "study-grouped": dict(_REAL, augments=(False,), seeds=FINAL_SEEDS, groups=GROUPS),
    # A radius per cheap variant (issue 25): each variant's epsilon on the sphere chosen on
    # validation over its own grid (multiples of study_final's AMP epsilon), then 5 paired seeds.
    "study-cheap2-sweep": dict(_REAL, augments=(False,), seeds=(100,)),
    "study-cheap2": dict(_REAL, augments=(False,), seeds=FINAL_SEEDS),
    "study-smoke": dict(models=("micro",), augments=(False, True), train_size=96, val_size=32,
                        test_size=64, epochs=2, seeds=(0, 1), hessian_iters=2,
                        perturb_samples=2, sharpness_batch=32, batch_size=32, groups=(4,)),
}
# Epochs per (model, augment): long enough that ERM's training loss gets near zero without
# augmentation (measured on the 1,000-image set), the same with it.
EPOCHS = {("small", False): 15, ("small", True): 15, ("mid", False): 12, ("mid", True): 12,
          ("tiny", False): 40, ("tiny", True): 40, ("micro", False): 2, ("micro", True): 2}


def sweep_settings(smoke: bool) -> list[Setting]:
  settings = [Setting("erm")]
  for (radius, norm), eps in SWEEP_GRID.items():
    for e in (eps[:1] if smoke else eps):
      settings.append(Setting("amp", epsilon=e, norm=norm, radius=radius))
  if PAPER not in settings:
    settings.append(PAPER)
  settings += [Setting("sam", rho=r) for r in (SAM_RHOS[:1] if smoke else SAM_RHOS)]
  return settings


def choose_from_sweep(sweep: dict[str, Any] | None, model: str) -> tuple[dict[str, Setting], str]:
  """Best AMP setting and SAM rho for ``model`` by mean validation accuracy in the sweep."""
  if sweep is None:
    return dict(FALLBACK_CHOICE), "fallback (no sweep results)"
  best: dict[str, tuple[float, Setting]] = {}
  for group in sweep["groups"]:
    if group["config"]["model"] != model:
      continue
    for row in group["rows"]:
      s = Setting(**row["setting"])
      if s.method == "erm" or not row["runs"]:
        continue
      val = float(np.mean([r["val_acc"] for r in row["runs"].values()]))
      if s.method not in best or val > best[s.method][0]:
        best[s.method] = (val, s)
  if set(best) != {"amp", "sam"}:
    return dict(FALLBACK_CHOICE), "fallback (sweep lacks this model)"
  return {k: v[1] for k, v in best.items()}, "best validation accuracy in the sweep"


def final_settings(choice: dict[str, Setting], smoke: bool) -> list[Setting]:
  amp_best = choice["amp"]
  settings = [Setting("erm"), amp_best, choice["sam"]]
  if PAPER not in settings:
    settings.append(PAPER)
  # Trained Python-dispatched (tx.update(..., ascend=)), the only form 0.2 has.
  for every in ((2,) if smoke else (2, 4)):
    for between in ("clean", "reuse"):
      settings.append(dataclasses.replace(amp_best, ascent_every=every, between=between,
                                          dispatch="python"))
  return settings


def timing_settings(choice: dict[str, Setting], smoke: bool) -> list[Setting]:
  """The final table's settings to time (the paper's row costs what any AMP row does).

  The published ``study_final.json`` also times 0.1's ``lax.cond`` form of the cheaper step
  (rows without "(python)"); 0.2 has no such form, so a new timing has only the Python one.
  """
  return [s for s in final_settings(choice, smoke) if s != PAPER]


def cheap_settings(amp_best: Setting) -> list[Setting]:
  """ERM, full AMP, and the four ways to AMP at (about) ERM's cost, all at AMP's epsilon."""
  base = dataclasses.replace(amp_best, ascent_every=1, between="clean", dispatch="cond",
                             variant="")
  return [Setting("erm"), base,
          *[dataclasses.replace(base, variant=v) for v in VARIANTS],
          dataclasses.replace(base, ascent_every=8, between="reuse", dispatch="python")]



def grouped_sweep_settings(amp_choice: Setting, groups: tuple[int, ...],
                           smoke: bool) -> list[Setting]:
  """Per G: AMP over the sweep grid of ``amp_choice``'s (radius, norm), and SAM's rhos."""
  grid = SWEEP_GRID[(amp_choice.radius, amp_choice.norm)]
  # Two x3 steps below the ungrouped grid: a group's own gradient is noisier and larger than
  # the batch's, so the best radius is smaller (validation chose the lowest point of the grid
  # with one step added, on mid).
  grid = (float(f"{grid[0] / 9:.1g}"), float(f"{grid[0] / 3:.1g}"), *grid)
  settings = []
  for g in groups:
    settings += [Setting("amp", epsilon=e, norm=amp_choice.norm, radius=amp_choice.radius,
                         num_groups=g) for e in (grid[:2] if smoke else grid)]
    settings += [Setting("sam", rho=r, num_groups=g) for r in (GROUPED_SAM_RHOS[:1] if smoke
                                                               else GROUPED_SAM_RHOS)]
  return settings


def choose_grouped(sweep: dict[str, Any] | None, model: str,
                   groups: int) -> tuple[dict[str, Setting], str] | None:
  """Best AMP epsilon and SAM rho at ``groups`` by mean validation accuracy (None: no rows)."""
  if sweep is None:
    return None
  best: dict[str, tuple[float, Setting]] = {}
  seeds: set[str] = set()
  for group in sweep["groups"]:
    if group["config"]["model"] != model:
      continue
    for row in group["rows"]:
      s = Setting(**row["setting"])
      if s.method == "erm" or s.num_groups != groups or not row["runs"]:
        continue
      seeds |= set(row["runs"])
      val = float(np.mean([r["val_acc"] for r in row["runs"].values()]))
      if s.method not in best or val > best[s.method][0]:
        best[s.method] = (val, s)
  if set(best) != {"amp", "sam"}:
    return None
  return ({k: v[1] for k, v in best.items()},
          f"best validation accuracy in study_grouped_sweep (seeds {', '.join(sorted(seeds))})")


def grouped_final_settings(whole: dict[str, Setting],
                           per_group: dict[int, dict[str, Setting]]) -> list[Setting]:
  """ERM, AMP and SAM at m = the whole batch (``whole``), then per G the ghost-BN ERM control
  and the AMP and SAM chosen for that G."""
  settings = [Setting("erm"), whole["amp"], whole["sam"]]
  for g, choice in per_group.items():
    settings += [Setting("erm", num_groups=g), choice["amp"], choice["sam"]]
  return settings


# study-cheap2 (issue 25): per cheap variant, (key, Setting fields, grid as multiples of full
# AMP's epsilon). Every variant runs on the sphere (inner_lr = SAM_INNER_LR: the projection puts
# Delta on the sphere of radius epsilon; with inner_lr = 1 the ball only caps, and every radius
# above |inner_lr g| or |m| gives the same run), in the norm and radius family of full AMP.
CHEAP2_VARIANTS: tuple[tuple[str, dict[str, Any], tuple[float, ...]], ...] = (
    # 1x added after the first sweep (small) chose the grid's lowest point, 3x, for both signs.
    ("momentum -m", dict(variant="momentum"), (1, 3, 10, 30)),
    ("momentum +m", dict(variant="momentum+"), (1, 3, 10, 30)),
    ("every=8 reuse", dict(ascent_every=8, between="reuse"), (1, 5, 30)),
    ("every=8 clean", dict(ascent_every=8, between="clean"), (1, 5, 30)),
    ("every=10 reuse", dict(ascent_every=10, between="reuse"), (1, 5, 30)),
    ("every=10 clean", dict(ascent_every=10, between="clean"), (1, 5, 30)),
    ("every=16 reuse", dict(ascent_every=16, between="reuse"), (1, 5, 30)),
    ("every=16 clean", dict(ascent_every=16, between="clean"), (1, 5, 30)),
    ("late 10%", dict(variant="late10"), (1, 3, 10)),
    ("late 25%", dict(variant="late"), (1, 3, 10)),
    ("random", dict(variant="random"), (1, 5, 30)),
    # The same random perturbation in one pass (drop-in: the step holds theta + Delta and takes
    # the gradient there only; BatchNorm statistics from that pass): ERM's cost. Added after
    # the sweep; its epsilon is the control's choice (the same perturbation).
    ("random, one pass", dict(variant="random1"), (1, 5, 30)),
)
SAME_CHOICE_AS = {"random, one pass": "random"}


def cheap2_key(setting: Setting) -> str | None:
  """The study-cheap2 variant a setting belongs to (None: ERM, full AMP, or none)."""
  for key, fields, _ in CHEAP2_VARIANTS:
    if setting.method == "amp" and setting.inner_lr == SAM_INNER_LR and all(
        getattr(setting, f) == v for f, v in fields.items()) and (
        "ascent_every" in fields or setting.ascent_every == 1) and (
        "variant" in fields or not setting.variant):
      return key
  return None


def cheap2_variant(amp_best: Setting, key: str, multiple: float) -> Setting:
  """Variant ``key`` at ``multiple`` x full AMP's epsilon (same norm and radius), on the sphere."""
  fields = dict(next(f for k, f, _ in CHEAP2_VARIANTS if k == key))
  base = dataclasses.replace(amp_best, ascent_every=1, between="clean", dispatch="python",
                             variant="", inner_lr=SAM_INNER_LR)
  eps = float(f"{amp_best.epsilon * multiple:.3g}")
  return dataclasses.replace(base, epsilon=eps, **fields)


def cheap2_sweep_settings(amp_best: Setting, smoke: bool) -> list[Setting]:
  """ERM and full AMP (references), then each variant over its grid."""
  full = dataclasses.replace(amp_best, ascent_every=1, between="clean", dispatch="cond",
                             variant="")
  settings = [Setting("erm"), full]
  for key, _, grid in CHEAP2_VARIANTS:
    if smoke and key not in SMOKE_CHEAP2:
      continue
    settings += [cheap2_variant(amp_best, key, m) for m in (grid[::2] if smoke else grid)]
  return settings


SMOKE_CHEAP2 = ("momentum -m", "momentum +m", "every=8 reuse", "late 10%", "random")


def choose_cheap2(sweep: dict[str, Any] | None, model: str) -> dict[str, dict[str, Any]]:
  """Per variant: its grid with the mean validation accuracy per epsilon, and the epsilon with
  the best one (``{key: {"setting": ..., "grid": [[eps, val, n], ...]}}``)."""
  out: dict[str, dict[str, Any]] = {}
  if sweep is None:
    return out
  for group in sweep["groups"]:
    if group["config"]["model"] != model or group["config"]["augment"]:
      continue
    for row in group["rows"]:
      s = Setting(**row["setting"])
      key = cheap2_key(s)
      if key is None or not row["runs"]:
        continue
      val = float(np.mean([r["val_acc"] for r in row["runs"].values()]))
      entry = out.setdefault(key, {"grid": []})
      entry["grid"].append([s.epsilon, val, len(row["runs"])])
      if "val" not in entry or val > entry["val"]:
        entry.update(val=val, setting=s.as_dict())
  for entry in out.values():
    entry["grid"].sort()
  for key, source in SAME_CHOICE_AS.items():
    if key not in out and source in out:
      fields = next(f for k, f, _ in CHEAP2_VARIANTS if k == key)
      out[key] = dict(out[source], from_variant=source, setting=dataclasses.replace(
          Setting(**out[source]["setting"]), **fields).as_dict())
  return out


def cheap2_final_settings(amp_best: Setting, chosen: dict[str, dict[str, Any]],
                          smoke: bool = False) -> list[Setting]:
  """ERM, full AMP, and each variant at its chosen epsilon (in CHEAP2_VARIANTS' order)."""
  full = dataclasses.replace(amp_best, ascent_every=1, between="clean", dispatch="cond",
                             variant="")
  settings = [Setting("erm"), full]
  for key, _, _ in CHEAP2_VARIANTS:
    if key in chosen:
      settings.append(Setting(**chosen[key]["setting"]))
  return settings
