"""The command line: ``python -m benchmarks.study --preset ...``. Runs a table (resumable: finished
``(setting, seed)`` runs are kept in the JSON), merges what other processes saved, and writes the
JSON, the markdown and the plots after every run."""

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax
import optax

from benchmarks.study.data import REPO
from benchmarks.study.data import load_data
from benchmarks.study.models import MODEL_NAMES
from benchmarks.study.presets import CHEAP2_VARIANTS
from benchmarks.study.presets import EPOCHS
from benchmarks.study.presets import FALLBACK_CHOICE
from benchmarks.study.presets import PAPER
from benchmarks.study.presets import PRESETS
from benchmarks.study.presets import Config
from benchmarks.study.presets import Setting
from benchmarks.study.presets import cheap2_final_settings
from benchmarks.study.presets import cheap2_key
from benchmarks.study.presets import cheap2_sweep_settings
from benchmarks.study.presets import cheap_settings
from benchmarks.study.presets import choose_cheap2
from benchmarks.study.presets import choose_from_sweep
from benchmarks.study.presets import choose_grouped
from benchmarks.study.presets import final_settings
from benchmarks.study.presets import grouped_final_settings
from benchmarks.study.presets import grouped_sweep_settings
from benchmarks.study.presets import sweep_settings
from benchmarks.study.presets import timing_settings
from benchmarks.study.report import markdown
from benchmarks.study.report import plots
from benchmarks.study.runner import Trainer
from benchmarks.study.runner import time_steps
from benchmarks.study.stats import summarize

RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)



def _rows_for(result: dict[str, Any], config: Config, settings: list[Setting]):
  """The group of ``config`` in ``result`` (created if new), rows for ``settings``."""
  for g in result["groups"]:
    if g["config"] == dataclasses.asdict(config):
      group = g
      break
  else:
    group = {"config": dataclasses.asdict(config), "rows": []}
    result["groups"].append(group)
  by_label = {r["label"]: r for r in group["rows"]}
  rows = []
  for s in settings:
    if s.label not in by_label:
      by_label[s.label] = {"label": s.label, "setting": s.as_dict(), "runs": {}}
      group["rows"].append(by_label[s.label])
    rows.append(by_label[s.label])
  return group, rows


