"""The study's grouped-ascent rows (issue 17) on the smoke model: each train step against a
reference written by hand (per-group passes with plain ``model.apply``, the perturbation by its
formula), G = 1 against the ungrouped step, the choice per G on validation accuracy, and the
grouped tables end to end (``study-smoke --table grouped-sweep`` then ``grouped``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import study
from benchmarks.study import models
from benchmarks.study import presets
from benchmarks.study import runner
from benchmarks.study.data import MEAN
from benchmarks.study.data import STD
from examples.cifar import data as cifar_data

pytestmark = pytest.mark.research

N, STEPS = 16, 3


def _batch(seed):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, (N,)).astype(np.int32))


def _start(model):
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  return (jax.tree.map(jnp.array, variables["params"]),
          jax.tree.map(jnp.array, variables["batch_stats"]))


def _run_study_step(model, setting, config):
  init, step = runner.make_runner(model, setting, config, 20)
  params, bstats = _start(model)
  opt_state = init(params)
  for i in range(STEPS):
    x, y = _batch(i)
    params, bstats, opt_state, _, _ = step(params, bstats, opt_state, x, y, jax.random.key(i))
  return params, bstats


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def _run_reference(model, setting, config):
  """Per group j (examples j*m .. (j+1)*m - 1): the clean gradient g_j with BatchNorm on the
  group's own statistics; the ascent (AMP, K = 1, global ball: Delta_j = inner_lr g_j scaled
  back to epsilon; SAM: rho g_j / ||g_j||); the gradient at theta + Delta_j; their mean to the
  same outer optimiser. New running statistics: the mean of the groups' clean passes'."""
  groups = setting.num_groups
  m = N // groups
  base = runner._base(config, 20)  # pylint: disable=protected-access
  params, bstats = _start(model)
  opt_state = base.init(params)

  def loss(p, s, x, y):
    logits, new = model.apply({"params": p, "batch_stats": s}, x, train=True,
                              mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new["batch_stats"]

  grad = jax.jit(jax.grad(loss, has_aux=True))
  for i in range(STEPS):
    images, labels = _batch(i)
    x = cifar_data.normalize(images, MEAN, STD)
    grads, new_stats = [], []
    for j in range(groups):
      xj, yj = x[j * m:(j + 1) * m], labels[j * m:(j + 1) * m]
      g, s = grad(params, bstats, xj, yj)
      new_stats.append(s)
      if setting.method != "erm":
        if setting.method == "sam":
          scale = setting.rho / _global_norm(g)
        else:
          scale = setting.inner_lr * jnp.minimum(
              1.0, setting.epsilon / (setting.inner_lr * _global_norm(g)))
        g, _ = grad(jax.tree.map(lambda p, d, scale=scale: p + scale * d, params, g), bstats,
                    xj, yj)
      grads.append(g)
    mean = jax.tree.map(lambda *g: sum(g) / groups, *grads)
    updates, opt_state = base.update(mean, opt_state, params)
    params = optax.apply_updates(params, updates)
    bstats = jax.tree.map(lambda *s: sum(s) / groups, *new_stats)
  return params, bstats


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("setting", [
    presets.Setting("erm", num_groups=4),
    presets.Setting("amp", epsilon=0.05, norm="global", num_groups=4),
    presets.Setting("sam", rho=0.05, num_groups=2),
], ids=lambda s: s.label)
def test_grouped_step_matches_hand_written_reference(setting):
  model = models.get_model("micro")
  config = presets.Config("micro", False, N, 0, 1, N, lr=0.1)
  got = _run_study_step(model, setting, config)
  want = _run_reference(model, setting, config)
  assert _max_diff(got, want) < 2e-5
  # Not vacuous: grouping (ghost batch norm, per-group ascent) changes the step.
  whole = _run_study_step(model, presets.Setting(**{**setting.as_dict(), "num_groups": 1}),
                          config)
  assert _max_diff(got, whole) > 1e-4


@pytest.mark.parametrize("setting", [presets.Setting("amp", epsilon=0.05, norm="global"),
                                     presets.Setting("sam", rho=0.05)], ids=lambda s: s.label)
def test_one_group_is_the_ungrouped_step(setting):
  # G = 1 through the grouped path (grouped_amp(num_groups=1), vmap over one group) against the
  # study's ungrouped step (amp without grouping; optax.contrib.sam for SAM).
  model = models.get_model("micro")
  config = presets.Config("micro", False, N, 0, 1, N, lr=0.1)
  base = runner._base(config, 20)  # pylint: disable=protected-access
  one_group_tx = optax.chain(_one_group_amp(setting), base)
  grouped_step = runner.make_grouped_train_step(model, one_group_tx, False, 1, ascent=True)
  plain_tx = runner.make_tx(setting, config, 20)
  plain_step = runner.make_train_step(model, plain_tx, False)
  results = []
  for step, tx in ((grouped_step, one_group_tx), (plain_step, plain_tx)):
    params, bstats = _start(model)
    opt_state = tx.init(params)
    for i in range(STEPS):
      x, y = _batch(i)
      params, bstats, opt_state, _, _ = step(params, bstats, opt_state, x, y, jax.random.key(i))
    results.append((params, bstats))
  assert _max_diff(*results) < 1e-6


def _one_group_amp(setting):
  import amp_optax  # pylint: disable=g-import-not-at-top

  if setting.method == "sam":
    return amp_optax.grouped_amp(setting.rho, num_groups=1, inner_lr=presets.SAM_INNER_LR,
                                 norm="global")
  return amp_optax.grouped_amp(setting.epsilon, num_groups=1, norm=setting.norm,
                               relative=setting.radius == "relative")


def test_grouped_choice_uses_validation_per_group_count():
  def row(setting, val, test):
    return {"setting": setting.as_dict(), "runs": {"100": {"val_acc": val, "test_acc": test}}}
  amp4_val = presets.Setting("amp", epsilon=0.1, norm="global", num_groups=4)
  amp4_test = presets.Setting("amp", epsilon=0.3, norm="global", num_groups=4)
  amp20 = presets.Setting("amp", epsilon=1.0, norm="global", num_groups=20)
  sam4 = presets.Setting("sam", rho=0.2, num_groups=4)
  whole = presets.Setting("amp", epsilon=0.03, norm="global")  # another G: never chosen at 4
  sweep = {"groups": [{"config": {"model": "mid"}, "rows": [
      row(amp4_val, 0.6, 0.4), row(amp4_test, 0.5, 0.7), row(amp20, 0.9, 0.9),
      row(whole, 0.95, 0.95), row(sam4, 0.5, 0.5)]}]}
  choice, how = presets.choose_grouped(sweep, "mid", 4)
  assert choice == {"amp": amp4_val, "sam": sam4} and "validation" in how
  assert presets.choose_grouped(sweep, "mid", 20) is None  # no SAM row at G = 20
  assert presets.choose_grouped(sweep, "small", 4) is None


def test_grouped_labels_keep_the_ungrouped_ones():
  # Old tables (no num_groups field) keep their labels; grouped rows say G.
  assert presets.Setting("erm").label == "ERM"
  assert presets.Setting("erm", num_groups=4).label == "ERM ghost-BN G=4"
  assert presets.Setting("sam", rho=0.2, num_groups=20).label == "SAM rho=0.2 G=20"
  old = {k: v for k, v in presets.Setting("amp", epsilon=0.1).as_dict().items()
         if k != "num_groups"}
  assert presets.Setting(**old).label == "AMP abs per_tensor eps=0.1"


def test_grouped_smoke_tables(tmp_path):
  common = ["--preset", "study-smoke", "--out-dir", str(tmp_path), "--work-dir",
            str(tmp_path / "work"), "--seeds", "1"]
  study.main(common + ["--table", "grouped-sweep"])
  out = study.main(common + ["--table", "grouped"])
  saved = json.loads((tmp_path / "study_smoke.json").read_text())
  (chosen,) = saved["grouped_choices"]["micro"].values()
  labels = {presets.Setting(**chosen[k]).label for k in ("amp", "sam")}
  assert all("G=4" in lab for lab in labels)
  rows = {r["label"]: r for r in saved["groups"][0]["rows"] if r["runs"]}
  for lab in ("ERM", "ERM ghost-BN G=4", *labels):
    assert list(rows[lab]["runs"]) == ["0"], lab
  md = out["markdown"]
  assert "## Grouped ascent (m-sharpness)" in md
  for lab in labels:
    assert f"| 8 | {lab} | 1 |" in md  # m = 32 / 4
  timing = {r["label"] for r in saved["step_time"]["micro"]}
  assert {"ERM", "ERM ghost-BN G=4", *labels} <= timing
