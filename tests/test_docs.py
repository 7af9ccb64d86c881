"""The documentation site (docs/): its code runs, it builds without warnings, its links resolve.

* Every ```python block of ``docs/**/*.md`` runs as printed, each in a fresh namespace (so each
  is complete), with ``__name__ == "__docs__"`` (a block's ``if __name__ == "__main__":`` part,
  such as ``jax.distributed.initialize()``, is for running it as a script).
* ``sphinx-build -W --keep-going -b html`` passes (one build, into a temporary folder, in one
  test); every public name has its own API page; every relative link and anchor in the built
  HTML resolves (links to other sites are not checked: no network); the benchmarks page shows the
  numbers of ``benchmarks/results/*.json``.
* The example notebook shown in the docs (stored executed) has the cells of
  ``examples/notebooks/``.
* What the accumulation guide says about where ``optax.apply_if_finite`` goes holds, for a NaN
  in the clean gradient and for a NaN at the perturbed point only.

The Sphinx tests skip, saying so, only when the ``docs`` extra is not installed
(``pip install -e ".[docs]"``).
"""

import glob
import html
import html.parser
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import time
import traceback
from typing import NamedTuple
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
sys.path.insert(0, os.path.join(DOCS, "_ext"))
import amp_docs  # noqa: E402  (docs/_ext/amp_docs.py: the results renderers)

pytestmark = pytest.mark.docs

DOCS_PACKAGES = ("sphinx", "myst_nb", "sphinx_book_theme", "sphinx_copybutton", "sphinx_design")
MISSING = [p for p in DOCS_PACKAGES if importlib.util.find_spec(p) is None]
needs_sphinx = pytest.mark.skipif(
    bool(MISSING), reason=f"the docs extra is not installed (missing {', '.join(MISSING)}): "
    'pip install -e ".[docs]"')

GUIDES = ("algorithm", "hyperparameters", "flax_nnx", "flax_linen", "equinox", "drop_in", "grouped",
          "schedules", "mixed_precision", "accumulation", "distributed", "amp_vs_sam",
          "diagnostics")
# Pages with commands only (```bash / ```text), no Python to run.
PAGES_WITHOUT_PYTHON = ("guides/cifar", "development")


class Block(NamedTuple):
  path: str  # relative to docs/
  line: int  # 1-based line of the first code line
  code: str

  @property
  def label(self) -> str:
    return f"{self.path}:L{self.line}"


def _markdown_sources() -> list[str]:
  out = []
  for path in sorted(glob.glob(os.path.join(DOCS, "**", "*.md"), recursive=True)):
    rel = os.path.relpath(path, DOCS)
    if rel.split(os.sep)[0] in ("_build", "generated"):
      continue
    out.append(rel)
  return out


def _python_blocks(rel: str) -> list[Block]:
  with open(os.path.join(DOCS, rel), encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    fence = re.match(r"^(`{3,})(.*)$", lines[i])
    if fence:
      ticks, info = fence.group(1), fence.group(2).strip()
      end = i + 1
      while end < len(lines) and not lines[end].startswith(ticks):
        end += 1
      assert end < len(lines), f"docs/{rel}:{i + 1}: a {ticks} fence is never closed"
      if info == "python":
        blocks.append(Block(rel, i + 2, "\n".join(lines[i + 1:end]) + "\n"))
      i = end
    i += 1
  return blocks


BLOCKS = [b for rel in _markdown_sources() for b in _python_blocks(rel)]


def test_the_blocks_are_found():
  """Each guide and the getting-started page have code (so the test below cannot pass empty)."""
  pages = {b.path for b in BLOCKS}
  for page in ["getting_started.md"] + [os.path.join("guides", g + ".md") for g in GUIDES]:
    assert page in pages, f"docs/{page} has no ```python block (or the page is missing)"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.label for b in BLOCKS])
