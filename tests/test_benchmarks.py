"""Smoke tests of benchmarks/step_time.py and benchmarks/reproduce.py, and of the PyTorch AMP
step the step-time benchmark compares against.

The scripts run in subprocesses, as from the command line (no timing is asserted); their JSON
must hold the expected rows with finite, positive numbers.
"""

import importlib.util
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")


def _run_module(module: str, *args: str, timeout: int = 300) -> str:
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout


def _smoke(tmp_path, module: str, name: str) -> tuple[str, dict]:
  """``module --smoke`` writing ``name``: its stdout and the JSON it wrote."""
  out_path = tmp_path / name
  stdout = _run_module(module, "--smoke", "--out", str(out_path))
  return stdout, json.loads(out_path.read_text())


def _finite_positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_time_smoke(tmp_path):
  out_path = tmp_path / "step_time.json"
  # 17 JAX rows, each compiled: minutes on a loaded 2-core machine.
  stdout = _run_module("benchmarks.step_time", "--smoke", "--out", str(out_path), timeout=600)
  assert "ms/step" in stdout and "compile time" in stdout
  out = json.loads(out_path.read_text())
  names = [(r["framework"], r["name"]) for r in out["rows"]]
  expected = [("jax", "ERM"), ("jax", "AMP K=1 per_tensor"), ("jax", "AMP K=2 per_tensor"),
              ("jax", "AMP K=1 global"), ("jax", "AMP K=2 global"),
              ("jax", "AMP K=2 per_tensor loop"), ("jax", "AMP K=2 per_tensor unroll"),
              ("jax", "SAM opaque (optax.contrib)"),
              # The cheaper step: ascend=step % k == 0 decided in Python, reuse_correction.
              *[("jax", f"AMP K=1 per_tensor every {k} {b} py")
                for k in (2, 4) for b in ("clean", "reuse")],
              # AMP at ERM's cost (issue 16).
              ("jax", "AMP K=1 per_tensor drop-in momentum"),
              ("jax", "AMP K=1 per_tensor drop-in gradient"),
              ("jax", "AMP K=1 per_tensor late 25%"),
              ("jax", "AMP K=1 per_tensor every 8 reuse py"),
              # Grouped ascent (issue 17); G = 16 does not divide the smoke batch of 8.
              ("jax", "AMP K=1 global G=4")]
  assert names[:len(expected)] == expected
  if importlib.util.find_spec("torch") is not None:
    assert names[len(expected):] == [("torch", "ERM"), ("torch", "AMP K=1 per_tensor"),
                                     ("torch", "AMP K=2 per_tensor")]
  for r in out["rows"]:
    for k in ("ms_median", "ms_p10", "ms_p90", "ratio_vs_erm", "ratio_vs_jax_erm"):
      assert _finite_positive(r[k]), (r["name"], k, r[k])
    assert math.isfinite(r["final_loss"])
  assert out["rows"][0]["ratio_vs_erm"] == 1.0
  assert [r["grad_evals"] for r in out["rows"][:17]] == [
      1, 2, 3, 2, 3, 3, 3, 2, 1.5, 1.5, 1.25, 1.25, 1, 2, 1.25, 1.125, 2]
  # The steps decided in Python also time each kind of step on its own.
  by_name = {r["name"]: r for r in out["rows"] if r["framework"] == "jax"}
  for name in ("AMP K=1 per_tensor late 25%", "AMP K=1 per_tensor every 8 reuse py",
               "AMP K=1 per_tensor every 2 clean py"):
    assert _finite_positive(by_name[name]["ms_ascent_step"]), name
    assert _finite_positive(by_name[name]["ms_between_step"]), name
  assert "ms_ascent_step" not in by_name["AMP K=1 per_tensor drop-in momentum"]
  assert "each kind on its own" in stdout
  assert _finite_positive(out["param_bytes"])
  assert [m["name"] for m in out["memory"]] == [n for _, n in expected]
  for m in out["memory"]:
    if m["stats"] is not None:  # CPU reports buffer sizes; other backends may not.
      assert _finite_positive(m["stats"]["footprint_bytes"])
      assert math.isfinite(m["extra_footprint_param_units"])
  assert [(c["inner_steps"], c.get("unroll", False)) for c in out["compile"]] == [
      (0, False), (1, 1), (2, 1), (1, True), (2, True)]
  for c in out["compile"]:
    assert _finite_positive(c["compile_s"]) and _finite_positive(c["trace_lower_s"])


POSITIVE = ("final_test_acc", "best_epoch_test_acc", "final_train_loss")
# Far from a minimum (one tiny epoch) a random perturbation may lower the loss, and the
# dominant Hessian eigenvalue may be negative: these need only be finite.
FINITE = ("hessian_top_eigenvalue", "perturbation_increase_mean")


def _check_reproduce_json(out, labels, seeds):
  assert [r["label"] for r in out["rows"]] == labels
  for r in out["rows"]:
    assert r["seeds"] == seeds
    for k in POSITIVE + FINITE:
      assert math.isfinite(r[k + "_mean"]), (r["label"], k, r[k + "_mean"])
      assert math.isfinite(r[k + "_std"]) and r[k + "_std"] >= 0
    for k in POSITIVE:
      assert _finite_positive(r[k + "_mean"]), (r["label"], k, r[k + "_mean"])
    assert r["hessian_top_eigenvalue_mean"] != 0
    assert r["best_epoch_test_acc_mean"] >= r["final_test_acc_mean"]
  for label in labels:
    assert len(out["runs"][label]) == seeds
    for run in out["runs"][label]:
      assert 1 <= run["best_epoch"] <= len(run["history"])


