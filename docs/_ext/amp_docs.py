"""Sphinx extension: the benchmarks page's tables, generated from ``benchmarks/results/*.json``.

Before Sphinx reads the sources (``config-inited``) this writes, under ``docs/generated/``
(ignored by git):

* ``results_step_time.md``, ``results_reproduce.md``, ``results_study.md`` and
  ``results_other.md``: Markdown tables rendered from the JSON that ``benchmarks/step_time.py``,
  ``benchmarks/reproduce.py``, ``benchmarks/study/`` and any other benchmark wrote, each with
  the command that makes it and the machine it ran on; ``docs/benchmarks.md`` includes them;
* ``results_status.md``: which platforms the figures come from, and that GPU figures are missing
  while no JSON says it ran on a GPU;
* copies of the ``benchmarks/results/*.png`` plots, which the generated pages show.

The renderers are pure functions of the loaded JSON (``render_*``), so ``tests/test_docs.py``
checks them against the files without a Sphinx build. Nothing here reads the network.
"""

from collections.abc import Callable
import glob
import json
import os
import shutil
from typing import Any

DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(DOCS)
RESULTS = os.path.join(REPO, "benchmarks", "results")
GENERATED = os.path.join(DOCS, "generated")

NOT_MEASURED = "not measured"


def _fmt(value: Any, spec: str) -> str:
  if value is None:
    return "n/a"
  try:
    return format(float(value), spec)
  except (TypeError, ValueError):
    return str(value)


def _pm(mean: Any, std: Any, scale: float = 1.0, spec: str = ".2f") -> str:
  if mean is None:
    return "n/a"
  return f"{float(mean) * scale:{spec}} ± {float(std or 0.0) * scale:{spec}}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  cells = lambda r: "| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |"
  return [cells(header), "|" + "---|" * len(header), *[cells(r) for r in rows], ""]


def _rel(path: str) -> str:
  return os.path.relpath(path, REPO).replace(os.sep, "/")


def _machine(env: dict[str, Any] | None) -> str:
  if not env:
    return "machine not recorded"
  backend = env.get("backend") or env.get("platform") or "?"
  parts = [f"{backend}"]
  if env.get("device_kind") and env.get("device_kind") != backend:
    parts.append(str(env["device_kind"]))
  if env.get("cpu_count"):
    parts.append(f"{env['cpu_count']} CPU cores")
  versions = ", ".join(f"{k} {env[k]}" for k in ("jax", "optax", "python") if env.get(k))
  return " · ".join(parts) + (f"; {versions}" if versions else "")


def platform_of(data: dict[str, Any]) -> str:
  """``"cpu"``, ``"gpu"``, ``"tpu"``... as the JSON records it (``"?"`` if it does not)."""
  env = data.get("environment") or data.get("machine") or {}
  # step_time and reproduce record the backend as "platform"; study as "backend", next to an
  # OS "platform" string.
  kind = str(env.get("backend") or env.get("platform") or "?").lower()
  return "gpu" if kind in ("cuda", "rocm", "gpu") else kind


# ---------------------------------------------------------------------------------------------
# step_time.py


def step_time_command(data: dict[str, Any]) -> str:
  model = {"tiny_cnn": "small"}.get(data.get("model"), data.get("model"))
  cmd = f"python -m benchmarks.step_time --model {model} --batch-size {data.get('batch_size')}"
  steps = sorted({r["inner_steps"] for r in data.get("rows", []) if r.get("method") == "amp"})
  if steps == [1]:
    cmd += " --inner-steps 1"
  return cmd


