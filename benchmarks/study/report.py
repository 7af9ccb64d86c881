"""The study's tables as markdown (with the AMP-vs-SAM, cheaper-step and transfer summaries) and
its plots."""

from typing import Any

import numpy as np

from benchmarks.study.presets import PAPER
from benchmarks.study.presets import SWEEP_GRID
from benchmarks.study.presets import Setting
from benchmarks.study.presets import cheap2_key
from benchmarks.study.stats import paired_ci
from benchmarks.study.stats import ratio_ci


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def _group_order(group: dict[str, Any]) -> tuple[Any, ...]:
  c = group["config"]
  return (c["model"] != "small", c["model"], c["augment"])


def _row_order(row: dict[str, Any]) -> tuple[Any, ...]:
  st = row["setting"]
  return (st.get("num_groups", 1), ("erm", "amp", "sam").index(st["method"]), st["ascent_every"],
          st["between"],
          st["radius"], st["norm"], st["epsilon"], st["rho"], st.get("dispatch", "cond"),
          st.get("variant", ""))


def markdown(result: dict[str, Any]) -> str:
  lines = [f"# {result['preset']}: {result['data']}, {result['train_size']} training images "
           f"(+{result['val_size']} validation), {result['test_size']} test images", ""]
  if result.get("choices"):
    for m, c in result["choices"].items():
      lines.append(f"- {m}: AMP = {Setting(**c['amp']).label}, SAM = "
                   f"{Setting(**c['sam']).label} ({c['how']})")
    lines.append("")
  for m, per_group in result.get("grouped_choices", {}).items():
    for g, c in sorted(per_group.items(), key=lambda kv: int(kv[0])):
      lines.append(f"- {m}, G={g}: AMP = {Setting(**c['amp']).label}, SAM = "
                   f"{Setting(**c['sam']).label} ({c['how']})")
  if result.get("grouped_choices"):
    lines.append("")
  for group in sorted(result["groups"], key=_group_order):
    c = group["config"]
    lines += [f"## {c['model']}, {'crop+flip augmentation' if c['augment'] else 'no augmentation'}"
              f", {c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']} (cosine)", "",
              "| setting | seeds | test acc % (mean ± std) | Δ test vs ERM, paired [95% CI] | "
              "val acc % | final train loss | top Hessian eig | loss incr. @5% |",
              "|---|---|---|---|---|---|---|---|"]
    for row in sorted(group["rows"], key=_row_order):
      s = row.get("summary")
      if not s:
        continue
      d = s.get("test_acc_minus_erm")
      diff = "—"
      if d and d["n"] >= 2:
        diff = f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
      elif d and d["n"] == 1:
        diff = f"{100 * d['mean']:+.2f}"
      spread = f" ± {_pct(s['test_acc']['std'])}" if len(s["seeds"]) > 1 else ""
      lines.append(
          f"| {row['label']} | {len(s['seeds'])} | {_pct(s['test_acc']['mean'])}{spread} | "
          f"{diff} | {_pct(s['val_acc']['mean'])} | "
          f"{s['train_loss']['mean']:.4f} | {s['hessian_top_eigenvalue']['mean']:.3g} | "
          f"{s['perturb_increase']['mean']:.3g} |")
    lines.append("")
  if result["preset"] == "study-sweep":
    lines += transfer_lines(result)
  elif result["preset"] == "study-grouped-sweep":
    pass  # per G, the rows above; the grouped table chooses from them.
  elif result["preset"] in ("study-cheap2", "study-cheap2-sweep") or "cheap2_choices" in result or (
      any(cheap2_key(Setting(**r["setting"])) for g in result["groups"] for r in g["rows"])):
    lines += cheap2_lines(result)
  elif any(r["setting"].get("num_groups", 1) > 1 for g in result["groups"] for r in g["rows"]):
    lines += grouped_lines(result)
  else:
    lines += comparison_lines(result)
    lines += cheap_lines(result)
  for key, what in (("step_time_all", "first timing, every row"),
                    ("step_time", "interleaved in one process")):
    if not result.get(key):
      continue
    lines += [f"## Step time ({what}, batch {result.get('step_time_batch')}"
              f", {result['machine']['cpu_count']} CPU cores shared with other jobs)", "",
              "| model | setting | ms/step (median) | ratio to ERM |", "|---|---|---|---|"]
    for m, rows in sorted(result[key].items(), key=lambda kv: (kv[0] != "small", kv[0])):
      for r in rows:
        lines.append(f"| {m} | {r['label']} | {r['ms_median']:.1f} | {r['ratio_vs_erm']:.2f} |")
    lines.append("")
  return "\n".join(lines)


