"""The markdown of a preset's results: validation choices with their grid, and the final table
with paired 95 % t-intervals (AMP - ERM, SAM - ERM, AMP(m) - AMP(B))."""

from typing import Any

import numpy as np

from benchmarks.evidence import presets
from benchmarks.study.stats import paired_ci


def _pts(ci: dict[str, Any]) -> str:
  """A paired interval in points: mean [lo, hi] (half-width)."""
  if ci["n"] < 2:
    return "—"
  half = (ci["hi"] - ci["lo"]) / 2
  return (f"{100 * ci['mean']:+.2f} [{100 * ci['lo']:+.2f}, {100 * ci['hi']:+.2f}] "
          f"(±{100 * half:.2f})")


def _final_seeds(runs: dict[str, Any], rows: list[presets.Row], seeds) -> list[int]:
  """The seeds for which every final row has finished (the paired set)."""
  return [s for s in seeds if all(presets.run_key("final", r, s) in runs for r in rows)]


def _acc(runs, row, seeds, key="test_acc"):
  return [runs[presets.run_key("final", row, s)][key] for s in seeds]


def final_table(p: presets.Preset, result: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
  """Markdown lines of the final table and its numbers (``{label: {...}}``)."""
  choice = {k: presets.Row(**v["row"]) for k, v in result["choice"].items()}
  rows = presets.final_rows(p, choice)
  runs = result["runs"]
  seeds = _final_seeds(runs, rows, p.final_seeds)
  if not seeds:
    return ["No final seed has finished every row yet."], {}
  erm, amp_b = rows[0], choice["amp G=1"]
  lines = [f"Paired seeds: {seeds} (the same initialisation and batch order in every row). "
           f"Test accuracy on all {runs[presets.run_key('final', erm, seeds[0])]['test_images']}"
           " test images; differences in points with 95 % paired t-intervals (half-width).", "",
           "| row | m | test acc % (mean ± sd) | − ERM | − AMP(m=B) | train loss | val acc % "
           "| s / run |", "|---|---|---|---|---|---|---|---|"]
  numbers = {}
  for row in rows:
    acc = _acc(runs, row, seeds)
    vs_erm = paired_ci(acc, _acc(runs, erm, seeds)) if row != erm else None
    vs_b = (paired_ci(acc, _acc(runs, amp_b, seeds))
            if row.method == "amp" and row != amp_b else None)
    m = p.batch_size // row.groups
    numbers[row.label] = {"m": m, "test_acc": acc, "minus_erm": vs_erm, "minus_amp_b": vs_b}
    lines.append(
        f"| {row.label} | {m if row.method != 'erm' else '—'} | {100 * np.mean(acc):.2f} ± "
        f"{100 * np.std(acc, ddof=1):.2f} | {_pts(vs_erm) if vs_erm else '—'} | "
        f"{_pts(vs_b) if vs_b else '—'} | {np.mean(_acc(runs, row, seeds, 'train_loss')):.4f} | "
        f"{100 * np.mean(_acc(runs, row, seeds, 'val_acc')):.2f} | "
        f"{np.mean(_acc(runs, row, seeds, 'wall_s')):.0f} |")
  return lines, numbers


def _by_label(runs: dict[str, Any], label: str, seeds: list[int]) -> list[float] | None:
  """Test accuracies of the row ``label`` on ``seeds``, from the final or the extra runs."""
  out = []
  for s in seeds:
    found = [runs[k]["test_acc"] for k in (f"final|{label}|{s}", f"extra|{label}|{s}")
             if k in runs]
    if not found:
      return None
    out.append(found[0])
  return out


def fixed_eps_table(p: presets.Preset, result: dict[str, Any]) -> list[str]:
  """AMP at one epsilon for every m: the extra rows beside the final ones of that epsilon, so
  that AMP(m) - AMP(B) compares groupings alone (these epsilons were not all chosen on
  validation)."""
  runs = result["runs"]
  extra = {r["label"]: presets.Row(**r["row"]) for r in runs.values() if r["phase"] == "extra"}
  if not extra:
    return []
  seeds = [s for s in p.final_seeds  # the seeds every extra row and ERM have finished
           if all(_by_label(runs, label, [s]) for label in ["ERM", *extra])]
  erm = _by_label(runs, "ERM", seeds)
  lines = ["", "## The same epsilon at every m (extra rows, not chosen on validation)", "",
           "| row | m | test acc % | − ERM | − AMP(m=B) at this epsilon |", "|---|---|---|---|---|"]
  radii = sorted({r.radius for r in extra.values() if r.method == "amp"})
  for eps in radii:
    base = presets.Row("amp", eps).label
    for g in p.groups:
      row = presets.Row("amp", eps, g)
      acc = _by_label(runs, row.label, seeds)
      if acc is None:
        continue
      b = _by_label(runs, base, seeds)
      vs_b = _pts(paired_ci(acc, b)) if b is not None and g > 1 else "—"
      lines.append(f"| {row.label} | {p.batch_size // g} | {100 * np.mean(acc):.2f} | "
                   f"{_pts(paired_ci(acc, erm))} | {vs_b} |")
  return lines + ["", f"Seeds {seeds}."]


def bn_policy_table(p: presets.Preset, result: dict[str, Any]) -> list[str]:
  """Each final row's test accuracy under each running-statistics policy (one run, evaluated
  three ways, so the pairing is exact), and each policy against the helpers' one."""
  if not p.batchnorm:
    return []
  choice = {k: presets.Row(**v["row"]) for k, v in result["choice"].items()}
  rows = presets.final_rows(p, choice)
  runs = result["runs"]
  seeds = _final_seeds(runs, rows, p.final_seeds)
  if not seeds:
    return []
  base, others = train_policies()[0], train_policies()[1:]

  def acc(row: presets.Row, policy: str) -> list[float]:
    return [runs[presets.run_key("final", row, s)]["bn_policies"][policy]["test_acc"]
            for s in seeds]

  lines = ["", "## BatchNorm running statistics: the policy (same runs, evaluated three ways)",
           "", f"`{base}` (the helpers' policy, and the accuracies above): the mean over groups "
           "of each group's mean and biased variance; `unbiased`: that variance times m / (m - 1);"
           " `whole_batch`: plus the variance of the group means (the whole batch's variance). "
           f"Seeds {seeds}; test accuracy, and each policy minus `{base}` in points.", "",
           "| row | m | " + " | ".join(f"`{q}` %" for q in (base, *others)) + " | "
           + " | ".join(f"`{q}` − `{base}`" for q in others) + " |",
           "|---|---|" + "---|" * (1 + 2 * len(others))]
  for row in rows:
    cells = [f"{100 * np.mean(acc(row, q)):.2f}" for q in (base, *others)]
    cells += [_pts(paired_ci(acc(row, q), acc(row, base))) for q in others]
    m = p.batch_size // row.groups
    lines.append(f"| {row.label} | {m} | " + " | ".join(cells) + " |")
  return lines


def ghost_table(p: presets.Preset, result: dict[str, Any]) -> list[str]:
  """With BatchNorm, grouped AMP normalises each group alone (ghost BatchNorm): each chosen
  grouped row against ERM with the same groups and epsilon 0 (an extra row), which separates
  the ascent from the normalisation."""
  if not p.batchnorm:
    return []
  runs = result["runs"]
  lines = []
  for c in result["choice"].values():
    row = presets.Row(**c["row"])
    ghost = presets.Row("amp", 0.0, row.groups)
    if row.method != "amp" or row.groups == 1:
      continue
    seeds = [s for s in p.final_seeds if _by_label(runs, row.label, [s])
             and _by_label(runs, ghost.label, [s]) and _by_label(runs, "ERM", [s])]
    if len(seeds) < 2:
      continue
    acc, g, erm = (_by_label(runs, r, seeds) for r in (row.label, ghost.label, "ERM"))
    lines.append(f"| {row.label} | {p.batch_size // row.groups} | {100 * np.mean(g):.2f} | "
                 f"{_pts(paired_ci(g, erm))} | {_pts(paired_ci(acc, g))} | {len(seeds)} |")
  if not lines:
    return []
  return ["", "## The ascent against ghost BatchNorm alone", "",
          "Ghost-BN ERM: `grouped_amp(0, num_groups=G)`, ERM whose BatchNorm normalises each group"
          " of m alone, as the grouped rows do. Test accuracy; differences in points.", "",
          "| grouped row | m | ghost-BN ERM % | ghost-BN ERM − ERM | row − ghost-BN ERM | seeds |",
          "|---|---|---|---|---|---|", *lines]


def train_policies() -> tuple[str, ...]:
  from benchmarks.evidence.train import POLICIES  # train imports jax-heavy code; report need not
  return POLICIES


def markdown(name: str, p: presets.Preset, result: dict[str, Any]) -> str:
  runs = result["runs"]
  hidden = "-".join(str(h) for h in p.hidden)
  out = [f"# Evidence: preset `{name}`", "",
         f"`python -m benchmarks.evidence --preset {name}`. "
         + ("Synthetic images (smoke). " if p.synthetic else "CIFAR-10 (JPEG copy). ")
         + f"{p.train_size} training images, no augmentation; validation: the next {p.val_size} "
         f"images of the training pool (the only thing choices are made on); test: "
         f"{p.test_size} images. "
         + (f"Images average-pooled {p.downsample}x{p.downsample}. " if p.downsample > 1 else "")
         + f"MLP {p.input_dim}-{hidden}-10 (ReLU"
         + (f", BatchNorm before each ReLU, running-statistics momentum {p.bn_momentum}"
            if p.batchnorm else "") + f"), batch {p.batch_size}, "
         f"{p.epochs} epochs, SGD Nesterov 0.9, lr {p.lr} cosine, decoupled weight decay "
         f"{p.weight_decay} after the ascent. AMP: `amp(eps, norm=\"global\")` (K = 1, inner_lr "
         "1); grouped: `grouped_amp(eps, num_groups=G, norm=\"global\")` with "
         "`grouped_value_and_grad`, m = B / G; SAM: `amp(rho, inner_lr=1e6, norm=\"global\")` "
         "(the step lands on the sphere).", ""]
  out += ["## Machine", ""]
  out += [f"- {m['platform']}, {m['cpu_count']} CPUs ({m['affinity']} usable by the process), "
          f"Python {m['python']}, jax {m['jax']} ({m['backend']})" for m in result["machines"]]
  sweep = [r for r in runs.values() if r["phase"] == "sweep"]
  final = [r for r in runs.values() if r["phase"] != "sweep"]
  out += ["", f"Wall time: sweep {sum(r['wall_s'] for r in sweep) / 60:.1f} min "
          f"({len(sweep)} runs, seeds {list(p.sweep_seeds)}), final "
          f"{sum(r['wall_s'] for r in final) / 60:.1f} min ({len(final)} runs, seeds "
          f"{list(p.final_seeds)}).", ""]
  if "choice" in result:
    erm_val = np.mean([runs[presets.run_key("sweep", presets.Row("erm"), s)]["val_acc"]
                       for s in p.sweep_seeds])
    out += ["## Validation choices", "",
            f"Mean validation accuracy over the sweep seeds {list(p.sweep_seeds)}; ERM: "
            f"{100 * erm_val:.2f} %.",
            "", "| family | grid: val acc % | chosen |", "|---|---|---|"]
    for fam, c in result["choice"].items():
      grid = ", ".join(f"{k}: {100 * v:.2f}" for k, v in c["val"].items())
      out.append(f"| {fam} (m = {p.batch_size // c['row']['groups']}) | {grid} | {c['label']} |")
    lines, _ = final_table(p, result)
    out += ["", "## Final (paired seeds)", "", *lines, *fixed_eps_table(p, result),
            *ghost_table(p, result), *bn_policy_table(p, result)]
  else:
    out += ["The sweep has not finished."]
  return "\n".join(out) + "\n"