def test_python_block_runs_as_printed(block):
  code = compile(block.code, os.path.join(DOCS, block.path), "exec")
  # Line numbers in tracebacks point at the block's lines in the .md file.
  code = code.replace(co_firstlineno=block.line)
  try:
    exec(code, {"__name__": "__docs__"})  # noqa: S102
  except Exception:  # noqa: BLE001
    pytest.fail(f"docs/{block.path}, the block at line {block.line}, failed:\n"
                f"{traceback.format_exc()}", pytrace=False)


# ---------------------------------------------------------------------------------------------
# The generated benchmark pages (no Sphinx needed).


def _load(name):
  with open(os.path.join(amp_docs.RESULTS, name), encoding="utf-8") as f:
    return json.load(f)


def test_renderers_show_every_row_of_the_results():
  pages = amp_docs.render_all()
  names = [os.path.basename(p) for p in glob.glob(os.path.join(amp_docs.RESULTS, "*.json"))]
  assert names, "benchmarks/results/ has no JSON: the benchmarks page would be empty"
  for name in names:
    data = _load(name)
    if data.get("smoke"):
      continue
    page = pages[f"results_{amp_docs.kind_of(data)}.md"]
    assert name in page, f"{name} is not on the benchmarks page"
    if data.get("benchmark") == "step_time":
      for row in data["rows"]:
        assert f"| {row['name']} | {row['framework']} |" in page, (name, row["name"])
        assert f"{row['ms_median']:.1f}" in page, (name, row["name"], row["ms_median"])
    if data.get("benchmark") == "collectives":
      erm = {(r["setup"], r["mode"]): r["total_bytes"] for r in data["rows"]
             if r["method"] == "erm"}
      for row in data["rows"]:
        ratio = row["total_bytes"] / erm[(row["setup"], row["mode"])]
        assert (f"| {row['setup']} | {row['mode']} | {row['variant']} |" in page
                and f"| {row['total_bytes']:,} | {ratio:.2f} |" in page), (name, row)
    if data.get("benchmark") == "reproduce":
      for row in data["rows"]:
        acc = f"{100 * row['final_test_acc_mean']:.2f} ± {100 * row['final_test_acc_std']:.2f}"
        assert f"| {row['label']} | {acc} |" in page, (name, row["label"])


def test_status_says_gpu_is_not_measured_until_a_gpu_result_exists():
  results = amp_docs.load_results()
  gpu = [n for n, d in results if amp_docs.platform_of(d) == "gpu"]
  status = amp_docs.render_status(results)
  assert ("gpu | **not measured yet**" in status) == (not gpu), status
  fake = results + [("step_time_x_gpu.json", {"benchmark": "step_time",
                                              "environment": {"platform": "gpu"}})]
  assert "not measured yet" not in amp_docs.render_status(fake)


def _study_run(test, val, train=0.1, eig=5.0, inc=0.01):
  return {"test_acc": test, "val_acc": val, "train_loss": train, "hessian_top_eigenvalue": eig,
          "perturb_increase": inc}


def _summary(runs):
  mean = lambda k: sum(r[k] for r in runs) / len(runs)
  return {"seeds": list(range(len(runs))),
          **{k: {"mean": mean(k), "std": 0.0} for k in runs[0]},
          "test_acc_minus_erm": {"n": 2, "mean": 0.01, "lo": -0.02, "hi": 0.04}}