def comparison_lines(result: dict[str, Any]) -> list[str]:
  """AMP vs SAM paired by seed, and the cheaper step's share of AMP's gain and its cost."""
  lines = ["## AMP vs SAM, paired by seed (test accuracy, points)", "",
           "| model, data | AMP − SAM [95% CI] | seeds |", "|---|---|---|"]
  cheap = ["## The cheaper step: share of AMP's gain over ERM, and cost", "",
           "Gain: mean paired test-accuracy difference to ERM; share: the cheaper step's gain "
           "over full AMP's (same epsilon, same seeds). Step-time ratios to ERM from the table "
           "below (Python-dispatched, as trained / amp_optax 0.1's lax.cond form, where "
           "timed).", "",
           "| model | setting | gain (points) | share of AMP's gain | step time / ERM (python, "
           "cond) |", "|---|---|---|---|---|"]
  times = {}
  for model, rows in result.get("step_time", {}).items():
    for r in rows:
      st = r["setting"]
      times[(model, st["ascent_every"], st["between"], st.get("dispatch", "cond"),
             st["method"])] = r["ratio_vs_erm"]
  for g in result["groups"]:
    c = g["config"]
    rows = {r["label"]: r for r in g["rows"] if r["runs"]}
    amp = [r for r in rows.values() if r["setting"]["method"] == "amp"
           and r["setting"]["ascent_every"] == 1 and Setting(**r["setting"]) != PAPER
           and not r["setting"].get("variant")]
    sam = [r for r in rows.values() if r["setting"]["method"] == "sam"]
    erm = rows.get("ERM")
    where = f"{c['model']}, {'aug' if c['augment'] else 'no aug'}"
    for a in amp:
      for s_ in sam:
        if a["setting"].get("num_groups", 1) != s_["setting"].get("num_groups", 1):
          continue
        common = sorted(set(a["runs"]) & set(s_["runs"]), key=int)
        d = paired_ci([a["runs"][k]["test_acc"] for k in common],
                      [s_["runs"][k]["test_acc"] for k in common])
        if d["n"] >= 2:
          lines.append(f"| {where}: {a['label']} vs {s_['label']} | {100 * d['mean']:+.2f} "
                       f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}] | {d['n']} |")
    if erm is None or len(amp) != 1:
      continue
    full = amp[0].get("summary", {}).get("test_acc_minus_erm")
    has_variants = any(r["setting"].get("variant") for r in rows.values())
    for r in rows.values():
      st = r["setting"]
      if st["method"] != "amp" or st["ascent_every"] == 1 or not full or has_variants:
        continue  # a study-cheap group: in its own section (cheap_lines).
      d = r["summary"]["test_acc_minus_erm"]
      share = d["mean"] / full["mean"] if full["mean"] > 0 else float("nan")
      t_py = times.get((c["model"], st["ascent_every"], st["between"], "python", "amp"))
      t_cond = times.get((c["model"], st["ascent_every"], st["between"], "cond", "amp"))
      cost = ", ".join("—" if t is None else f"{t:.2f}" for t in (t_py, t_cond))
      cheap.append(f"| {c['model']} | {r['label']} (n={d['n']}) | {100 * d['mean']:+.2f} | "
                   f"{100 * share:.0f}% (AMP: {100 * full['mean']:+.2f}) | {cost} |")
  out = []
  if len(lines) > 4:
    out += lines + [""]
  if len(cheap) > 6:
    out += cheap + [""]
  return out


