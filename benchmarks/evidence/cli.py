"""The command line: ``python -m benchmarks.evidence --preset NAME [--phase sweep|final|all]``.

Resumable: the JSON is rewritten after every run, and a rerun skips the runs it already holds
(``--max-minutes`` stops starting new runs after that long, so a long preset can be run in
pieces). The final rows are chosen from the sweep's validation accuracy alone.
"""

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax

from benchmarks.evidence import data as data_lib
from benchmarks.evidence import presets
from benchmarks.evidence import report
from benchmarks.evidence.train import Trainer

RESULTS_DIR = os.path.join(data_lib.REPO, "benchmarks", "results")


def _log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(),
          "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend()}


def _write(path: str, result: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def _load(path: str, name: str, p: presets.Preset) -> dict[str, Any]:
  """The saved results of ``name`` (new if none); more or fewer final seeds may be asked for."""
  want = json.loads(json.dumps(p.as_dict() | {"name": name}))  # tuples as the JSON's lists
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    # Fields added to Preset after a file was written take their defaults (the old behaviour).
    defaults = {f.name: f.default for f in dataclasses.fields(presets.Preset)
                if f.default is not dataclasses.MISSING}
    saved = defaults | result["preset"]
    if {**saved, "final_seeds": None} != {**want, "final_seeds": None}:
      raise SystemExit(f"{path} holds another configuration of {name}; move it away first")
    result["preset"] = want
    return result
  return {"preset": want, "runs": {}, "machines": []}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
  ap.add_argument("--phase", default="all", choices=("sweep", "final", "all"))
  ap.add_argument("--out-dir", default=RESULTS_DIR)
  ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "amp_optax_evidence"))
  ap.add_argument("--max-minutes", type=float, default=None,
                  help="start no new run after this long (rerun to go on)")
  ap.add_argument("--final-seeds", type=int, default=None,
                  help="final seeds 0..N-1 instead of the preset's (to narrow the intervals)")
  ap.add_argument("--extra-rows", default="",
                  help="rows also run on the final seeds, not chosen on validation: "
                       "comma-separated method:radius:groups, e.g. amp:0.03:1,amp:0.03:4")
  args = ap.parse_args(argv)
  p = presets.PRESETS[args.preset]
  if args.final_seeds is not None:
    p = dataclasses.replace(p, final_seeds=tuple(range(args.final_seeds)))
  os.makedirs(args.out_dir, exist_ok=True)
  os.makedirs(args.work_dir, exist_ok=True)
  path = os.path.join(args.out_dir, f"evidence_{args.preset}.json")
  result = _load(path, args.preset, p)
  machine = _machine()
  if machine not in result["machines"]:
    result["machines"].append(machine)
  start = time.time()
  trainer: Trainer | None = None
  done = {"new_runs": 0, "stopped": False}

  def run_all(phase: str, rows: list[presets.Row], seeds: tuple[int, ...]) -> None:
    nonlocal trainer
    for seed in seeds:  # seed-major: each seed's paired rows finish together
      for row in rows:
        key = presets.run_key(phase, row, seed)
        # An extra row that is also a final row has run already (same row, same seed).
        if key in result["runs"] or (phase == "extra"
                                     and presets.run_key("final", row, seed) in result["runs"]):
          continue
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
          done["stopped"] = True
          return
        if trainer is None:
          trainer = Trainer(p, data_lib.load(p, args.work_dir))
        run = trainer.run(row, seed) | {"phase": phase, "machine": machine_index}
        result["runs"][key] = run
        done["new_runs"] += 1
        _log(f"{key}: val {run['val_acc']:.4f} test {run['test_acc']:.4f} "
             f"train loss {run['train_loss']:.4f} ({run['wall_s']:.0f} s)")
        _write(path, result)

  machine_index = result["machines"].index(machine)
  if args.phase in ("sweep", "all"):
    run_all("sweep", presets.sweep_rows(p), p.sweep_seeds)
  sweep_done = all(presets.run_key("sweep", r, s) in result["runs"]
                   for r in presets.sweep_rows(p) for s in p.sweep_seeds)
  if sweep_done:
    choice = presets.choose(p, result["runs"])
    result["choice"] = {k: {"row": v["row"].as_dict(), "label": v["row"].label,
                            "val": v["val"]} for k, v in choice.items()}
    if args.phase in ("final", "all") and not done["stopped"]:
      run_all("final", presets.final_rows(p, {k: v["row"] for k, v in choice.items()}),
              p.final_seeds)
    if args.extra_rows and args.phase in ("final", "all") and not done["stopped"]:
      extra = [presets.Row(m, float(r), int(g))
               for m, r, g in (spec.split(":") for spec in args.extra_rows.split(","))]
      run_all("extra", extra, p.final_seeds)
  elif args.phase == "final":
    raise SystemExit("evidence: the sweep is not finished; run --phase sweep first")
  _write(path, result)
  with open(os.path.join(args.out_dir, f"evidence_{args.preset}.md"), "w") as f:
    f.write(report.markdown(args.preset, p, result))
  _log(f"{done['new_runs']} new runs; {len(result['runs'])} in {path}"
       + (" (stopped at --max-minutes; rerun to go on)" if done["stopped"] else ""))
  return result | {"new_runs": done["new_runs"]}
