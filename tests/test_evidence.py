"""``benchmarks.evidence`` end to end on synthetic data (seconds): the pairing of rows, grouped
AMP at G = 1 against the ungrouped row, the validation choice, and resuming."""

import json
import os

import numpy as np
import pytest

from benchmarks.evidence import cli
from benchmarks.evidence import data
from benchmarks.evidence import presets
from benchmarks.evidence import train

pytestmark = pytest.mark.research


@pytest.fixture(scope="module", params=["smoke", "smoke-bn"])
def name(request):
  return request.param


@pytest.fixture(scope="module")
def trainer(name, tmp_path_factory):
  p = presets.PRESETS[name]
  return train.Trainer(p, data.load(p, str(tmp_path_factory.mktemp("work"))))


def test_rows_of_a_seed_share_initialisation_and_batches(trainer):
  P = trainer.p
  # AMP at epsilon 0 takes ERM's step exactly: equal results only if init and order are shared.
  erm = trainer.run(presets.Row("erm"), 3)
  amp0 = trainer.run(presets.Row("amp", 0.0), 3)
  np.testing.assert_allclose(amp0["last_batch_loss_per_epoch"], erm["last_batch_loss_per_epoch"],
                             rtol=1e-6)
  assert amp0["test_loss"] == pytest.approx(erm["test_loss"], rel=1e-6)
  np.testing.assert_array_equal(train.batch_order(P, 3), train.batch_order(P, 3))
  assert not np.array_equal(train.batch_order(P, 3), train.batch_order(P, 4))