@pytest.mark.research
def test_reproduce_smoke(tmp_path):
  stdout, out = _smoke(tmp_path, "benchmarks.reproduce", "reproduce.json")
  assert "| setting |" in stdout
  assert out["data"] == "synthetic CIFAR-shaped data"
  _check_reproduce_json(out, ["ERM", "AMP eps=0.5 per_tensor K=1", "SAM rho=0.05"], seeds=2)
  md = (tmp_path / "reproduce.md").read_text()
  assert "best epoch" in md and "AMP eps=0.5" in md


@pytest.mark.research
@pytest.mark.skipif(not os.path.exists(BUILD_PY), reason="../shared/data is not available")
def test_reproduce_builds_real_cifar(tmp_path):
  out_path = tmp_path / "real.json"
  _run_module("benchmarks.reproduce", "--preset", "smoke", "--data", "build", "--sweep",
              "--epsilons", "0.1", "--sweep-norms", "global", "--train-size", "64",
              "--test-size", "32",
              "--seeds", "1", "--out", str(out_path))
  out = json.loads(out_path.read_text())
  assert out["data"] == "CIFAR-10 (JPEG copy)"
  _check_reproduce_json(out, ["ERM", "AMP eps=0.1 global K=1"], seeds=1)


def _enable_x64():
  if callable(getattr(jax, "enable_x64", None)):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # JAX < 0.7.

  return enable_x64()


@pytest.mark.parametrize("inner_steps", [0, 1, 3])
def test_torch_amp_step_matches_amp_optax(inner_steps):
  """The PyTorch step of the benchmark computes the same update as the optax chain."""
  torch = pytest.importorskip("torch")
  from benchmarks import torch_models

  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 5))
  y = rng.integers(0, 3, size=16)
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
  net = net.double()
  w0 = [p.detach().numpy().copy() for p in net.parameters()]
  hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-3, nesterov=True, epsilon=0.05,
            inner_lr=1.0, inner_steps=inner_steps)
  step = torch_models.AmpSGD(net, **hp)
  xt, yt = torch.from_numpy(x), torch.from_numpy(y)
  for _ in range(3):
    step(xt, yt)
  got = [p.detach().numpy() for p in net.parameters()]

  with _enable_x64():
    params = {"w1": jnp.asarray(w0[0].T), "b1": jnp.asarray(w0[1]),
              "w2": jnp.asarray(w0[2].T), "b2": jnp.asarray(w0[3])}

    def loss_fn(p):
      logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.chain(
        amp_optax.amp(hp["epsilon"], inner_lr=hp["inner_lr"], inner_steps=inner_steps),
        optax.add_decayed_weights(hp["weight_decay"]),
        optax.sgd(hp["lr"], momentum=hp["momentum"], nesterov=True))
    state = tx.init(params)
    for _ in range(3):
      grads = jax.grad(loss_fn)(params)
      updates, state = tx.update(grads, state, params, grad_fn=lambda p, _: jax.grad(loss_fn)(p))
      params = optax.apply_updates(params, updates)
    if inner_steps:
      assert float(state[0].delta_norm) > 0
    expected = [params["w1"].T, params["b1"], params["w2"].T, params["b2"]]
    for g, e in zip(got, expected, strict=True):
      np.testing.assert_allclose(g, np.asarray(e), rtol=1e-10, atol=1e-12)


@pytest.mark.research
def test_reproduce_resumes_across_calls_with_a_work_dir(tmp_path):
  """--stop-after leaves runs pending; a second call with the same --work-dir finishes them."""
  work, out1, out2 = tmp_path / "work", tmp_path / "a.json", tmp_path / "b.json"
  common = ["--preset", "smoke", "--epochs", "2", "--seeds", "1", "--methods", "erm",
            "--work-dir", str(work)]
  _run_module("benchmarks.reproduce", *common, "--stop-after", "1", "--out", str(out1))
  first = json.loads(out1.read_text())
  assert first["rows"] == []
  assert first["pending"] == [{"setting": "ERM", "seed": 0, "epochs_done": 1, "epochs": 2}]
  _run_module("benchmarks.reproduce", *common, "--out", str(out2))
  second = json.loads(out2.read_text())
  assert second["pending"] == []
  (run,) = second["runs"]["ERM"]
  assert [h["epoch"] for h in run["history"]] == [1, 2]
  assert np.isfinite(run["final_test_acc"])


@pytest.mark.slow
def test_one_group_per_device_costs_per_device_what_ungrouped_amp_does():
  # Grouped ascent with the group axis sharded (issue 17): each device holds one group, so its
  # compiled step's temporary memory matches ungrouped AMP's on the same mesh (the per-group
  # gradients and perturbed copies are divided among the devices), and exceeds ERM's.
  from benchmarks import step_memory  # pylint: disable=g-import-not-at-top

  stats = step_memory.sharded_memory(step_memory.parse_args([]))
  erm, amp, grouped = (s["temp_size_in_bytes"] for s in stats.values())
  assert list(stats)[2].startswith("AMP K=1 global, 4 groups on 4 devices")
  assert erm < grouped <= 1.01 * amp


@pytest.mark.research
def test_grouped_passes_smoke(tmp_path):
  stdout, out = _smoke(tmp_path, "benchmarks.grouped_passes", "grouped_passes.json")
  assert "x AMP" in stdout
  # The library's choice on CPU, read from each step's jaxpr: the CNN loops, the MLP does not.
  assert out["backend"] == "cpu"
  assert out["models"]["cnn"]["default_loops"] == {"4": True}
  assert out["models"]["bn_mlp"]["default_loops"] == {"4": False}
  for m in out["models"].values():
    assert [r["name"] for r in m["rows"]] == [
        "ERM", "AMP", "G=4 default", "G=4 loop", "G=4 vmap"]
    assert all(_finite_positive(r["ms_median"]) and _finite_positive(r["x_amp"])
               for r in m["rows"])
