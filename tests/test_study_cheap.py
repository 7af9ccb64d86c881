"""Smoke tests of study-cheap2 (issue 25: a radius chosen for each cheap variant), on synthetic
data and the micro model (seconds each, the end-to-end table about a minute):

* every variant's perturbation lies on the sphere at inner_lr = 1e6: the applied |Delta| that
  the optimiser state reports is the radius (epsilon, or epsilon·|theta| for a relative one);
* the two signs of the momentum direction: -m is the library's drop_in_amp(ascent="momentum")
  (Momentum-SAM's sign), +m is its mirror image (the same theta, the opposite Delta);
* the random-direction control perturbs by a fresh direction of norm epsilon each step;
* the chosen epsilon of each variant is the one with the best validation accuracy, not test;
* the smoke sweep and table run end to end and record the applied |Delta|.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from benchmarks import study
from benchmarks.study import models
from benchmarks.study import presets
from benchmarks.study import runner

pytestmark = pytest.mark.research

CONFIG = presets.Config("micro", False, 16, 0, 1, 16, lr=0.1)
SPHERE = presets.SAM_INNER_LR


def _batch(n, seed):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, (n,)).astype(np.int32))


def _state(model):
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  return (jax.tree.map(jnp.array, variables["params"]),
          jax.tree.map(jnp.array, variables["batch_stats"]))


def _run(setting, steps, total=10):
  """``steps`` train steps of ``setting``; per step the parameters held, the optimiser state's
  applied |Delta|, and the unperturbed parameters."""
  model = models.get_model("micro")
  init, step = runner.make_runner(model, setting, CONFIG, total)
  params, bstats = _state(model)
  opt_state = init(params)
  out = []
  for i in range(steps):
    x, y = _batch(16, i)
    params, bstats, opt_state, _, _ = step(params, bstats, opt_state, x, y, jax.random.key(i))
    theta = runner.eval_params(setting, params, opt_state)
    out.append((jax.tree.map(np.asarray, params), float(runner.delta_norm_of(opt_state)),
                jax.tree.map(np.asarray, theta)))
  return out


def _gnorm(tree):
  return float(amp_optax.global_l2_norm(tree))


def _sub(a, b):
  return jax.tree.map(lambda u, v: np.asarray(u, np.float64) - np.asarray(v, np.float64), a, b)


AMP_ABS = presets.Setting("amp", epsilon=0.05, norm="global", radius="absolute")
AMP_REL = presets.Setting("amp", epsilon=0.01, norm="global", radius="relative")


@pytest.mark.parametrize("amp", [AMP_ABS, AMP_REL], ids=["absolute", "relative"])
@pytest.mark.parametrize("key,multiple", [("momentum -m", 30), ("momentum +m", 30),
                                          ("every=8 reuse", 30), ("every=8 clean", 5),
                                          ("random", 30), ("random, one pass", 30)])
def test_applied_delta_is_on_the_sphere(amp, key, multiple):
  s = presets.cheap2_variant(amp, key, multiple)
  assert s.inner_lr == SPHERE and presets.cheap2_key(s) == key
  assert s.epsilon == pytest.approx(multiple * amp.epsilon)
  for params, applied, theta in _run(s, 3):
    radius = s.epsilon * (_gnorm(theta) if amp.radius == "relative" else 1.0)
    if key.startswith("momentum") or key == "random, one pass":
      # Drop-in: the step holds theta + Delta, and Delta is on the sphere of radius epsilon
      # (the first call's Delta comes from the first gradient).
      assert applied == pytest.approx(radius, rel=2e-3)
      assert _gnorm(_sub(params, theta)) == pytest.approx(radius, rel=2e-3)
    elif key == "random":
      assert applied == pytest.approx(
          s.epsilon * (_gnorm(theta) if amp.radius == "relative" else 1.0), rel=0.05)
  if key.startswith("every"):
    trace = _run(s, 3)
    # Step 0 ascends (on the sphere of radius epsilon around the parameters it started from);
    # steps 1 and 2 do not (delta_norm 0).
    model = models.get_model("micro")
    p0, _ = _state(model)
    radius = s.epsilon * (_gnorm(p0) if amp.radius == "relative" else 1.0)
    assert trace[0][1] == pytest.approx(radius, rel=2e-3)
    assert trace[1][1] == 0.0 and trace[2][1] == 0.0


def test_late_phase_delta_on_the_sphere_only_at_the_end():
  for frac_variant, total in (("late10", 10), ("late", 4)):
    s = presets.cheap2_variant(AMP_ABS, "late 10%" if frac_variant == "late10" else "late 25%",
                               10)
    trace = _run(s, total, total=total)
    applied = [a for _, a, _ in trace]
    assert applied[:-1] == [0.0] * (total - 1)  # ERM before the last 10% / 25% of the steps
    assert applied[-1] == pytest.approx(s.epsilon, rel=2e-3)


def test_momentum_minus_is_the_library_and_plus_its_mirror():
  eps = 0.5
  minus = presets.cheap2_variant(AMP_ABS, "momentum -m", eps / AMP_ABS.epsilon)
  plus = presets.cheap2_variant(AMP_ABS, "momentum +m", eps / AMP_ABS.epsilon)
  assert minus.variant == "momentum" and plus.variant == "momentum+"
  lib = _run(minus, 4)  # drop_in_amp(ascent="momentum", inner_lr=1e6)
  # The same arithmetic written out in benchmarks code with sign -1 gives the same run.
  model = models.get_model("micro")
  base = runner._base(CONFIG, 10)  # pylint: disable=protected-access
  tx = runner.momentum_direction(base, eps, -1.0, norm="global")
  step = runner.make_train_step(model, tx, False, plain=True)
  params, bstats = _state(model)
  opt_state = tx.init(params)
  for i, (want_params, want_applied, want_theta) in enumerate(lib):
    x, y = _batch(16, i)
    params, bstats, opt_state, _, _ = step(params, bstats, opt_state, x, y, jax.random.key(i))
    np.testing.assert_allclose(float(opt_state.delta_norm), want_applied, rtol=1e-4)
    for u, v in zip(jax.tree.leaves(opt_state.theta), jax.tree.leaves(want_theta), strict=True):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
  # The first step's gradient is at theta itself (Delta starts at 0): both signs reach the same
  # theta, and hold it at opposite perturbations, -rho m/|m| (the library, Momentum-SAM's sign:
  # along the descent direction) and +rho m/|m| (along the averaged gradient).
  up = _run(plus, 2)
  (p_minus, _, t_minus), (p_plus, _, t_plus) = lib[0], up[0]
  for u, v in zip(jax.tree.leaves(t_minus), jax.tree.leaves(t_plus), strict=True):
    np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)
  d_minus, d_plus = _sub(p_minus, t_minus), _sub(p_plus, t_plus)
  for u, v in zip(jax.tree.leaves(d_minus), jax.tree.leaves(d_plus), strict=True):
    np.testing.assert_allclose(u, -v, rtol=1e-3, atol=1e-6)
  assert _gnorm(d_plus) == pytest.approx(eps, rel=1e-3)
  # Delta_minus points against the first gradient (its dot product with it is negative).
  x, y = _batch(16, 0)
  p0, b0 = _state(model)
  batch_loss = runner._losses(model, False)  # pylint: disable=protected-access
  g0 = jax.grad(lambda p: batch_loss(x, y, jax.random.key(0), b0)(p)[0])(p0)
  assert float(optax.tree.vdot(g0, jax.tree.map(jnp.asarray, d_minus))) < 0
  assert float(optax.tree.vdot(g0, jax.tree.map(jnp.asarray, d_plus))) > 0
  # After the first step the two runs differ (the gradients are taken at opposite points).
  assert not np.allclose(jax.tree.leaves(lib[1][2])[0], jax.tree.leaves(up[1][2])[0])


def test_random_direction_has_norm_epsilon_and_changes_each_step():
  params = {"w": jnp.ones((5, 4)), "b": jnp.zeros(3)}
  seen = []

  def grad_fn(p, _):
    seen.append(_sub(p, params))
    return jax.tree.map(jnp.zeros_like, p)

  for norm, relative, want in (("global", False, 0.3), ("global", True, 0.3 * np.sqrt(20)),
                               ("per_tensor", False, 0.3 * np.sqrt(2))):
    seen.clear()
    tx = runner.random_direction(0.3, norm=norm, relative=relative)
    state = tx.init(params)
    for _ in range(2):
      _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params, grad_fn=grad_fn)
      assert float(state.delta_norm) == pytest.approx(want, rel=1e-5)
      assert _gnorm(seen[-1]) == pytest.approx(want, rel=1e-5)
    assert not np.allclose(seen[0]["w"], seen[1]["w"])
    if norm == "per_tensor":
      assert np.linalg.norm(seen[0]["b"]) == pytest.approx(0.3, rel=1e-5)


def test_random_one_pass_takes_the_controls_epsilon_and_one_gradient():
  rnd = presets.cheap2_variant(AMP_REL, "random", 30)
  sweep = {"groups": [{"config": dataclasses.asdict(presets.Config("small", False, 1, 1, 1)),
                       "rows": [_row(rnd, [0.5], [0.5])]}]}
  chosen = presets.choose_cheap2(sweep, "small")
  one = presets.Setting(**chosen["random, one pass"]["setting"])
  assert one == presets.cheap2_variant(AMP_REL, "random, one pass", 30)
  assert chosen["random, one pass"]["from_variant"] == "random"
  assert one.variant in presets.PLAIN_VARIANTS and rnd.variant not in presets.PLAIN_VARIANTS
  # One pass: the step's only gradient is at the parameters it holds (theta + Delta), so its
  # first step from theta_0 equals the base optimiser's step with the gradient there.
  model = models.get_model("micro")
  trace = _run(one, 2)
  params, applied, theta = trace[0]
  assert applied == pytest.approx(one.epsilon * _gnorm(theta), rel=2e-3)
  assert not np.allclose(jax.tree.leaves(_sub(trace[1][0], trace[1][2]))[0],
                         jax.tree.leaves(_sub(params, theta))[0])  # a fresh Delta each step
  erm_init, erm_step = runner.make_runner(model, presets.Setting("erm"), CONFIG, 10)
  p0, b0 = _state(model)
  x, y = _batch(16, 0)
  p1, *_ = erm_step(p0, b0, erm_init(p0), x, y, jax.random.key(0))
  assert _leaves_equal(p1, theta)


def _leaves_equal(a, b):
  return all(np.allclose(u, v, rtol=1e-5, atol=1e-7)
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _row(setting, vals, tests):
  return {"label": setting.label, "setting": setting.as_dict(),
          "runs": {str(i): {"val_acc": v, "test_acc": t} for i, (v, t) in
                   enumerate(zip(vals, tests, strict=True))}}


def test_choice_is_the_best_validation_accuracy_per_variant():
  amp = AMP_REL
  grid = [presets.cheap2_variant(amp, "momentum +m", m) for m in (3, 10, 30)]
  late = [presets.cheap2_variant(amp, "late 25%", m) for m in (1, 3, 10)]
  rows = [_row(presets.Setting("erm"), [0.9], [0.9]), _row(amp, [0.95], [0.95]),
          # val best at 10x, test best at 30x
          _row(grid[0], [0.40, 0.42], [0.40, 0.40]), _row(grid[1], [0.45, 0.47], [0.41, 0.41]),
          _row(grid[2], [0.43, 0.43], [0.50, 0.50]),
          _row(late[0], [0.41], [0.5]), _row(late[1], [0.40], [0.6]), _row(late[2], [0.44], [0.3])]
  sweep = {"groups": [{"config": dataclasses.asdict(presets.Config("small", False, 1, 1, 1)),
                       "rows": rows}]}
  chosen = presets.choose_cheap2(sweep, "small")
  assert set(chosen) == {"momentum +m", "late 25%"}
  assert presets.Setting(**chosen["momentum +m"]["setting"]) == grid[1]
  assert presets.Setting(**chosen["late 25%"]["setting"]) == late[2]
  assert [e for e, _, _ in chosen["momentum +m"]["grid"]] == [s.epsilon for s in grid]
  assert chosen["momentum +m"]["grid"][1][1] == pytest.approx(0.46)
  final = presets.cheap2_final_settings(amp, chosen)
  assert final == [presets.Setting("erm"), amp, grid[1], late[2]]
  assert presets.choose_cheap2(sweep, "mid") == {}


def test_grids_reach_thirty_times_amps_epsilon():
  for key, _, grid in presets.CHEAP2_VARIANTS:
    if key.startswith(("momentum", "every")):
      assert max(grid) >= 30 and min(grid) <= 3, key
    s = presets.cheap2_variant(AMP_ABS, key, grid[-1])
    assert presets.cheap2_key(s) == key
    assert s.inner_lr == SPHERE and s.norm == "global" and s.radius == "absolute"
  labels = [presets.cheap2_variant(AMP_ABS, k, g[0]).label for k, _, g in presets.CHEAP2_VARIANTS]
  assert len(set(labels)) == len(labels)
  assert presets.cheap2_key(AMP_ABS) is None and presets.cheap2_key(presets.Setting("erm")) is None


def test_cheap2_smoke_sweep_and_table(tmp_path, monkeypatch):
  monkeypatch.setattr(presets, "SMOKE_CHEAP2", ("momentum +m",))
  common = ["--preset", "study-smoke", "--out-dir", str(tmp_path), "--work-dir",
            str(tmp_path / "work"), "--seeds", "1"]
  study.main(common + ["--table", "cheap2-sweep"])
  sweep = json.loads((tmp_path / "study_smoke.json").read_text())
  (group,) = sweep["groups"]
  rows = {r["label"]: r for r in group["rows"]}
  grid = dict((k, g) for k, _, g in presets.CHEAP2_VARIANTS)["momentum +m"][::2]
  assert len(rows) == 2 + len(grid)  # ERM, full AMP, momentum +m over the smoke grid
  amp = presets.FALLBACK_CHOICE["amp"]
  for m in grid:
    s = presets.cheap2_variant(amp, "momentum +m", m)
    run = rows[s.label]["runs"]["0"]
    assert run["delta_norm_last_epoch"] > 0 and run["perturbed_share_last_epoch"] == 1.0
  assert rows["ERM"]["runs"]["0"]["delta_norm_last_epoch"] is None
  assert "each variant over its own grid" in sweep["markdown"]
  out = study.main(common + ["--table", "cheap2"])
  saved = json.loads((tmp_path / "study_smoke.json").read_text())
  chosen = saved["cheap2_choices"]["micro"]["momentum +m"]
  vals = {e: v for e, v, _ in chosen["grid"]}
  assert chosen["setting"]["epsilon"] == max(vals, key=vals.get)
  timing = {r["label"]: r for r in saved["step_time"]["micro"]}
  assert _chosen_label(chosen) in timing
  assert "a radius chosen for each variant" in out["markdown"]
  assert "| momentum +m |" in out["markdown"]


def _chosen_label(chosen):
  return presets.Setting(**chosen["setting"]).label