def test_study_renderers_on_a_study_shaped_result():
  """The study's JSON layout (benchmarks/study/: groups of rows of runs and summaries), made up."""
  def row(method, eps, norm, radius, test, val):
    runs = [_study_run(test, val), _study_run(test + 0.02, val)]
    setting = {"method": method, "epsilon": eps, "norm": norm, "radius": radius,
               "ascent_every": 1}
    return {"label": f"{method} {radius} {norm} eps={eps}", "setting": setting,
            "runs": {str(i): r for i, r in enumerate(runs)}, "summary": _summary(runs)}

  group = {"config": {"model": "tiny", "augment": False, "epochs": 60, "batch_size": 128},
           "rows": [row("erm", None, None, None, 0.50, 0.50),
                    row("amp", 0.1, "per_tensor", "absolute", 0.52, 0.55),
                    row("amp", 0.5, "per_tensor", "absolute", 0.60, 0.51),  # best test, not val
                    row("amp", 0.03, "global", "relative", 0.53, 0.54)]}
  data = {"benchmark": "study", "preset": "study-sweep", "data": "CIFAR-10 (JPEG copy)",
          "train_size": 2000, "val_size": 1000, "test_size": 5000, "groups": [group],
          "machine": {"backend": "cpu", "jax": "0.10.2"}}
  page = amp_docs.render_study(data, "study_sweep.json")
  assert "| amp absolute per_tensor eps=0.5 | 2 | 61.00 ± 0.00 | +1.00 [-2.00, +4.00] |" in page
  sweeps = amp_docs.render_sweeps([("study_sweep.json", data)])
  # The best ε is chosen by validation accuracy (0.1), not by test accuracy (0.5).
  assert re.search(r"AMP absolute per_tensor \(tried ε = 0.1, 0.5\) \| 0.1 \|", sweeps), sweeps
  assert re.search(r"AMP relative global \(tried ε = 0.03\) \| 0.03 \|", sweeps), sweeps


def test_a_result_of_another_kind_is_shown_as_a_table():
  data = {"benchmark": "a_new_benchmark", "environment": {"platform": "cpu"},
          "rows": [{"mode": "jit", "method": "AMP K=1", "all_reduce_ops": 2, "bytes": 176212}]}
  assert amp_docs.kind_of(data) == "other"
  page = amp_docs.render_other(data, "a_new_benchmark.json")
  assert "| mode | method | all_reduce_ops | bytes |" in page
  assert "| jit | AMP K=1 | 2 | 176212 |" in page


# ---------------------------------------------------------------------------------------------
# The example notebook, stored executed.


def _cells(path):
  with open(path, encoding="utf-8") as f:
    nb = json.load(f)
  return nb["cells"]


def test_the_notebook_in_the_docs_is_the_current_example():
  for source in glob.glob(os.path.join(REPO, "examples", "notebooks", "*.ipynb")):
    name = os.path.basename(source)
    stored = os.path.join(DOCS, "notebooks", name)
    assert os.path.exists(stored), f"docs/notebooks/{name} is missing"
    fix = f"Refresh it: python docs/_ext/refresh_notebook.py {name}"
    want = [(c["cell_type"], "".join(c["source"])) for c in _cells(source)]
    got = [(c["cell_type"], "".join(c["source"])) for c in _cells(stored)]
    assert got == want, f"docs/notebooks/{name} differs from examples/notebooks/{name}. {fix}"
    for i, cell in enumerate(_cells(stored)):
      if cell["cell_type"] != "code":
        continue
      assert cell.get("execution_count"), f"cell {i} of docs/notebooks/{name} never ran. {fix}"
      errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
      assert not errors, f"cell {i} of docs/notebooks/{name} stored an error. {fix}"


# ---------------------------------------------------------------------------------------------
# Where optax.apply_if_finite goes (docs/guides/accumulation.md, "NaN and inf").

EPS, INNER_LR, LR = 3.5, 10.0, 0.1


def _loss(p):
  return -jnp.sum(jnp.sqrt(1.0 - p))  # finite for p <= 1, NaN beyond


def _grad_fn(p, _inner_step):
  return jax.grad(_loss)(p)


def _placements():
  amp = lambda: amp_optax.amp(EPS, inner_lr=INNER_LR)
  return {
      "outside": optax.apply_if_finite(optax.chain(amp(), optax.sgd(LR, momentum=0.9)), 5),
      "inside": optax.chain(amp(), optax.apply_if_finite(optax.sgd(LR, momentum=0.9), 5)),
  }


def _one_step(tx, params, clean_grads):
  state = tx.init(params)
  updates, new_state = tx.update(clean_grads, state, params, grad_fn=_grad_fn)
  return optax.apply_updates(params, updates), state, new_state


def _momentum_trace(state):
  return optax.tree_utils.tree_get(state, "trace")