def render_step_time(data: dict[str, Any], name: str) -> str:
  """One ``step_time`` JSON as Markdown: time per step, memory and compile time."""
  env = data.get("environment", {})
  timing = data.get("timing", {})
  lines = [
      f"### `{data.get('model')}`, batch {data.get('batch_size')} ({platform_of(data)})", "",
      f"`{name}` · {data.get('num_params', 0):,} parameters "
      f"({data.get('param_bytes', 0) / 2**20:.2f} MiB) · {_machine(env)} · median of up to "
      f"{timing.get('iters')} calls after {timing.get('warmup')} warm-up, "
      f"{timing.get('rounds')} interleaved rounds", "",
      "```bash", step_time_command(data), "```", "",
  ]
  rows = [[r["name"], r["framework"], _fmt(r.get("grad_evals"), "g"),
           _fmt(r.get("ms_median"), ".1f"),
           f"{_fmt(r.get('ms_p10'), '.1f')}–{_fmt(r.get('ms_p90'), '.1f')}",
           _fmt(r.get("ratio_vs_erm"), ".2f"), _fmt(r.get("ratio_vs_jax_erm"), ".2f")]
          for r in data.get("rows", [])]
  lines += _table(["step", "framework", "gradients", "ms/step", "p10–p90 ms", "× ERM",
                   "× jax ERM"], rows)
  memory = [m for m in data.get("memory", []) if m.get("stats")]
  if memory:
    lines += ["Memory of the compiled step (arguments + outputs + temporaries − donated); "
              "**extra** in units of the parameters' bytes, against ERM:", ""]
    lines += _table(["step", "footprint MiB", "extra (× params)"],
                    [[m["name"], _fmt(m["stats"].get("footprint_bytes", 0) / 2**20, ".1f"),
                      _fmt(m.get("extra_footprint_param_units"), ".2f")] for m in memory])
  if data.get("compile"):
    lines += ["Compile time of a fresh jit (seconds):", ""]
    lines += _table(
        ["step", "K", "unrolled", "trace + lower", "XLA compile"],
        [[c["method"], c["inner_steps"], "yes" if c.get("unroll") else "no",
          _fmt(c.get("trace_lower_s"), ".2f"), _fmt(c.get("compile_s"), ".2f")]
         for c in data["compile"]])
  for note in data.get("notes", []):
    lines += [f"Note: {note}", ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reproduce.py


def reproduce_command(data: dict[str, Any]) -> str:
  cmd = f"python -m benchmarks.reproduce --preset {data.get('preset')}"
  if data.get("sweep"):
    cmd += " --sweep"
  seeds = data.get("config", {}).get("seeds")
  if data.get("sweep") and seeds:
    cmd += f" --seeds {seeds}"
  return cmd


def render_reproduce(data: dict[str, Any], name: str) -> str:
  """One ``reproduce`` JSON as Markdown: accuracy, training loss and sharpness per setting."""
  a = data.get("config", {})
  title = "ε sweep" if data.get("sweep") else "ERM vs AMP vs SAM"
  lines = [
      f"### {title}: `{a.get('model')}`, preset `{data.get('preset')}` ({platform_of(data)})",
      "",
      f"`{name}` · **{data.get('data')}**, {a.get('train_size')} train / {a.get('test_size')} "
      f"test images, {a.get('epochs')} epochs, batch {a.get('batch_size')}, lr {a.get('lr')}, "
      f"weight decay {a.get('weight_decay')}; mean ± std over {a.get('seeds')} seeds · "
      f"{_machine(data.get('environment'))}", "",
      "```bash", reproduce_command(data), "```", "",
  ]
  radius = _fmt(a.get("perturb_radius"), "g")
  rows = []
  for r in data.get("rows", []):
    rows.append([
        r["label"], _pm(r.get("final_test_acc_mean"), r.get("final_test_acc_std"), 100),
        _pm(r.get("best_epoch_test_acc_mean"), r.get("best_epoch_test_acc_std"), 100),
        _pm(r.get("final_train_loss_mean"), r.get("final_train_loss_std"), spec=".3f"),
        _pm(r.get("hessian_top_eigenvalue_mean"), r.get("hessian_top_eigenvalue_std"),
            spec=".1f"),
        _pm(r.get("perturbation_increase_mean_mean"), r.get("perturbation_increase_mean_std"),
            spec=".4f"),
        _fmt(r.get("train_time_s_mean"), ".0f")])
  lines += _table(["setting", "test acc, final (%)", "test acc, best epoch (%)",
                   "train loss, last epoch", "λ_max", f"ΔL ({a.get('perturb_norm')} r = {radius})",
                   "s / run"], rows)
  if data.get("pending"):
    lines += ["Not finished yet: " + ", ".join(
        f"{p.get('setting')} seed {p.get('seed')}" for p in data["pending"]) + ".", ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# benchmarks/study/


def _setting_label(row: dict[str, Any]) -> str:
  return str(row.get("label") or row.get("setting"))


def render_study(data: dict[str, Any], name: str) -> str:
  """One ``study`` JSON as Markdown: per model and augmentation, the settings against ERM."""
  lines = [
      f"### `{data.get('preset')}` ({platform_of(data)})", "",
      f"`{name}` · **{data.get('data')}**, {data.get('train_size')} training images "
      f"(+{data.get('val_size')} validation), {data.get('test_size')} test images · "
      f"{_machine(data.get('machine'))}", "",
      "```bash", f"python -m benchmarks.study --preset {data.get('preset')}", "```", "",
  ]
  for model, choice in (data.get("choices") or {}).items():
    amp, sam = choice.get("amp", {}), choice.get("sam", {})
    lines.append(f"- `{model}`: AMP ε = {amp.get('epsilon')} ({amp.get('radius')}, "
                 f"{amp.get('norm')}), SAM ρ = {sam.get('rho')}: {choice.get('how')}")
  if data.get("choices"):
    lines.append("")
  for group in data.get("groups", []):
    c = group.get("config", {})
    aug = "crop + flip" if c.get("augment") else "no augmentation"
    lines += [f"#### `{c.get('model')}`, {aug}, {c.get('epochs')} epochs, batch "
              f"{c.get('batch_size')}", ""]
    rows = []
    for row in group.get("rows", []):
      s = row.get("summary")
      if not s:
        continue
      d = s.get("test_acc_minus_erm")
      diff = "—"
      if d and d.get("n", 0) >= 2:
        diff = f"{100 * d['mean']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
      elif d and d.get("n") == 1:
        diff = f"{100 * d['mean']:+.2f}"
      rows.append([_setting_label(row), len(s.get("seeds", [])),
                   _pm(s["test_acc"]["mean"], s["test_acc"]["std"], 100), diff,
                   _fmt(100 * s["val_acc"]["mean"], ".2f"),
                   _fmt(s["train_loss"]["mean"], ".4f"),
                   _fmt(s["hessian_top_eigenvalue"]["mean"], ".3g"),
                   _fmt(s["perturb_increase"]["mean"], ".3g")])
    if rows:
      lines += _table(["setting", "seeds", "test acc %", "Δ test vs ERM, paired [95% CI]",
                       "val acc %", "train loss", "λ_max", "loss incr. @5%"], rows)
    else:
      lines += ["No finished runs in this group yet.", ""]
  for model, rows in (data.get("step_time") or {}).items():
    lines += [f"#### Step time, `{model}` (interleaved, one process)", ""]
    lines += _table(["setting", "ms/step (median)", "× ERM"],
                    [[r.get("label"), _fmt(r.get("ms_median"), ".1f"),
                      _fmt(r.get("ratio_vs_erm"), ".2f")] for r in rows])
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# collectives.py


def render_collectives(data: dict[str, Any], name: str) -> str:
  """One ``collectives`` JSON: the collective ops in each compiled step, against ERM's."""
  sizes = "-".join(str(s) for s in data.get("sizes", []))
  lines = [
      f"### Collectives of one compiled step ({platform_of(data)})", "",
      f"`{name}` · MLP {sizes} ({data.get('num_params', 0):,} parameters, "
      f"{data.get('param_bytes', 0):,} bytes), global batch {data.get('batch')} · "
      f"{_machine(data.get('environment'))}", "",
      "```bash", str(data.get("command") or "python -m benchmarks.collectives"), "```", "",
  ]
  rows = data.get("rows", [])
  erm_bytes = {(r.get("setup"), r.get("mode")): r.get("total_bytes") for r in rows
               if r.get("method") == "erm"}
  out = []
  for r in rows:
    ar = (r.get("collectives") or {}).get("all-reduce", {})
    others = ", ".join(f"{k} {v.get('ops')}" for k, v in (r.get("collectives") or {}).items()
                       if k != "all-reduce") or "none"
    erm = erm_bytes.get((r.get("setup"), r.get("mode")))
    ratio = _fmt(r["total_bytes"] / erm, ".2f") if erm and r.get("total_bytes") else "n/a"
    out.append([r.get("setup"), r.get("mode"), r.get("variant"),
                f"{ar.get('ops', 0)} ({ar.get('tensors', 0)}, {ar.get('scalars', 0)})",
                f"{r.get('all_reduce_bytes', 0):,}", others, f"{r.get('total_bytes', 0):,}",
                ratio])
  lines += _table(["setup", "mode", "step", "all-reduce ops (tensors, of them scalars)",
                   "all-reduce bytes", "other collectives", "total bytes", "× ERM bytes"], out)
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Anything else (e.g. a collectives benchmark): its own markdown, or its rows as a table.


def _scalar(x: Any) -> bool:
  return isinstance(x, (str, int, float, bool)) or x is None


def render_other(data: dict[str, Any], name: str) -> str:
  """A JSON of an unknown benchmark: its ``markdown`` field, else its ``rows`` as a table."""
  title = data.get("benchmark") or os.path.splitext(name)[0]
  env = data.get("environment") or data.get("machine")
  lines = [f"### {title} ({platform_of(data)})", "", f"`{name}` · {_machine(env)}", ""]
  if data.get("command"):
    lines += ["```bash", str(data["command"]), "```", ""]
  tables = {k: v for k, v in data.items() if k.endswith("rows") and isinstance(v, list) and v
            and all(isinstance(r, dict) for r in v)}
  if "rows" in tables:
    for key, rows in tables.items():  # "rows", then e.g. "sharded_rows", each a table
      keys: list[str] = []
      for r in rows:
        keys += [k for k, v in r.items() if _scalar(v) and k not in keys]
      if key != "rows":
        lines += [f"`{key}`:", ""]
      lines += _table(keys, [[_fmt(r.get(k), ".4g") if isinstance(r.get(k), float)
                              else r.get(k, "") for k in keys] for r in rows])
  elif isinstance(data.get("markdown"), str):
    # Headings in the benchmark's own markdown would break this page's outline: bold instead.
    for line in data["markdown"].splitlines():
      stripped = line.lstrip("#").strip()
      lines.append(f"**{stripped}**" if line.startswith("#") and stripped else line)
    lines.append("")
  else:
    lines += ["Fields: " + ", ".join(f"`{k}`" for k in data), ""]
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The cost of a step, summarised for the guides.


def render_cost_summary(results: list[tuple[str, dict[str, Any]]]) -> str:
  """For each step-time result, the JAX rows' time per step as a multiple of the ERM step."""
  parts = []
  for name, data in results:
    if data.get("benchmark") != "step_time":
      continue
    rows = [r for r in data.get("rows", []) if r.get("framework") == "jax"]
    header = (f"**`{data.get('model')}`** ({data.get('num_params', 0):,} parameters, batch "
              f"{data.get('batch_size')}, {platform_of(data)}; `{name}`)")
    parts += [header + ":", ""]
    parts += _table(["step", "gradients", "× ERM step"],
                    [[r["name"], _fmt(r.get("grad_evals"), "g"),
                      _fmt(r.get("ratio_vs_erm"), ".2f")] for r in rows])
  if not parts:
    return f"No step-time results in `benchmarks/results/` yet: {NOT_MEASURED}.\n"
  return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The ε sweeps, summarised for the hyper-parameter guide.


def render_sweeps(results: list[tuple[str, dict[str, Any]]]) -> str:
  """Every ε sweep in the results: test accuracy and sharpness against ε, per norm and radius."""
  parts = []
  for name, data in results:
    if data.get("benchmark") == "reproduce" and data.get("sweep"):
      a = data.get("config", {})
      rows = [[r["label"], _pm(r.get("final_test_acc_mean"), r.get("final_test_acc_std"), 100),
               _fmt(r.get("final_train_loss_mean"), ".3f"),
               _fmt(r.get("hessian_top_eigenvalue_mean"), ".1f")]
              for r in data.get("rows", [])]
      parts += [f"**`{a.get('model')}`** ({a.get('train_size')} {data.get('data')} images, "
                f"{a.get('epochs')} epochs, {a.get('seeds')} seeds, {platform_of(data)}; "
                f"`{name}`):", ""]
      parts += _table(["setting", "test acc (%)", "train loss", "λ_max"], rows)
    elif data.get("benchmark") == "study" and "sweep" in str(data.get("preset", "")):
      for group in data.get("groups", []):
        c = group.get("config", {})
        erm = next((r for r in group.get("rows", []) if r.get("setting", {}).get("method") == "erm"
                    and r.get("summary")), None)
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for r in group.get("rows", []):
          s, summary = r.get("setting", {}), r.get("summary")
          if s.get("method") != "amp" or not summary or s.get("ascent_every", 1) != 1:
            continue
          key = (str(s.get("radius")), str(s.get("norm")))
          val = summary["val_acc"]["mean"]
          if key not in best or val > best[key]["summary"]["val_acc"]["mean"]:
            best[key] = r
        rows = []
        if erm:
          rows.append(["ERM", "—", _pm(erm["summary"]["test_acc"]["mean"],
                                        erm["summary"]["test_acc"]["std"], 100),
                       _fmt(erm["summary"]["hessian_top_eigenvalue"]["mean"], ".3g")])
        for (radius, norm), r in sorted(best.items()):
          tried = sorted({x["setting"].get("epsilon") for x in group.get("rows", [])
                          if x.get("summary") and x.get("setting", {}).get("radius") == radius
                          and x.get("setting", {}).get("norm") == norm
                          and x.get("setting", {}).get("method") == "amp"})
          rows.append([f"AMP {radius} {norm} (tried ε = {', '.join(f'{e:g}' for e in tried)})",
                       f"{r['setting'].get('epsilon'):g}",
                       _pm(r["summary"]["test_acc"]["mean"], r["summary"]["test_acc"]["std"], 100),
                       _fmt(r["summary"]["hessian_top_eigenvalue"]["mean"], ".3g")])
        if rows:
          aug = "crop + flip" if c.get("augment") else "no augmentation"
          parts += [f"**`{c.get('model')}`** ({data.get('train_size')} {data.get('data')} "
                    f"images, {aug}, {c.get('epochs')} epochs, best ε by validation accuracy; "
                    f"`{name}`):", ""]
          parts += _table(["setting", "best ε", "test acc (%)", "λ_max"], rows)
  if not parts:
    return f"No ε sweep in `benchmarks/results/` yet: {NOT_MEASURED}.\n"
  return "\n".join(parts)


# ---------------------------------------------------------------------------------------------

RENDERERS: dict[str, Callable[[dict[str, Any], str], str]] = {
    "step_time": render_step_time,
    "reproduce": render_reproduce,
    "study": render_study,
    "collectives": render_collectives,
}


def load_results(results_dir: str = RESULTS) -> list[tuple[str, dict[str, Any]]]:
  """``(file name, data)`` for every results JSON, smoke runs left out, sorted by name."""
  out = []
  for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    with open(path, encoding="utf-8") as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): was it written completely? "
                         "Rerun the benchmark that writes it.") from e
    if not isinstance(data, dict) or data.get("smoke") or "smoke" in str(data.get("preset", "")):
      continue
    out.append((os.path.basename(path), data))
  return out