def test_grouped_at_one_group_is_the_amp_row(trainer):
  row = presets.Row("amp", 0.2)
  plain = trainer.run(row, 0)
  grouped = trainer.run(row, 0, grouped=True)
  np.testing.assert_allclose(grouped["last_batch_loss_per_epoch"],
                             plain["last_batch_loss_per_epoch"], rtol=1e-5)
  assert grouped["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
  # ... and the perturbation matters: G = 4 and a large radius train differently.
  g4 = trainer.run(presets.Row("amp", 0.2, 4), 0)
  assert g4["test_loss"] != pytest.approx(plain["test_loss"], rel=1e-5)
  assert trainer.run(presets.Row("amp", 0.2), 0)["test_loss"] != pytest.approx(
      trainer.run(presets.Row("erm"), 0)["test_loss"], rel=1e-5)


def test_end_to_end_resumable(name, tmp_path):
  P = presets.PRESETS[name]
  argv = ["--preset", name, "--out-dir", str(tmp_path), "--work-dir", str(tmp_path)]
  first = cli.main(argv)
  n_sweep = len(presets.sweep_rows(P)) * len(P.sweep_seeds)
  n_final = len(presets.final_rows(
      P, {k: v["row"] for k, v in presets.choose(P, first["runs"]).items()})) * len(P.final_seeds)
  assert first["new_runs"] == len(first["runs"]) == n_sweep + n_final
  with open(tmp_path / f"evidence_{name}.json") as f:
    saved = json.load(f)
  assert saved["machines"][0]["cpu_count"] == os.cpu_count()
  for run in saved["runs"].values():
    assert run["test_images"] == P.test_size and run["wall_s"] > 0
  for fam, c in saved["choice"].items():  # the choice is the best validation mean of its grid
    assert c["val"][c["label"]] == max(c["val"].values()), fam
  md = (tmp_path / f"evidence_{name}.md").read_text()
  assert "Final (paired seeds)" in md and "− AMP(m=B)" in md
  second = cli.main(argv)
  assert second["new_runs"] == 0 and second["runs"] == first["runs"]
  # One more final seed runs the final rows once more, and nothing of the sweep again.
  third = cli.main([*argv, "--final-seeds", str(len(P.final_seeds) + 1)])
  assert third["new_runs"] == n_final // len(P.final_seeds)
  assert third["choice"] == second["choice"]
  # Extra rows (one epsilon at every m) run on the final seeds and get their own table.
  # A row that is also a final row is not run twice (same row, same seed).
  fourth = cli.main([*argv, "--final-seeds", str(len(P.final_seeds) + 1),
                     "--extra-rows", "amp:0.05:1,amp:0.05:4"])
  extra = [presets.Row("amp", 0.05, 1), presets.Row("amp", 0.05, 4)]
  seeds = range(len(P.final_seeds) + 1)
  already = sum(presets.run_key("final", r, s) in third["runs"] for r in extra for s in seeds)
  assert fourth["new_runs"] == 2 * len(seeds) - already
  assert not any(presets.run_key("extra", r, s) in fourth["runs"] for r in extra for s in seeds
                 if presets.run_key("final", r, s) in fourth["runs"])
  md = (tmp_path / f"evidence_{name}.md").read_text()
  assert "| AMP eps=0.05 G=4 | 4 |" in md


def test_batchnorm_policies_against_numpy():
  # Per-group statistics of a batch of 12 in 3 groups of m = 4, combined by each policy.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 5)) * rng.uniform(0.5, 2, size=(3, 1, 5)) + rng.normal(size=(3, 1, 5))
  stats = [{"mean": x.mean(1), "var": x.var(1)}]  # what each group's pass returns (biased)
  start = [{"mean": rng.normal(size=5), "var": rng.uniform(1, 2, size=5)}]
  running = {q: start for q in train.POLICIES}
  out = train.update_running(running, stats, 4, 0.9)
  whole = x.reshape(12, 5)
  expected_var = {"groups_mean": x.var(1).mean(0), "unbiased": x.var(1, ddof=1).mean(0),
                  "whole_batch": whole.var(0)}
  for q in train.POLICIES:
    np.testing.assert_allclose(out[q][0]["mean"], 0.9 * start[0]["mean"] + 0.1 * whole.mean(0),
                               rtol=1e-6)
    np.testing.assert_allclose(out[q][0]["var"], 0.9 * start[0]["var"] + 0.1 * expected_var[q],
                               rtol=1e-6)


def test_batchnorm_run_evaluates_every_policy(tmp_path):
  p = presets.PRESETS["smoke-bn"]
  t = train.Trainer(p, data.load(p, str(tmp_path)))
  grouped = t.run(presets.Row("amp", 0.05, 4), 0)
  assert set(grouped["bn_policies"]) == set(train.POLICIES)
  assert grouped["test_acc"] == grouped["bn_policies"]["groups_mean"]["test_acc"]
  # One trajectory, three sets of running statistics: at m = 4 each policy evaluates differently.
  losses = [grouped["bn_policies"][q]["test_loss"] for q in train.POLICIES]
  assert len(set(losses)) == 3, losses
  # At one group the whole batch is the group: "whole_batch" is "groups_mean" exactly.
  erm = t.run(presets.Row("erm"), 0)
  assert erm["bn_policies"]["whole_batch"] == erm["bn_policies"]["groups_mean"]


def test_batchnorm_preset_reports_policies_and_ghost_batchnorm(tmp_path):
  argv = ["--preset", "smoke-bn", "--out-dir", str(tmp_path), "--work-dir", str(tmp_path)]
  cli.main(argv)
  md = (tmp_path / "evidence_smoke-bn.md").read_text()
  assert "BatchNorm running statistics" in md and "`whole_batch` − `groups_mean`" in md
  assert "ghost BatchNorm alone" not in md  # no epsilon-0 grouped rows yet
  cli.main([*argv, "--extra-rows", "amp:0:4"])
  md = (tmp_path / "evidence_smoke-bn.md").read_text()
  assert "## The ascent against ghost BatchNorm alone" in md
  chosen = presets.choose(presets.PRESETS["smoke-bn"], json.loads(
      (tmp_path / "evidence_smoke-bn.json").read_text())["runs"])["amp G=4"]["row"]
  assert f"| {chosen.label} | 4 |" in md
