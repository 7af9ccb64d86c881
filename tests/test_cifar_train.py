"""Tests of examples/cifar/{models,train}.py on CPU: tiny model, tiny data, few steps.

Multi-device tests use the 8 fake CPU devices of tests/conftest.py. Compiled programs go to a
persistent compilation cache for this module, so that runs repeating a program (resume, the
CLI) do not compile it again.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax
from examples.cifar import config
from examples.cifar import data
from examples.cifar import main as cifar_main
from examples.cifar import models
from examples.cifar import train

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_PY = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-jpeg", "build.py")
TIME_KEYS = ("epoch_time", "eval_time", "compile_time")
# A run of a few seconds: 2 steps of 32 images, 32 test images, one device.
TINY_FLAGS = ("--quick", "--epochs", "1", "--batch-size", "32", "--train-size", "64",
              "--test-size", "32", "--num-devices", "1", "--no-progress")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0)
  jax.config.update(names[2], 0)
  yield
  for n, v in old.items():
    jax.config.update(n, v)


def _config(out_dir, **overrides) -> train.Config:
  settings = dict(quick=True, optimizer="amp", train_size=256, test_size=96, batch_size=32,
                  epochs=2, num_devices=1, out_dir=str(out_dir), progress=False, verbose=False)
  settings.update(overrides)
  return train.Config(**settings)


def _without_times(history):
  return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history]


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """Two epochs of AMP on one device, uninterrupted."""
  return train.train(_config(tmp_path_factory.mktemp("straight")))


# ---------------------------------------------------------------------------------------------
# Models.


def test_model_sizes():
  """The full-size models have the parameter counts of the authors' PyTorch models."""
  x = jnp.zeros((2, 32, 32, 3))
  counts = {"preactresnet18": 11_176_906, "wrn28_10": 36_479_194, "vgg16": 33_646_666}
  for name, expected in counts.items():
    model = models.get_model(name, 10)
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x, train=False))
    assert sum(p.size for p in jax.tree.leaves(shapes["params"])) == expected, name
    assert "batch_stats" in shapes


@pytest.mark.parametrize("name,kwargs", [
    ("preactresnet18", dict(width=4, stage_sizes=(1, 1))),
    ("wrn10_1", {}),
    ("WRN-16-2", {}),
    ("vgg16", dict(stages=((4,), (8, 8)), hidden=16)),
    ("tiny_cnn", dict(width=4)),
])
def test_model_outputs(name, kwargs):
  model = models.get_model(name, num_classes=100, **kwargs)
  x = jnp.zeros((3, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  logits, updates = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
  assert logits.shape == (3, 100) and logits.dtype == jnp.float32
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
      variables["batch_stats"])


def test_unknown_model():
  with pytest.raises(ValueError, match="Unknown model"):
    models.get_model("resnet9000")
  with pytest.raises(ValueError, match="6n\\+4"):
    jax.eval_shape(lambda: models.get_model("wrn12_2").init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


# ---------------------------------------------------------------------------------------------
# The train step.


@pytest.mark.parametrize("optimizer", ["erm", "amp"])
def test_train_step_wiring(optimizer):
  """One step by hand: AMP ascends from the clean gradient, weight decay and Nesterov SGD act
  on the unperturbed parameters, and BatchNorm keeps the clean pass's statistics."""
  model = models.get_model("tiny_cnn", 10, width=4)
  lr, wd, momentum, eps = 0.1, 5e-4, 0.9, 0.05
  tx = train.make_optimizer(optimizer, lr, momentum=momentum, weight_decay=wd, epsilon=eps)
  params, batch_stats, opt_state = train.init_train_state(model, tx, jax.random.key(0))
  mean, std = data.MEAN["cifar10"], data.STD["cifar10"]
  step = jax.jit(train.make_train_step(model, tx, mean=mean, std=std))
  ds = data.synthetic_cifar(16, 1)
  batch = (jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels))
  rng = jax.random.key(5)
  new_params, new_stats, _, metrics = step(params, batch_stats, opt_state, batch, rng)

  @jax.jit
  def reference(params, batch_stats, batch, rng):
    return _reference_step(model, optimizer, params, batch_stats, batch, rng, mean, std,
                           lr=lr, wd=wd, momentum=momentum, eps=eps)

  expected, expected_stats, loss = reference(params, batch_stats, batch, rng)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
               new_params, expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new_stats, expected_stats)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  if optimizer == "amp":
    assert 0 < metrics["amp_delta_norm"] and "amp_perturbed_grad_norm" in metrics