def test_perturbed_point_reaches_nan():
  """The set-up of the tests below: finite at θ, NaN at θ + Δ (from an independent Δ)."""
  params = jnp.full(3, 0.2)
  g = jax.grad(_loss)(params)
  assert np.all(np.isfinite(g))
  # One ascent step projected onto the per-tensor ball, computed here with NumPy.
  step = INNER_LR * np.asarray(g)
  delta = step * min(1.0, EPS / np.linalg.norm(step))
  assert np.all(params + delta > 1) and np.all(np.isnan(jax.grad(_loss)(params + delta)))


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_apply_if_finite_all_finite_changes_nothing(placement):
  """Control: with finite gradients both placements step as the chain without the guard."""
  params = jnp.array([-3.0, -2.0, -4.0])  # θ + Δ stays below 1: everything finite
  plain = optax.chain(amp_optax.amp(EPS, inner_lr=INNER_LR), optax.sgd(LR, momentum=0.9))
  expected, _, _ = _one_step(plain, params, jax.grad(_loss)(params))
  got, _, _ = _one_step(_placements()[placement], params, jax.grad(_loss)(params))
  assert np.all(np.isfinite(expected)) and not np.allclose(expected, params)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_apply_if_finite_nan_clean_gradient_skips_the_step(placement):
  """A NaN in the clean gradient: both placements leave θ and the momentum as they were."""
  params = jnp.full(3, 0.2)
  clean = jax.grad(_loss)(params).at[1].set(jnp.nan)
  new_params, state, new_state = _one_step(_placements()[placement], params, clean)
  np.testing.assert_array_equal(new_params, params)
  _assert_same(_momentum_trace(new_state), _momentum_trace(state))
  assert optax.tree_utils.tree_get(new_state, "total_notfinite") == 1
  count = optax.tree_utils.tree_get(new_state, "count")
  # Outside, the whole chain is skipped (AmpState too); inside, amp ran and only sgd was skipped.
  assert count == (0 if placement == "outside" else 1)


def test_apply_if_finite_outside_misses_nan_at_perturbed_point():
  """Outside, a finite clean gradient passes the check: the NaN at θ + Δ reaches θ."""
  params = jnp.full(3, 0.2)
  new_params, _, new_state = _one_step(_placements()["outside"], params,
                                       jax.grad(_loss)(params))
  assert optax.tree_utils.tree_get(new_state, "total_notfinite") == 0
  assert np.all(np.isnan(new_params))


def test_apply_if_finite_inside_catches_nan_at_perturbed_point():
  """Inside, the check sees ∇L(θ + Δ): the step is skipped, θ and the momentum stay."""
  params = jnp.full(3, 0.2)
  new_params, state, new_state = _one_step(_placements()["inside"], params,
                                           jax.grad(_loss)(params))
  assert optax.tree_utils.tree_get(new_state, "total_notfinite") == 1
  np.testing.assert_array_equal(new_params, params)
  _assert_same(_momentum_trace(new_state), _momentum_trace(state))
  assert optax.tree_utils.tree_get(new_state, "count") == 1  # AmpState still advances


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ---------------------------------------------------------------------------------------------
# The Sphinx build.


def _build(out):
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", DOCS, str(out)],
      capture_output=True, text=True, cwd=REPO, timeout=900,
      env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"})
  return proc, out, time.perf_counter() - start


