"""Smoke tests of the study (benchmarks/study/) on synthetic data (seconds), and of its pieces.

* the Python-dispatched cheaper step (``amp(..., reuse_correction=)`` with ``update(...,
  ascend=)``, two jitted steps alternated from Python) is, step by step, the arithmetic the
  published cheaper-step rows were trained with (0.1's hand-written two-jit form);
* the paired t-interval matches a hand computation;
* the sweep's selection picks the best validation accuracy, never the test accuracy;
* the whole table runs end to end (``study-smoke``), writes JSON / markdown / plots, and resumes
  without redoing finished runs;
* ``python -m benchmarks.study`` and ``python -m benchmarks.reproduce --preset study-*`` reach
  the study's command line.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from benchmarks import study
from benchmarks.study import cli
from benchmarks.study import data
from benchmarks.study import models
from benchmarks.study import presets
from benchmarks.study import runner
from benchmarks.study import stats

pytestmark = pytest.mark.research


def _batch(n, seed):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, (n,)).astype(np.int32))


def _reference_every_k(model, setting, config, total_steps):
  """amp_optax 0.1's study code for the cheaper step, written out: an always-ascending ``amp``
  and the base optimiser in two jitted steps, the correction (adversarial minus clean gradient
  of the last ascent) kept by hand and added on the steps between ascents with "reuse"."""
  base = runner._base(config, total_steps)  # pylint: disable=protected-access
  amp_tx = amp_optax.amp(setting.epsilon, inner_lr=setting.inner_lr, norm=setting.norm,
                         relative=setting.radius == "relative")
  reuse = setting.between == "reuse"
  batch_loss = runner._losses(model, config.augment)  # pylint: disable=protected-access

  def ascent(params, batch_stats, opt_state, images, labels, key):
    amp_state, base_state, corr = opt_state
    loss_fn = batch_loss(images, labels, key, batch_stats)
    (_, (_, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    adv, amp_state = amp_tx.update(grads, amp_state, params,
                                   grad_fn=lambda p, _: jax.grad(lambda q: loss_fn(q)[0])(p))
    if reuse:
      corr = jax.tree.map(jnp.subtract, adv, grads)
    updates, base_state = base.update(adv, base_state, params)
    return optax.apply_updates(params, updates), new_stats, (amp_state, base_state, corr)

  def clean(params, batch_stats, opt_state, images, labels, key):
    amp_state, base_state, corr = opt_state
    loss_fn = batch_loss(images, labels, key, batch_stats)
    (_, (_, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if reuse:
      grads = jax.tree.map(jnp.add, grads, corr)
    updates, base_state = base.update(grads, base_state, params)
    return optax.apply_updates(params, updates), new_stats, (amp_state, base_state, corr)

  def init(params):
    corr = jax.tree.map(jnp.zeros_like, params) if reuse else ()
    return (amp_tx.init(params), base.init(params), corr)

  return init, {True: jax.jit(ascent), False: jax.jit(clean)}


@pytest.mark.parametrize("between", ["clean", "reuse"])
def test_python_dispatched_step_is_the_published_arithmetic(between):
  # Every cheaper-step row was trained with 0.1's hand-written two-jit form; 0.2 builds it from
  # amp(..., reuse_correction=) and update(..., ascend=). 0.1's lax.cond form ("cond" rows) was
  # the same arithmetic and now builds the Python form too.
  model = models.get_model("micro")
  # With augmentation: every form draws the same crops and flips from the same keys.
  config = presets.Config("micro", True, 16, 0, 1, 16, lr=0.1)
  setting = presets.Setting("amp", epsilon=0.05, radius="relative", ascent_every=2,
                            between=between)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  schedule = [True, False, True, False]  # ascent, in between (clean or reuse), ...
  runs = []
  for dispatch in ("cond", "python"):
    s = presets.Setting(**{**setting.as_dict(), "dispatch": dispatch})
    init, step = runner.make_runner(model, s, config, 20)
    params = jax.tree.map(jnp.array, variables["params"])
    stats = jax.tree.map(jnp.array, variables["batch_stats"])
    opt_state = init(params)
    trace = []
    for i in range(len(schedule)):
      x, y = _batch(16, i)
      params, stats, opt_state, loss, _ = step(params, stats, opt_state, x, y,
                                               jax.random.key(i))
      trace.append(jax.tree.map(np.asarray, (params, stats)))
    runs.append(trace)
  init, steps = _reference_every_k(model, setting, config, 20)
  params = jax.tree.map(jnp.array, variables["params"])
  stats = jax.tree.map(jnp.array, variables["batch_stats"])
  opt_state = init(params)
  want = []
  for i, ascend in enumerate(schedule):
    x, y = _batch(16, i)
    params, stats, opt_state = steps[ascend](params, stats, opt_state, x, y, jax.random.key(i))
    want.append(jax.tree.map(np.asarray, (params, stats)))
  for trace in runs:
    for a, b in zip(trace, want, strict=True):
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7)
  # Not vacuous: the first step ascends, so it differs from plain SGD's; and "reuse" changes
  # the step between ascents.
  init, step = runner.make_runner(model, presets.Setting("erm"), config, 20)
  params = jax.tree.map(jnp.array, variables["params"])
  stats = jax.tree.map(jnp.array, variables["batch_stats"])
  x, y = _batch(16, 0)
  erm_first, *_ = step(params, stats, init(params), x, y, jax.random.key(0))
  diff = max(float(np.max(np.abs(u - np.asarray(v)))) for u, v in
             zip(jax.tree.leaves(runs[0][0][0]), jax.tree.leaves(erm_first), strict=True))
  assert diff > 1e-5


def test_reuse_changes_the_steps_between_ascents():
  model = models.get_model("micro")
  config = presets.Config("micro", False, 16, 0, 1, 16, lr=0.1)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  out = []
  for between in ("clean", "reuse"):
    s = presets.Setting("amp", epsilon=0.05, radius="relative", ascent_every=2,
                        between=between, dispatch="python")
    init, step = runner.make_runner(model, s, config, 20)
    params = jax.tree.map(jnp.array, variables["params"])
    stats = jax.tree.map(jnp.array, variables["batch_stats"])
    opt_state = init(params)
    trace = []
    for i in range(2):
      x, y = _batch(16, i)
      params, stats, opt_state, _, _ = step(params, stats, opt_state, x, y, jax.random.key(i))
      trace.append(jax.tree.map(np.asarray, params))
    out.append(trace)
  assert _leaves_close(out[0][0], out[1][0])  # the ascent steps agree
  assert not _leaves_close(out[0][1], out[1][1])  # the next step adds the correction


def test_paired_ci_matches_hand_computation():
  a = [0.60, 0.62, 0.61, 0.65, 0.63]
  b = [0.58, 0.61, 0.60, 0.61, 0.60]
  d = np.array(a) - np.array(b)
  out = stats.paired_ci(a, b)
  half = 2.7764451051977987 * d.std(ddof=1) / math.sqrt(5)  # t_{0.975, 4}
  assert out["n"] == 5
  assert out["mean"] == pytest.approx(d.mean())
  assert out["lo"] == pytest.approx(d.mean() - half)
  assert out["hi"] == pytest.approx(d.mean() + half)


def test_choice_uses_validation_not_test_accuracy():
  def row(setting, val, test):
    return {"setting": setting.as_dict(),
            "runs": {"0": {"val_acc": val, "test_acc": test}}}
  good_val = presets.Setting("amp", epsilon=0.1, radius="relative")
  good_test = presets.Setting("amp", epsilon=0.5)
  sam = presets.Setting("sam", rho=0.05)
  sweep = {"groups": [{"config": {"model": "tiny"}, "rows": [
      row(presets.Setting("erm"), 0.9, 0.9), row(good_val, 0.6, 0.4), row(good_test, 0.5, 0.7),
      row(sam, 0.5, 0.5)]}]}
  choice, how = presets.choose_from_sweep(sweep, "tiny")
  assert choice["amp"] == good_val and choice["sam"] == sam
  assert "sweep" in how
  choice, how = presets.choose_from_sweep(sweep, "mid")
  assert choice == presets.FALLBACK_CHOICE and "fallback" in how


def test_smoke_table_end_to_end_and_resume(tmp_path, capsys):
  # The aug and paper blocks only repeat rows with other configs: left out to save compiles.
  args = ["--preset", "study-smoke", "--out-dir", str(tmp_path), "--work-dir",
          str(tmp_path / "work"), "--blocks", "core", "cheaper"]
  out = study.main(args)
  path = tmp_path / "study_smoke.json"
  saved = json.loads(path.read_text())
  assert (tmp_path / "study_smoke.md").exists()
  assert (tmp_path / "study_smoke_sharpness.png").stat().st_size > 0
  labels = [r["label"] for r in saved["groups"][0]["rows"]]
  assert labels[0] == "ERM" and any("every=2 reuse" in lab for lab in labels)
  assert [g["config"]["augment"] for g in saved["groups"]] == [False]
  for g in saved["groups"]:
    for r in g["rows"]:
      assert sorted(r["runs"]) == ["0", "1"], r["label"]
      for run in r["runs"].values():
        for k in ("test_acc", "val_acc", "train_loss", "hessian_top_eigenvalue",
                  "perturb_increase"):
          assert math.isfinite(run[k]), (r["label"], k)
      if r["label"] != "ERM":
        ci = r["summary"]["test_acc_minus_erm"]
        assert ci["n"] == 2 and ci["lo"] <= ci["mean"] <= ci["hi"]
  timing = saved["step_time"]["micro"]
  assert timing[0]["label"] == "ERM" and timing[0]["ratio_vs_erm"] == 1.0
  assert any("(python)" in r["label"] for r in timing)
  assert all(r["ms_median"] > 0 for r in timing)
  assert "| ERM |" in out["markdown"]
  # A second call finds every run done: it trains nothing and keeps the numbers.
  capsys.readouterr()
  study.main(args + ["--skip-timing"])
  assert "seed" not in capsys.readouterr().out.split("# study-smoke")[0]
  again = json.loads(path.read_text())
  assert again["groups"][0]["rows"][0]["runs"] == saved["groups"][0]["rows"][0]["runs"]


def test_ratio_ci_is_fiellers_set():
  import scipy.stats  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  y = 3.0 + rng.normal(size=5)
  x = 0.6 * y + 0.3 * rng.normal(size=5)
  lo, hi = stats.ratio_ci(x, y)
  crit = scipy.stats.t.ppf(0.975, 4)

  def t_stat(r):
    d = x - r * y
    return abs(d.mean()) / (d.std(ddof=1) / math.sqrt(5))

  assert lo < x.mean() / y.mean() < hi
  assert t_stat(lo) == pytest.approx(crit) and t_stat(hi) == pytest.approx(crit)
  assert t_stat(0.5 * (lo + hi)) < crit
  # A denominator not clearly away from 0: the ratio is not pinned down.
  assert stats.ratio_ci(x, y - y.mean()) == (-math.inf, math.inf)


def _micro_state(model):
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  return (jax.tree.map(jnp.array, variables["params"]),
          jax.tree.map(jnp.array, variables["batch_stats"]))


def _leaves_close(a, b):
  return all(np.allclose(u, v, rtol=1e-5, atol=1e-7)
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_late_phase_is_erm_then_amp():
  model = models.get_model("micro")
  config = presets.Config("micro", False, 16, 0, 1, 16, lr=0.1)
  amp = presets.Setting("amp", epsilon=0.05, radius="relative")
  late = presets.Setting(**{**amp.as_dict(), "variant": "late"})
  traces = {}
  for s in (presets.Setting("erm"), late):
    init, step = runner.make_runner(model, s, config, 4)  # AMP on the last step only
    params, bstats = _micro_state(model)
    opt_state = init(params)
    traces[s.label] = []
    for i in range(4):
      x, y = _batch(16, i)
      params, bstats, opt_state, _, _ = step(params, bstats, opt_state, x, y, jax.random.key(i))
      traces[s.label].append(jax.tree.map(np.asarray, params))
  erm, lt = traces["ERM"], traces[late.label]
  assert all(_leaves_close(a, b) for a, b in zip(erm[:3], lt[:3], strict=True))
  assert not _leaves_close(erm[3], lt[3])


@pytest.mark.parametrize("variant", ["momentum", "drop-in"])
def test_drop_in_variants_evaluate_unperturbed_params(variant):

  model = models.get_model("micro")
  config = presets.Config("micro", False, 16, 0, 1, 16, lr=0.1)
  s = presets.Setting("amp", epsilon=0.05, radius="relative", variant=variant)
  assert presets.calls_per_step(s) == (2 if variant == "drop-in" else 1)
  init, step = runner.make_runner(model, s, config, 10)
  params, bstats = _micro_state(model)
  opt_state = init(params)
  for i in range(3):  # drop-in: ascent, descent, ascent (held perturbed)
    x, y = _batch(16, i)
    params, bstats, opt_state, _, _ = step(params, bstats, opt_state, x, y, jax.random.key(i))
  assert int(opt_state.count) == (1 if variant == "drop-in" else 3)  # descent steps
  theta = runner.eval_params(s, params, opt_state)
  assert _leaves_close(theta, opt_state.theta)
  assert not _leaves_close(theta, params)  # the step holds perturbed parameters
  assert _leaves_close(theta, amp_optax.unperturbed_params(params, opt_state))
  assert runner.eval_params(presets.Setting("erm"), params, opt_state) is params


def test_cheap_settings_share_amps_epsilon():
  amp = presets.Setting("amp", epsilon=0.1, norm="global")
  settings = presets.cheap_settings(amp)
  assert settings[:2] == [presets.Setting("erm"), amp]
  assert len({s.label for s in settings}) == 6
  for s in settings[1:]:
    assert (s.epsilon, s.norm, s.radius, s.inner_lr) == (0.1, "global", "absolute", 1.0)
  assert sorted(s.variant for s in settings[2:5]) == sorted(presets.VARIANTS)
  assert (settings[5].ascent_every, settings[5].between, settings[5].dispatch) == (
      8, "reuse", "python")


def test_cheap_smoke_table(tmp_path):
  args = ["--preset", "study-smoke", "--table", "cheap", "--out-dir", str(tmp_path),
          "--work-dir", str(tmp_path / "work")]
  out = study.main(args)
  saved = json.loads((tmp_path / "study_smoke.json").read_text())
  (group,) = saved["groups"]
  rows = {r["label"]: r for r in group["rows"]}
  labels = [s.label for s in presets.cheap_settings(presets.FALLBACK_CHOICE["amp"])]
  assert list(rows) == labels
  for r in rows.values():
    assert sorted(r["runs"]) == ["0", "1"], r["label"]
    assert all(math.isfinite(run["test_acc"]) for run in r["runs"].values())
  timing = {r["label"]: r for r in saved["step_time"]["micro"]}
  assert list(timing) == labels
  late = timing[labels[4]]
  assert late["derived"] and late["ratio_vs_erm"] == pytest.approx(
      0.75 + 0.25 * timing[labels[1]]["ratio_vs_erm"])
  md = out["markdown"]
  assert "## AMP at ERM's cost" in md
  for label in labels[1:]:
    assert f"| micro | {label} | 2 |" in md
  assert "## The cheaper step" not in md  # study-cheap groups: in their own section only


def test_real_presets_say_when_data_is_missing(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "BUILD_PY", str(tmp_path / "absent" / "build.py"))
  with pytest.raises(SystemExit, match="no data"):
    study.main(["--preset", "study-sweep", "--out-dir", str(tmp_path)])
  assert not os.path.exists(tmp_path / "study_sweep.json")


def test_reproduce_dispatches_study_presets(monkeypatch):
  from benchmarks import reproduce  # pylint: disable=g-import-not-at-top

  calls = []
  monkeypatch.setattr(study, "main", lambda argv: calls.append(argv) or {"ok": True})
  assert reproduce.main(["--preset", "study-final", "--models", "mid"]) == {"ok": True}
  assert reproduce.main(["--preset=study-sweep"]) == {"ok": True}
  assert calls == [["--preset", "study-final", "--models", "mid"], ["--preset=study-sweep"]]
  assert not reproduce._study_preset(["--preset", "cpu", "--sweep"])
  assert not reproduce._study_preset(["--smoke"])


def test_python_m_benchmarks_study_is_the_command_line():
  assert study.main is cli.main
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.study", "--help"], cwd=repo,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--preset" in proc.stdout and "study-final" in proc.stdout