def kind_of(data: dict[str, Any]) -> str:
  kind = str(data.get("benchmark", ""))
  return kind if kind in RENDERERS else "other"


def render_status(results: list[tuple[str, dict[str, Any]]]) -> str:
  """Which platforms the figures come from; says plainly that GPU figures are missing."""
  by_platform: dict[str, list[str]] = {}
  for name, data in results:
    by_platform.setdefault(platform_of(data), []).append(name)
  lines = ["| platform | result files |", "|---|---|"]
  for platform in sorted(by_platform):
    lines.append(f"| {platform} | " + ", ".join(f"`{n}`" for n in by_platform[platform]) + " |")
  if "gpu" not in by_platform:
    lines.append(f"| gpu | **{NOT_MEASURED} yet**: no result file in `benchmarks/results/` "
                 "comes from a GPU |")
  return "\n".join(lines) + "\n"


def render_all(results_dir: str = RESULTS) -> dict[str, str]:
  """File name under ``generated/`` -> Markdown text, for every kind of result."""
  results = load_results(results_dir)
  pages = {}
  for kind in (*RENDERERS, "other"):
    chosen = [(n, d) for n, d in results if kind_of(d) == kind]
    render = RENDERERS.get(kind, render_other)
    parts = []
    for n, d in chosen:  # each result's table, then its plots
      parts.append(render(d, _rel(os.path.join(results_dir, n))))
      for png in _plots(results_dir, [n]):
        name = os.path.basename(png)
        parts.append(f"```{{image}} /generated/{name}\n:alt: {name}\n:width: 100%\n```\n")
    if not parts and kind == "other":
      parts = ["None: every result file is of one of the kinds above.\n"]
    elif not parts:
      parts = [f"No `{kind}` results in `benchmarks/results/` yet: {NOT_MEASURED}.\n"]
    pages[f"results_{kind}.md"] = "\n".join(parts)
  pages["results_status.md"] = render_status(results)
  pages["results_sweeps.md"] = render_sweeps(results)
  pages["results_cost.md"] = render_cost_summary(results)
  return pages