def _step_time_ratios(result: dict[str, Any]) -> dict[tuple[str, str], float]:
  """``(model, row label) -> step time / ERM's`` from the table's interleaved timing."""
  return {(m, r["label"]): r["ratio_vs_erm"] for m, rows in result.get("step_time", {}).items()
          for r in rows}


def grouped_lines(result: dict[str, Any]) -> list[str]:
  """Grouped ascent (issue 17): per method and m, the gain over ERM, the paired difference to
  the same method at m = the whole batch, and to ERM with the same ghost batch norm."""
  lines = ["## Grouped ascent (m-sharpness): gain per m, paired by seed", "",
           "m: examples per perturbation (batch / G). Each AMP epsilon and SAM rho is chosen on "
           "validation for its own m (the settings above). Gain: test accuracy − ERM's; vs m = "
           "batch: − the same method's at m = the whole batch; vs ghost-BN ERM: − ERM with "
           "BatchNorm statistics per group of m (what the grouped step is at epsilon 0, so "
           "this isolates the per-group ascent from the per-group statistics). Points, 95% "
           "t-intervals. Step time / ERM: the interleaved timing below.", "",
           "| model | method | m | setting | n | test acc % | gain vs ERM | vs m = batch | "
           "vs ghost-BN ERM, same m | step time / ERM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  times = _step_time_ratios(result)
  n_rows = len(lines)
  for g in sorted(result["groups"], key=_group_order):
    c = g["config"]
    rows = [r for r in g["rows"] if r["runs"]]
    chosen = [result.get("choices", {}).get(c["model"], {}),
              *result.get("grouped_choices", {}).get(c["model"], {}).values()]
    labels = {Setting(**x[k]).label for x in chosen for k in ("amp", "sam") if k in x}
    by = {(r["setting"]["method"], r["setting"].get("num_groups", 1)): r for r in rows
          if r["setting"]["method"] == "erm" or r["label"] in labels}
    erm = by.get(("erm", 1))
    if erm is None:
      continue
    order = sorted(by, key=lambda k: (("erm", "amp", "sam").index(k[0]), k[1]))
    for method, groups in order:
      r = by[(method, groups)]
      refs = [erm, by.get((method, 1)), by.get(("erm", groups))]
      common = sorted(set(r["runs"]).intersection(*[x["runs"] for x in refs if x]), key=int)
      if not common:
        continue
      acc = [r["runs"][k]["test_acc"] for k in common]

      def diff(ref, skip, acc=acc, common=common):
        if ref is None or skip:
          return "—"
        return _ci(paired_ci(acc, [ref["runs"][k]["test_acc"] for k in common]))

      step = times.get((c["model"], r["label"]))
      lines.append(
          f"| {c['model']} | {method.upper()} | {c['batch_size'] // groups} | {r['label']} | "
          f"{len(common)} | {100 * np.mean(acc):.2f} | {diff(erm, r is erm)} | "
          f"{diff(refs[1], groups == 1 or method == 'erm')} | "
          f"{diff(refs[2], groups == 1 or method == 'erm')} | "
          f"{'—' if step is None else f'{step:.2f}'} |")
  return lines + [""] if len(lines) > n_rows else []


def _ci(d: dict[str, Any], scale: float = 100.0) -> str:
  if d["n"] < 2:
    return f"{scale * d['mean']:+.2f}" if d["n"] else "—"
  return f"{scale * d['mean']:+.2f} [{scale * d['lo']:+.2f}, {scale * d['hi']:+.2f}]"


def _paired_test_accuracies(row: dict[str, Any], erm: dict[str, Any], amp: dict[str, Any]):
  """The seeds all three rows ran, and each row's test accuracies on them, in seed order."""
  common = sorted(set(row["runs"]) & set(erm["runs"]) & set(amp["runs"]), key=int)
  return (common, *(np.asarray([x["runs"][k]["test_acc"] for k in common])
                    for x in (row, erm, amp)))


def _kept_of_amp_gain(acc: np.ndarray, erm: np.ndarray, amp: np.ndarray) -> tuple[str, str]:
  """Per-seed test accuracies -> ("kept %" of full AMP's gain with its Fieller interval, the
  paired interval of gain - 0.8 * AMP's gain), as the tables print them."""
  lo, hi = ratio_ci(acc - erm, amp - erm)
  amp_gain = float(np.mean(amp - erm))
  ratio = float(np.mean(acc - erm)) / amp_gain if amp_gain else float("nan")
  kept = f"{100 * ratio:.0f}% " + (
      f"[{100 * lo:.0f}%, {100 * hi:.0f}%]" if np.isfinite(lo) and np.isfinite(hi)
      else "[unbounded]")
  return kept, _ci(paired_ci(list(acc - erm), list(0.8 * (amp - erm))))

def cheap_lines(result: dict[str, Any]) -> list[str]:
  """AMP at ERM's cost (study-cheap): each variant's gain over ERM, its difference to full AMP,
  the share of AMP's gain it keeps, and its step time against ERM, all paired by seed."""
  lines = ["## AMP at ERM's cost: gain kept relative to full AMP (same epsilon), and step time",
           "",
           "All paired by seed (same initialisation; the same data order except the drop-in "
           "gradient ascent's, which takes two batches per descent step). Gain: test accuracy − "
           "ERM's; vs AMP: − full AMP's (points, 95% t-interval). Kept: gain / AMP's gain, with "
           "a 95% Fieller interval (the ratios r for which a paired t-test does not reject "
           "gain − r·AMP gain = 0; 'unbounded' when AMP's own gain is not clearly above 0). "
           "≥80%?: the paired interval of gain − 0.8·AMP gain (above 0: keeps at least 80%; "
           "below 0: keeps less). Step time / ERM: interleaved timing below (late: derived, 0.75 "
           "ERM + 0.25 AMP); train time / ERM: the runs' own wall clock (mean of the per-seed "
           "ratios; on a shared machine, noisier).", "",
           "| model | setting | n | test acc % | gain vs ERM | vs full AMP | kept [95%] | "
           "≥80%? gain − 0.8·AMP gain | step time / ERM | train time / ERM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  times = _step_time_ratios(result)
  n_rows = len(lines)
  for g in sorted(result["groups"], key=_group_order):
    c = g["config"]
    rows = [r for r in g["rows"] if r["runs"]]
    erm = next((r for r in rows if r["setting"]["method"] == "erm"), None)
    amp = next((r for r in rows if r["setting"]["method"] == "amp"
                and r["setting"]["ascent_every"] == 1 and not r["setting"].get("variant")
                and Setting(**r["setting"]) != PAPER), None)
    variants = [r for r in rows if r["setting"]["method"] == "amp" and r is not amp
                and (r["setting"].get("variant") or r["setting"]["ascent_every"] > 1)]
    if erm is None or amp is None or not variants:
      continue
    for r in [amp] + sorted(variants, key=_row_order):
      common, acc, e, a = _paired_test_accuracies(r, erm, amp)
      if not common:
        continue
      gain = paired_ci(list(acc), list(e))
      if r is amp:
        vs_amp = kept = target = "—"
      else:
        vs_amp = _ci(paired_ci(list(acc), list(a)))
        kept, target = _kept_of_amp_gain(acc, e, a)
      t_ratio = [r["runs"][k]["train_seconds"] / erm["runs"][k]["train_seconds"]
                 for k in common]
      step = times.get((c["model"], r["label"]))
      lines.append(
          f"| {c['model']} | {r['label']} | {len(common)} | {100 * acc.mean():.2f} | "
          f"{_ci(gain)} | {vs_amp} | {kept} | {target} | "
          f"{'—' if step is None else f'{step:.2f}'} | {np.mean(t_ratio):.2f} |")
  return lines + [""] if len(lines) > n_rows else []


def _full_amp(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
  return next((r for r in rows if r["setting"]["method"] == "amp"
               and r["setting"]["ascent_every"] == 1 and not r["setting"].get("variant")
               and r["setting"].get("inner_lr", 1.0) == 1.0
               and Setting(**r["setting"]) != PAPER), None)


def _applied(row: dict[str, Any]) -> str:
  """Mean applied |Delta| over the last epoch (over seeds) / the sphere's radius there."""
  runs = [x for x in row["runs"].values() if x.get("delta_norm_last_epoch") is not None]
  if not runs:
    return "—"
  st = row["setting"]
  applied = float(np.mean([x["delta_norm_last_epoch"] for x in runs]))
  if st["norm"] != "global":
    return f"{applied:.3g}"
  radius = st["epsilon"] * (float(np.mean([x["param_norm"] for x in runs]))
                            if st["radius"] == "relative" else 1.0)
  return f"{applied:.3g} / {radius:.3g}"


def cheap2_lines(result: dict[str, Any]) -> list[str]:
  """A radius per cheap variant (issue 25): the sweep's grid per variant, or the table's gain,
  kept fraction of full AMP's gain and step time per variant at its chosen epsilon.

  Step time: ``step_time_all`` (a first interleaved timing of every row, kept when a second
  timing of a subset replaced ``step_time``) and ``step_time``."""
  times = _step_time_ratios(result)
  first = _step_time_ratios({"step_time": result.get("step_time_all", {})})
  lines: list[str] = []
  for g in sorted(result["groups"], key=_group_order):
    c = g["config"]
    rows = [r for r in g["rows"] if r["runs"]]
    erm = next((r for r in rows if r["setting"]["method"] == "erm"), None)
    amp = _full_amp(rows)
    if amp is None:
      continue
    eps0 = amp["setting"]["epsilon"]
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
      key = cheap2_key(Setting(**r["setting"]))
      if key is not None:
        by_key.setdefault(key, []).append(r)
    chosen = result.get("cheap2_choices", {}).get(c["model"])
    if chosen is None:  # the sweep: every grid point
      lines += [f"## {c['model']}: each variant over its own grid (multiples of full AMP's "
                f"epsilon {eps0:g}, {amp['setting']['radius']} {amp['setting']['norm']}; on "
                "the sphere: inner_lr = 1e6)", "",
                "Applied |Delta|: mean over the last epoch's perturbed steps (and seeds) / the "
                "sphere's radius (epsilon, or epsilon·|theta| for a relative radius). Bold: "
                "the best validation accuracy of the variant (its chosen epsilon).", "",
                "| variant | epsilon (x AMP's) | seeds | val acc % | test acc % | final train "
                "loss | applied abs(Delta) / radius |", "|---|---|---|---|---|---|---|"]
      for r in ([erm] if erm else []) + [amp]:
        s_ = r["summary"]
        lines.append(f"| {r['label']} (reference) | — | {len(s_['seeds'])} | "
                     f"{_pct(s_['val_acc']['mean'])} | {_pct(s_['test_acc']['mean'])} | "
                     f"{s_['train_loss']['mean']:.4f} | {_applied(r)} |")
      for key, rs in by_key.items():
        rs = sorted(rs, key=lambda r: r["setting"]["epsilon"])
        best = max(rs, key=lambda r: r["summary"]["val_acc"]["mean"])
        for r in rs:
          s_ = r["summary"]
          val = _pct(s_["val_acc"]["mean"])
          lines.append(f"| {key} | {r['setting']['epsilon']:g} "
                       f"({r['setting']['epsilon'] / eps0:.3g}x) | {len(s_['seeds'])} | "
                       f"{f'**{val}**' if r is best else val} | {_pct(s_['test_acc']['mean'])} "
                       f"| {s_['train_loss']['mean']:.4f} | {_applied(r)} |")
      lines.append("")
      continue
    if erm is None:
      continue
    lines += [f"## {c['model']}: AMP at ERM's cost, a radius chosen for each variant", "",
              "Grid: validation accuracy % per epsilon (x full AMP's epsilon "
              f"{eps0:g}, {amp['setting']['radius']} {amp['setting']['norm']}; seeds of the "
              "sweep); the chosen epsilon (best validation accuracy) in bold. Every variant on "
              "the sphere (inner_lr = 1e6). Applied |Delta|: mean over the last epoch's perturbed "
              "steps and the seeds / the sphere's radius (epsilon·|theta| for a relative "
              "radius). Gain: test accuracy − ERM's, paired by seed (points, 95% t-interval); "
              "kept: gain / full AMP's gain with a 95% Fieller interval; ≥80%?: the paired "
              "interval of gain − 0.8·AMP gain. Step time / ERM: the interleaved timing below "
              "(late: derived from the ERM and full AMP steps).", "",
              "| variant | grid: val acc % | chosen eps | n | applied abs(Delta) / radius | "
              "final train loss | test acc % | gain vs ERM | kept [95%] | ≥80%? gain − "
              "0.8·AMP gain | step time / ERM (all; subset) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [amp] + [rs[0] for rs in by_key.values()]:
      common, acc, e, a = _paired_test_accuracies(r, erm, amp)
      if not common:
        continue
      loss = np.mean([r["runs"][k]["train_loss"] for k in common])
      key = cheap2_key(Setting(**r["setting"]))
      if r is amp:
        name, grid, kept, target = "full AMP", "—", "—", "—"
      else:
        name = key
        entry = chosen.get(key, {})
        grid = ", ".join((f"**{x / eps0:.3g}x: {100 * v:.1f}**" if x == r["setting"]["epsilon"]
                          else f"{x / eps0:.3g}x: {100 * v:.1f}") for x, v, _ in
                         entry.get("grid", []))
        if entry.get("from_variant"):
          grid += f" ({entry['from_variant']}'s grid and choice)"
        kept, target = _kept_of_amp_gain(acc, e, a)
      steps = [t.get((c["model"], r["label"])) for t in (first, times)]
      step = "; ".join("—" if x is None else f"{x:.2f}" for x in steps)
      lines.append(
          f"| {name} | {grid} | {r['setting']['epsilon']:g} | {len(common)} | {_applied(r)} | "
          f"{loss:.4f} | {100 * acc.mean():.2f} | {_ci(paired_ci(list(acc), list(e)))} | "
          f"{kept} | {target} | {step} |")
    lines.append("")
  return lines


def transfer_lines(result: dict[str, Any]) -> list[str]:
  """Does a family's best epsilon on one model carry over to the other (no augmentation)?

  For each (radius, norm): the best epsilon of each model by validation accuracy, and the
  *transfer regret*: how much test accuracy each model loses when it uses the other model's
  best epsilon instead of its own (0 when the two agree).
  """
  acc: dict[tuple[str, str], dict[str, dict[float, tuple[float, float]]]] = {}
  models = []
  for g in result["groups"]:
    if g["config"]["augment"]:
      continue
    model = g["config"]["model"]
    models.append(model)
    for r in g["rows"]:
      st = r["setting"]
      if st["method"] != "amp" or st["ascent_every"] != 1 or not r["runs"]:
        continue
      runs = r["runs"].values()
      acc.setdefault((st["radius"], st["norm"]), {}).setdefault(model, {})[st["epsilon"]] = (
          float(np.mean([x["val_acc"] for x in runs])),
          float(np.mean([x["test_acc"] for x in runs])))
  if len(models) != 2:
    return []
  a, b = sorted(models, key=lambda m: (m != "small", m))
  lines = [f"## Does the best epsilon transfer between {a} and {b}? (no augmentation)", "",
           "Best epsilon per model by validation accuracy; regret: test accuracy (points) a "
           "model loses using the other model's best epsilon instead of its own.", "",
           f"| radius, norm | best eps {a} | best eps {b} | regret {a} | regret {b} | "
           f"sum |", "|---|---|---|---|---|---|"]
  for (radius, norm), per_model in acc.items():
    if set(per_model) != {a, b} or set(per_model[a]) != set(per_model[b]):
      continue  # the grid is incomplete for one model.
    best = {m: max(per_model[m], key=lambda e, m=m: per_model[m][e][0]) for m in (a, b)}
    regret = {m: per_model[m][best[m]][1] - per_model[m][best[o]][1]
              for m, o in ((a, b), (b, a))}
    lines.append(f"| {radius}, {norm} | {best[a]:g} | {best[b]:g} | {100 * regret[a]:+.2f} | "
                 f"{100 * regret[b]:+.2f} | {100 * (regret[a] + regret[b]):+.2f} |")
  lines.append("")
  return lines if len(lines) > 7 else []


def plots(result: dict[str, Any], stem: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = [g for g in sorted(result["groups"], key=_group_order)
            if any(r.get("summary") for r in g["rows"])]
  if not groups:
    return
  if result["preset"] in ("study-sweep", "study-smoke"):
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
      erm = next((r for r in g["rows"] if r["setting"]["method"] == "erm" and r.get("summary")),
                 None)
      for (radius, norm), style in zip(SWEEP_GRID, ("o-", "s-", "o--", "s--"), strict=True):
        pts = sorted((r["setting"]["epsilon"], r["summary"]["test_acc"]["mean"],
                      r["summary"]["test_acc"]["std"]) for r in g["rows"]
                     if r.get("summary") and r["setting"]["method"] == "amp"
                     and r["setting"]["radius"] == radius and r["setting"]["norm"] == norm
                     and r["setting"]["ascent_every"] == 1)
        if pts:
          e, m, s = map(np.asarray, zip(*pts))
          ax.errorbar(e, 100 * m, 100 * s, fmt=style, capsize=2, label=f"AMP {radius} {norm}")
      if erm:
        ax.axhline(100 * erm["summary"]["test_acc"]["mean"], color="k", lw=1, label="ERM")
      ax.set_xscale("log")
      ax.set_xlabel("epsilon (absolute: radius; relative: fraction of the norm)")
      ax.set_ylabel("test accuracy %")
      ax.set_title(f"{g['config']['model']} ({'aug' if g['config']['augment'] else 'no aug'})")
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(stem + "_eps.png", dpi=110)
    plt.close(fig)
  fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
  for ax, g in zip(axes[0], groups, strict=True):
    for r in g["rows"]:
      if not r.get("summary"):
        continue
      method = r["setting"]["method"]
      xs = [run["hessian_top_eigenvalue"] for run in r["runs"].values()]
      ys = [100 * run["test_acc"] for run in r["runs"].values()]
      ax.scatter(xs, ys, s=12, marker={"erm": "x", "amp": "o", "sam": "^"}[method],
                 color={"erm": "k", "amp": "C0", "sam": "C3"}[method], alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("top Hessian eigenvalue (train batch, final params)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{g['config']['model']} ({'aug' if g['config']['augment'] else 'no aug'}): "
                 "x ERM, o AMP, ^ SAM", fontsize=9)
  fig.tight_layout()
  fig.savefig(stem + "_sharpness.png", dpi=110)
  plt.close(fig)