def _load(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _grouped_choices(result: dict[str, Any], model: str, groups: tuple[int, ...],
                     sweep: dict[str, Any] | None, restart: bool) -> dict[int, dict[str, Setting]]:
  """Per G, the AMP and SAM rows of the grouped table: chosen once from the grouped sweep on
  validation accuracy and kept in the table's JSON (fallback: the whole-batch fallback)."""
  saved = result.setdefault("grouped_choices", {}).setdefault(model, {})
  out = {}
  for g in groups:
    if str(g) in saved and not restart:
      out[g] = {k: Setting(**saved[str(g)][k]) for k in ("amp", "sam")}
      continue
    picked = choose_grouped(sweep, model, g)
    if picked is None:
      choice = {k: dataclasses.replace(v, num_groups=g) for k, v in FALLBACK_CHOICE.items()}
      how = "fallback (no grouped sweep for this G)"
    else:
      choice, how = picked
    saved[str(g)] = {"amp": choice["amp"].as_dict(), "sam": choice["sam"].as_dict(), "how": how}
    out[g] = choice
  return out


def _import_whole_batch_runs(result: dict[str, Any], config: Config, settings: list[Setting],
                             final: dict[str, Any] | None) -> None:
  """The grouped table's m = whole-batch rows (G = 1) are study_final's runs of the same config
  and settings (the same code path and seeds): copied, not retrained."""
  if final is None:
    return
  source = next((g for g in final["groups"] if g["config"] == dataclasses.asdict(config)), None)
  if source is None:
    return
  by_label = {r["label"]: r for r in source["rows"]}
  _, rows = _rows_for(result, config, settings)
  for s, row in zip(settings, rows, strict=True):
    if s.num_groups == 1 and s.label in by_label:
      for seed, run in by_label[s.label]["runs"].items():
        row["runs"].setdefault(seed, dict(run, source="study_final.json"))


def run_table(args: argparse.Namespace) -> dict[str, Any]:
  p = PRESETS[args.preset]
  smoke = args.preset == "study-smoke"
  out_dir = args.out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  name = args.preset.replace("-", "_")
  json_path = os.path.join(out_dir, f"{name}.json")
  result = {"benchmark": "study", "preset": args.preset, "groups": []}
  if not args.restart:
    result = _load(json_path) or result
  result.update({
      "data": ("synthetic" if smoke else "CIFAR-10 (JPEG copy)"),
      "train_size": p["train_size"], "val_size": p["val_size"], "test_size": p["test_size"],
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "backend": jax.default_backend(), "jax": jax.__version__,
                  "optax": optax.__version__}})
  workdir = args.work_dir or os.path.join(tempfile.gettempdir(), "amp_optax_study")
  os.makedirs(workdir, exist_ok=True)
  data = load_data(args, workdir)
  trainer = Trainer(data, p["hessian_iters"], p["perturb_samples"], p["sharpness_batch"])
  models = args.models or p["models"]
  seeds = p["seeds"][:args.seeds] if args.seeds else p["seeds"]
  if args.only_seeds:  # e.g. a second process taking the last seeds while one runs the first
    seeds = tuple(s for s in args.only_seeds if s in seeds)
  sweep = None
  cheap = args.preset == "study-cheap" or (smoke and args.table == "cheap")
  grouped_sweep = args.preset == "study-grouped-sweep" or (smoke and args.table == "grouped-sweep")
  grouped = args.preset == "study-grouped" or (smoke and args.table == "grouped")
  # A radius per cheap variant (issue 25): the sweep runs each variant over its own grid, the
  # table each variant at the epsilon with the best validation accuracy there.
  cheap2_sweep = args.preset == "study-cheap2-sweep" or (smoke and args.table == "cheap2-sweep")
  cheap2 = args.preset == "study-cheap2" or (smoke and args.table == "cheap2")
  final_choices = {}
  study_final = None
  if grouped or grouped_sweep:
    # Grouped ascent (issue 17): m = the whole batch is study_final's AMP and SAM rows; the
    # grouped sweep searches the same (radius, norm) family per G.
    study_final = None if smoke else _load(os.path.join(out_dir, "study_final.json"))
    final_choices = (study_final or {}).get("choices", {})
    if grouped and not smoke:
      sweep = _load(os.path.join(out_dir, "study_grouped_sweep.json"))
    elif grouped:
      sweep = _load(json_path)
  if args.preset == "study-final":
    sweep = _load(os.path.join(out_dir, "study_sweep.json"))
  elif cheap2 or cheap2_sweep:
    # Multiples of the final table's AMP epsilon per model; the table's ERM and full AMP rows
    # are study_final's runs (same code path, seeds and data: copied, not retrained).
    study_final = None if smoke else _load(os.path.join(out_dir, "study_final.json"))
    final_choices = (study_final or {}).get("choices", {})
    if cheap2:
      sweep = _load(json_path if smoke else os.path.join(out_dir, "study_cheap2_sweep.json"))
  elif args.preset == "study-cheap":
    # The final table's AMP setting per model (chosen there on validation accuracy): the gain
    # each variant keeps is relative to full AMP at the same epsilon, norm and radius.
    final_choices = (_load(os.path.join(out_dir, "study_final.json")) or {}).get("choices", {})
  result.setdefault("choices", {})
  # Blocks in priority order, each with all its seeds before the next: a study cut short
  # leaves whole blocks behind. Within a block the seeds are outermost (complete seed pairs).
  plan = []
  for model in models:
    def config_for(augment, model=model):
      epochs = p["epochs"] or EPOCHS[(model, augment)]
      return Config(model, augment, p["train_size"], p["val_size"], epochs,
                    p.get("batch_size", 128))

    if args.preset == "study-sweep" or (smoke and args.table == "sweep"):
      plan.append((config_for(False), sweep_settings(smoke)))
      continue
    prev = result["choices"].get(model)
    if prev is not None and not args.restart:
      # Chosen once per table: a sweep extended later must not change a table's rows midway.
      choice = {k: Setting(**prev[k]) for k in ("amp", "sam")}
      why = prev["how"]
    elif model in final_choices:
      choice = {k: Setting(**final_choices[model][k]) for k in ("amp", "sam")}
      why = f"study_final.json's choice ({final_choices[model]['how']})"
    else:
      choice, why = choose_from_sweep(sweep, "small" if smoke else model)
    if not args.methods:  # a process running some methods only leaves the record alone.
      result["choices"][model] = {"amp": choice["amp"].as_dict(),
                                  "sam": choice["sam"].as_dict(), "how": why}
    if cheap:
      plan.append((config_for(False), cheap_settings(choice["amp"])))
      continue
    if cheap2_sweep:
      settings = cheap2_sweep_settings(choice["amp"], smoke)
      if args.variants:
        settings = settings[:2] + [s for s in settings[2:] if cheap2_key(s) in args.variants]
      plan.append((config_for(False), settings))
      continue
    if cheap2:
      saved = result.setdefault("cheap2_choices", {})
      if model not in saved or args.restart:
        # Chosen once per table, from the sweep's validation accuracy.
        saved[model] = choose_cheap2(sweep, "micro" if smoke else model)
      settings = cheap2_final_settings(choice["amp"], saved[model])
      if not args.rerun_references:
        _import_whole_batch_runs(result, config_for(False), settings[:2], study_final)
      if args.variants:  # e.g. the variants at about ERM's cost first
        settings = settings[:2] + [s for s in settings[2:] if cheap2_key(s) in args.variants]
      plan.append((config_for(False), settings))
      continue
    if grouped_sweep:
      plan.append((config_for(False), grouped_sweep_settings(choice["amp"], p["groups"], smoke)))
      continue
    if grouped:
      per_group = _grouped_choices(result, model, p["groups"], sweep, args.restart)
      settings = grouped_final_settings(choice, per_group)
      _import_whole_batch_runs(result, config_for(False), settings, study_final)
      plan.append((config_for(False), settings))
      continue
    settings = final_settings(choice, smoke)
    core = [s for s in settings if s.ascent_every == 1 and s != PAPER]
    cheaper = [s for s in settings if s.ascent_every > 1]
    blocks = {"core": (config_for(False), core)}
    if True in p["augments"]:
      blocks["aug"] = (config_for(True), core)
    blocks["cheaper"] = (config_for(False), cheaper)
    if PAPER not in core:
      blocks["paper"] = (config_for(False), [PAPER])
    plan += [b for name, b in blocks.items() if not args.blocks or name in args.blocks]
  if args.methods:
    plan = [(c, [s for s in ss if s.method in args.methods]) for c, ss in plan]
  if args.timing_only:
    plan = []
  total = sum(len(s) for _, s in plan) * len(seeds)
  done = 0
  t_start = time.perf_counter()
  for config, settings in plan:
    for seed in seeds:
      _, rows = _rows_for(result, config, settings)
      for s, row in zip(settings, rows, strict=True):
        done += 1
        if str(seed) in row["runs"]:
          continue
        _log(f"[{done}/{total}] {config.label} | {s.label} | seed {seed}")
        r = trainer.run(config, s, seed, log=_log if args.verbose > 1 else None)
        row["runs"][str(seed)] = r
        _log(f"    test {r['test_acc']:.4f} val {r['val_acc']:.4f} train loss "
             f"{r['train_loss']:.4f} eig {r['hessian_top_eigenvalue']:.3g} "
             f"({r['train_seconds']:.0f}s, {time.perf_counter() - t_start:.0f}s total)")
        finish(result, json_path)
  if args.preset != "study-sweep" and not grouped_sweep and not cheap2_sweep and (
      not args.skip_timing):
    result["step_time"] = {}
    result["step_time_batch"] = p.get("batch_size", 128)
    for model in models:
      choice = {k: Setting(**v) for k, v in result["choices"][model].items() if k != "how"}
      if grouped:
        per_group = {int(g): {k: Setting(**v) for k, v in c.items() if k != "how"}
                     for g, c in result["grouped_choices"][model].items()}
        settings = grouped_final_settings(choice, per_group)
      elif cheap:
        settings = cheap_settings(choice["amp"])
      elif cheap2:
        settings = cheap2_final_settings(choice["amp"], result["cheap2_choices"][model])
        if args.variants:
          settings = settings[:2] + [s for s in settings[2:] if cheap2_key(s) in args.variants]
      else:
        settings = timing_settings(choice, smoke)
      _log(f"step time {model}")
      result["step_time"][model] = time_steps(
          model, settings, p.get("batch_size", 128), rounds=2 if smoke else 3,
          blocks=1 if smoke else 3)
    finish(result, json_path)
  return finish(result, json_path)