def _reference_step(model, optimizer, params, batch_stats, batch, rng, mean, std, *, lr, wd,
                    momentum, eps):
  x = data.augment(rng, batch[0], mean, std)

  def loss_fn(p):
    logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                              mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean(), upd

  (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
  if optimizer == "amp":
    delta = amp_optax.project_per_tensor(g, eps)
    g = jax.grad(lambda p: loss_fn(p)[0])(jax.tree.map(jnp.add, params, delta))
  # First Nesterov step from a zero trace: update = (1 + momentum) * (g + wd * params).
  expected = jax.tree.map(lambda p, gi: p - lr * (1 + momentum) * (gi + wd * p), params, g)
  return expected, upd["batch_stats"], loss


def test_lr_schedule():
  s = train.make_lr_schedule(0.1, epochs=4, steps_per_epoch=10)
  np.testing.assert_allclose([s(0), s(19), s(20), s(29), s(30), s(39)],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  np.testing.assert_allclose(train.make_lr_schedule(0.1, epochs=1, steps_per_epoch=5)(4), 0.1)


# ---------------------------------------------------------------------------------------------
# Whole runs.


def test_quick_run_learns_and_writes_outputs(straight_run):
  history, c = straight_run.history, straight_run.config
  assert [r["epoch"] for r in history] == [1, 2]
  assert history[1]["train_loss"] < history[0]["train_loss"]
  assert history[1]["test_loss"] < history[0]["test_loss"]
  assert history[0]["lr"] == pytest.approx(0.1) and history[1]["lr"] == pytest.approx(1e-3)
  for key in ("train_acc", "test_acc", "epoch_time", "amp_delta_norm"):
    assert key in history[-1]
  with open(os.path.join(c.out_dir, "metrics.jsonl")) as f:
    assert [json.loads(line) for line in f] == history
  assert os.path.getsize(os.path.join(c.out_dir, "curves.png")) > 1000
  assert sorted(os.listdir(os.path.join(c.out_dir, "checkpoints"))) == ["1", "2"]
  with open(os.path.join(c.out_dir, "config.json")) as f:
    assert json.load(f)["model"] == "tiny_cnn"


def test_resume_is_exact(straight_run, tmp_path):
  """One epoch, stop, resume for the second: the same parameters and metrics as two straight."""
  first = train.train(_config(tmp_path, stop_after=1))
  assert len(first.history) == 1
  resumed = train.train(_config(tmp_path, resume=True))
  assert _without_times(resumed.history) == _without_times(straight_run.history)
  _assert_trees_equal(resumed.params, straight_run.params)
  _assert_trees_equal(resumed.batch_stats, straight_run.batch_stats)
  _assert_trees_equal(resumed.opt_state, straight_run.opt_state)
  with open(tmp_path / "metrics.jsonl") as f:
    assert len(f.readlines()) == 2


def test_resume_refuses_other_settings(straight_run, tmp_path):
  train.train(_config(tmp_path, stop_after=1, checkpoint=False, plot=False))
  with pytest.raises(train.ConfigError, match="epsilon"):
    train.train(_config(tmp_path, resume=True, epsilon=0.1))
  with pytest.raises(FileExistsError, match="--resume"):
    train.train(_config(tmp_path))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_eight_devices_match_one(straight_run, tmp_path):
  sharded = train.train(_config(tmp_path, num_devices=8, checkpoint=False, plot=False))
  assert sharded.params["classifier"]["kernel"].sharding.mesh.devices.size == 8
  for a, b in zip(_without_times(sharded.history), _without_times(straight_run.history),
                  strict=True):
    assert a.keys() == b.keys()
    for k in a:
      assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
  # 16 steps at learning rate 0.1 amplify rounding differences (the 8-way reduction sums in
  # another order; seen up to 0.5 % on one element with jax 0.12), so compare to each array's
  # scale. A semantic difference (per-device Delta, unaveraged gradients) is far larger.
  close = lambda x, y: np.testing.assert_allclose(
      x, y, rtol=1e-2, atol=3e-3 * float(np.max(np.abs(y))))
  jax.tree.map(close, sharded.params, straight_run.params)
  jax.tree.map(close, sharded.batch_stats, straight_run.batch_stats)


def test_batch_not_divisible_by_devices(tmp_path):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (fake) devices")
  with pytest.raises(train.ConfigError, match="divisible"):
    train.train(_config(tmp_path, num_devices=8, batch_size=50))


def test_cli_erm_and_help(tmp_path, capsys):
  metrics = cifar_main.main(["--quick", "--optimizer", "erm", "--epochs", "1", "--batch-size",
                             "32", "--train-size", "256", "--test-size", "96", "--num-devices",
                             "1", "--no-progress", "--no-plot", "--out-dir", str(tmp_path)])
  assert metrics["epoch"] == 1 and 0 <= metrics["test_acc"] <= 1
  assert "amp_delta_norm" not in metrics
  out = capsys.readouterr().out
  assert "final: test acc" in out
  assert f"wrote config.json, metrics.jsonl, checkpoints/ in run directory {tmp_path}" in out
  assert not os.path.exists(tmp_path / "curves.png")  # --no-plot
  with pytest.raises(SystemExit):
    cifar_main.main(["--help"])
  out = capsys.readouterr().out
  for flag in ("--optimizer", "--epsilon", "--inner-steps", "--norm", "--resume", "--quick"):
    assert flag in out


def _subprocess_env():
  # Without PYTHONPATH, so that only the script's own set-up can make `examples` importable.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return {**env, "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("form", ["script", "module"])
def test_cli_forms_print_run_directory(form, tmp_path):
  """`python examples/cifar/train.py` (from any folder) and `python -m examples.cifar.train`
  (from the repository root) both train, and print the run directory at the start and the end;
  the files the last line names are in that directory."""
  out_dir = tmp_path / "run"
  if form == "script":
    command = [sys.executable, os.path.join(REPO, "examples", "cifar", "train.py")]
    cwd = tmp_path  # not the repository root: the script must not rely on it
  else:
    command, cwd = [sys.executable, "-m", "examples.cifar.train"], REPO
  proc = subprocess.run([*command, *TINY_FLAGS, "--out-dir", str(out_dir)], cwd=cwd,
                        capture_output=True, text=True, env=_subprocess_env(), timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == f"run directory: {out_dir}", proc.stdout
  last = [ln for ln in lines if ln.startswith("wrote ")]
  assert len(last) == 1 and last[0].endswith(f" in run directory {out_dir}"), proc.stdout
  named = last[0][len("wrote "):-len(f" in run directory {out_dir}")].split(", ")
  assert named == ["config.json", "metrics.jsonl", "curves.png", "checkpoints/"]
  assert sorted(os.listdir(out_dir)) == ["checkpoints", "config.json", "curves.png",
                                         "metrics.jsonl"]
  assert lines[-1].startswith("final: test acc"), proc.stdout


def test_help_is_plain_text():
  """`--help` (the text a user reads in a terminal) has no reStructuredText markup."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "cifar", "train.py"),
                         "--help"], capture_output=True, text=True, env=_subprocess_env(),
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  for markup in ("``", "::", ":func:", ":mod:", ":class:"):
    assert markup not in proc.stdout, f"{markup!r} in --help:\n{proc.stdout}"
  for text in ("--quick", "--data-dir", "run directory", "cifar-10-batches-py",
               "https://www.cs.toronto.edu/~kriz/cifar.html"):
    assert text in proc.stdout, text


def test_split_modules_share_one_config():
  """train.py re-exports the settings that benchmarks import from it."""
  assert train.Config is config.Config and train.ConfigError is config.ConfigError


def test_sam_runs(tmp_path):
  metrics = train.run(_config(tmp_path, optimizer="sam", epochs=1, checkpoint=False, plot=False))
  assert np.isfinite(metrics["train_loss"]) and "amp_delta_norm" not in metrics


def test_cli_reports_missing_data(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "examples.cifar.train", "--data-dir", str(tmp_path / "none"),
       "--epochs", "1", "--out-dir", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "does not exist" in proc.stderr and "build.py" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_real_data_dir_run(tmp_path):
  """A quick run on 500 real CIFAR-10 images built by ../shared (skipped where absent)."""
  if not os.path.exists(BUILD_PY):
    pytest.skip("../shared/data/cifar-10-jpeg/build.py not present")
  subprocess.run([sys.executable, BUILD_PY, str(tmp_path / "data"), "--train", "500",
                  "--test", "100"], check=True, capture_output=True)
  result = train.train(_config(tmp_path / "out", data_dir=str(tmp_path / "data"), epochs=1,
                               train_size=None, test_size=None, checkpoint=False, plot=False))
  assert result.config.train_size == 5000  # quick default; the folder holds only 500
  assert result.history[-1]["step"] == 500 // 32
  assert np.isfinite(result.history[-1]["test_loss"])