def _check_pages_built(proc, out, seconds):
  assert proc.returncode == 0, (
      f"sphinx-build -W failed ({seconds:.0f} s):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
  for page in (["index", "getting_started", "benchmarks", "changelog", "api/index",
                "notebooks/amp_nnx_digits"] + [f"guides/{g}" for g in GUIDES]
               + list(PAGES_WITHOUT_PYTHON)):
    assert (out / f"{page}.html").exists(), f"{page}.html was not built"


def _public_names() -> list[str]:
  names = []
  amp_optax = importlib.import_module("amp_optax")
  names += [f"amp_optax.{n}" for n in amp_optax.__all__
            if not inspect.ismodule(getattr(amp_optax, n))]
  for module in ("amp_optax.flax_nnx", "amp_optax.flax_linen"):
    mod = importlib.import_module(module)
    names += [f"{module}.{n}" for n in mod.__all__]
  diagnostics = importlib.import_module("amp_optax.diagnostics")
  names += [f"amp_optax.diagnostics.{n}" for n, obj in vars(diagnostics).items()
            if not n.startswith("_") and getattr(obj, "__module__", None) == diagnostics.__name__
            and (inspect.isfunction(obj) or inspect.isclass(obj))]
  return names


def _check_api_pages(out):
  names = _public_names()
  assert "amp_optax.amp" in names and "amp_optax.flax_linen.TrainState" in names, names
  missing = []
  for name in names:
    page = out / "api" / "_autosummary" / f"{name}.html"
    if not page.exists() or f'id="{name}"' not in page.read_text(encoding="utf-8"):
      missing.append(name)
  assert not missing, (f"no API page documenting {missing}: add them to the autosummary lists "
                       "in docs/api/*.md")
  # The docstring's example and argument list made it onto the page of amp.
  text = _visible_text(out / "api" / "_autosummary" / "amp_optax.amp.html")
  for expected in ("inner_steps", "batch_axis_name", "relative", "reuse_correction",
                   "amp_optax.amp(0.05)"):
    assert expected in text, expected


def _visible_text(path):
  """The page without its tags (highlighted code is split into spans), entities decoded."""
  return html.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.links, self.ids = [], set()

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if attrs.get("id"):
      self.ids.add(attrs["id"])
    if tag == "a" and attrs.get("name"):
      self.ids.add(attrs["name"])
    for key in ("href", "src"):
      if attrs.get(key) and not (tag == "link" and "alternate" in (attrs.get("rel") or "")):
        self.links.append(attrs[key])


def _is_external(link):
  return bool(urllib.parse.urlparse(link).scheme) or link.startswith("//")


def _check_internal_links(out):
  """Every relative href/src of every built page names a file that exists, and its #anchor."""
  pages = {}
  for path in out.rglob("*.html"):
    if path.relative_to(out).parts[0] == "_static":
      continue  # the themes' Jinja macro files, copied as static files, are not pages.
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8"))
    pages[path.resolve()] = parser
  broken = []
  checked = 0
  for path, parser in pages.items():
    for link in parser.links:
      if _is_external(link):
        continue
      url = urllib.parse.urlparse(link)
      target = (path.parent / urllib.parse.unquote(url.path)).resolve() if url.path else path
      if target.is_dir():
        target = target / "index.html"
      checked += 1
      if not target.exists():
        broken.append(f"{path.relative_to(out)}: {link} (no such file)")
      elif url.fragment and target.suffix == ".html":
        ids = pages[target].ids if target in pages else set()
        if urllib.parse.unquote(url.fragment) not in ids:
          broken.append(f"{path.relative_to(out)}: {link} (no such anchor)")
  assert checked > 500, f"only {checked} internal links found: is the site complete?"
  assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken))[:50])


def _check_benchmarks_page(out):
  text = (out / "benchmarks.html").read_text(encoding="utf-8")
  for name, data in amp_docs.load_results():
    assert name in text, f"{name} is not on the built benchmarks page"
    for row in data.get("rows", []) if data.get("benchmark") == "step_time" else []:
      assert f"{row['ms_median']:.1f}" in text, (name, row["name"])
  assert "<table" in text
  for png in glob.glob(os.path.join(amp_docs.RESULTS, "*.png")):
    assert (out / "_images" / os.path.basename(png)).exists() or os.path.basename(png) in text


@needs_sphinx
def test_sphinx_site(tmp_path):
  """One build (a build per xdist worker would double the cost), then the checks of the site."""
  out = tmp_path / "html"
  proc, _, seconds = _build(out)
  _check_pages_built(proc, out, seconds)
  _check_api_pages(out)
  _check_internal_links(out)
  _check_benchmarks_page(out)