def _merge_from_disk(result: dict[str, Any], json_path: str) -> None:
  """Adds to ``result`` the runs (and per-model entries) that another process saved."""
  disk = _load(json_path)
  if disk is None:
    return
  for key in ("choices", "step_time", "step_time_all", "cheap2_choices"):
    for model, value in disk.get(key, {}).items():
      result.setdefault(key, {}).setdefault(model, value)
  for model, per_group in disk.get("grouped_choices", {}).items():
    for groups, choice in per_group.items():  # per G: processes may choose different G's
      result.setdefault("grouped_choices", {}).setdefault(model, {}).setdefault(groups, choice)
  if "step_time_batch" in disk:
    result.setdefault("step_time_batch", disk["step_time_batch"])
  for dgroup in disk.get("groups", []):
    config = Config(**dgroup["config"])
    settings = [Setting(**r["setting"]) for r in dgroup["rows"]]
    _, rows = _rows_for(result, config, settings)
    for drow, row in zip(dgroup["rows"], rows, strict=True):
      for seed, run in drow["runs"].items():
        row["runs"].setdefault(seed, run)


def finish(result: dict[str, Any], json_path: str) -> dict[str, Any]:
  """Merges other processes' runs, recomputes the summaries, writes JSON, markdown, plots.

  Several processes (e.g. one per model) may fill the same table: the file is locked while it
  is read, merged and rewritten.
  """
  import fcntl  # pylint: disable=g-import-not-at-top

  # The lock lives outside the results folder, keyed by the table's absolute path.
  lock_name = "amp_optax_" + os.path.abspath(json_path).replace(os.sep, "_") + ".lock"
  with open(os.path.join(tempfile.gettempdir(), lock_name), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    _merge_from_disk(result, json_path)
    _finish_locked(result, json_path)
  return result


def _finish_locked(result: dict[str, Any], json_path: str) -> None:
  for group in result["groups"]:
    erm = next((r for r in group["rows"] if r["setting"]["method"] == "erm"), None)
    for row in group["rows"]:
      if row["runs"]:
        is_erm = row is erm
        row["summary"] = summarize(row["runs"], None if (erm is None or is_erm) else erm["runs"])
  md = markdown(result)
  result["markdown"] = md
  _write_json(json_path, result)
  with open(json_path[:-5] + ".md", "w") as f:
    f.write(md)
  try:
    plots(result, json_path[:-5])
  except Exception as e:  # pylint: disable=broad-except
    _log(f"plots failed: {e!r}")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
      description="Where does AMP help? ERM vs AMP vs SAM where a regulariser matters, on CPU.")
  ap.add_argument("--preset", choices=sorted(PRESETS), default="study-sweep")
  ap.add_argument("--table", choices=("sweep", "final", "cheap", "grouped-sweep", "grouped",
                                      "cheap2-sweep", "cheap2"),
                  default="final",
                  help="with study-smoke: which table's settings to run")
  ap.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=None)
  ap.add_argument("--methods", nargs="+", choices=("erm", "amp", "sam"), default=None,
                  help="run only these methods' rows (e.g. ERM in a second process early)")
  ap.add_argument("--blocks", nargs="+", choices=("core", "aug", "cheaper", "paper"),
                  default=None, help="study-final: run only these blocks (default: all, in the "
                  "order core (ERM/AMP/SAM, no aug), aug (the same with augmentation), cheaper "
                  "(an ascent every 2nd and 4th step), paper (AMP at the paper's epsilon))")
  ap.add_argument("--variants", nargs="+", choices=[k for k, _, _ in CHEAP2_VARIANTS],
                  default=None, help="study-cheap2(-sweep): only these variants' rows (with ERM "
                  "and full AMP)")
  ap.add_argument("--rerun-references", action="store_true",
                  help="study-cheap2: train ERM and full AMP instead of copying study_final's "
                  "runs")
  ap.add_argument("--seeds", type=int, default=None, help="only the first N of the preset's seeds")
  ap.add_argument("--only-seeds", type=int, nargs="+", default=None,
                  help="only these of the preset's seeds, in this order (e.g. 4 3 in a second "
                  "process while another runs from seed 0)")
  ap.add_argument("--data-dir", default=None, help="an official-layout CIFAR-10 folder")
  ap.add_argument("--work-dir", default=None, help="where the data subset is built")
  ap.add_argument("--out-dir", default=None, help="default: benchmarks/results")
  ap.add_argument("--restart", action="store_true", help="ignore finished runs in the JSON")
  ap.add_argument("--skip-timing", action="store_true", help="no step-time table")
  ap.add_argument("--timing-only", action="store_true",
                  help="only the step-time table (of the final table's settings)")
  ap.add_argument("-v", "--verbose", type=int, default=1)
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = run_table(args)
  print(out["markdown"])
  return out


if __name__ == "__main__":
  main()