def _plots(results_dir: str, json_names: list[str]) -> list[str]:
  """The PNGs of these JSON files: named ``<stem>.png`` or ``<stem>_*.png`` after the JSON whose
  stem is the longest match (``reproduce_cpu_sweep_x.png`` belongs to ``reproduce_cpu_sweep``)."""
  all_stems = [os.path.splitext(os.path.basename(p))[0]
               for p in glob.glob(os.path.join(results_dir, "*.json"))]
  wanted = {os.path.splitext(n)[0] for n in json_names}
  out = []
  for png in sorted(glob.glob(os.path.join(results_dir, "*.png"))):
    base = os.path.basename(png)
    owners = [s for s in all_stems if base == s + ".png" or base.startswith(s + "_")]
    if owners and max(owners, key=len) in wanted:
      out.append(png)
  return out


def _write_if_changed(path: str, text: str) -> None:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return  # keep the mtime: an incremental build then skips the pages that include it.
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def generate(out_dir: str = GENERATED, results_dir: str = RESULTS) -> list[str]:
  """Writes the generated pages and copies the plots; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, text in render_all(results_dir).items():
    path = os.path.join(out_dir, name)
    _write_if_changed(path, text)
    written.append(path)
  for png in glob.glob(os.path.join(results_dir, "*.png")):
    target = os.path.join(out_dir, os.path.basename(png))
    if not os.path.exists(target) or os.path.getmtime(target) < os.path.getmtime(png):
      shutil.copyfile(png, target)
    written.append(target)
  return written


def _on_config_inited(app: Any, config: Any) -> None:
  del config
  generate(os.path.join(app.srcdir, "generated"))


def _skip_namedtuple_fields(app: Any, what: str, name: str, obj: Any, skip: bool,
                            options: Any) -> bool | None:
  """Leaves out NamedTuple fields ("Alias for field number N"): the class docstring has them."""
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  if isinstance(doc, str) and doc.startswith("Alias for field number"):
    return True
  return skip


_CONSTANT_ARGUMENT = {"STATS_POLICIES": "stats_policy", "RNG_POLICIES": "rng_policy",
                      "NORMS": "norm"}


def _describe_constants(app: Any, what: str, name: str, obj: Any, options: Any,
                        lines: list[str]) -> None:
  """A tuple constant has tuple's docstring ("Built-in immutable sequence"): say what it is."""
  del app, options
  if what == "data" and isinstance(obj, tuple) and obj.__doc__ == tuple.__doc__:
    short = name.rsplit(".", 1)[-1]
    argument = _CONSTANT_ARGUMENT.get(short)
    what_for = f" of ``{argument}``" if argument else ""
    lines[:] = [f"The accepted values{what_for}: ``{obj!r}``."]


def setup(app: Any) -> dict[str, Any]:
  app.connect("config-inited", _on_config_inited)
  app.connect("autodoc-process-docstring", _describe_constants)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
