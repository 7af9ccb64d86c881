"""The Flax MNIST-style examples run, learn, and with epsilon=0 AMP gives ERM's run exactly."""

import inspect
from pathlib import Path
import subprocess
import sys

from flax.training import train_state
import jax
import pytest

import amp_optax
from examples.flax_mnist_style import train_linen
from examples.flax_mnist_style import train_nnx

pytestmark = pytest.mark.slow

TINY = ["--train-size", "512", "--epochs", "2", "--batch-size", "16"]


@pytest.mark.parametrize(("script", "also_positive"), [(train_nnx, True), (train_linen, False)],
                         ids=["nnx", "linen"])
def test_amp_at_epsilon_zero_reproduces_erm_and_learns(script, also_positive, capsys):
  erm = script.main(TINY + ["--optimizer", "erm"])
  amp_zero = script.main(TINY + ["--optimizer", "amp", "--epsilon", "0"])
  assert amp_zero == erm  # every metric of every epoch, to the last bit.
  runs = [erm]
  if also_positive:  # one AMP run with epsilon > 0 (the Linen one is alike; it costs time).
    runs.append(script.main(TINY + ["--optimizer", "amp", "--epsilon", "0.05"]))
    assert runs[-1] != erm
  for history in runs:
    assert history[-1]["test_accuracy"] > 0.5, history  # 10 classes: chance is 0.1.
    assert history[-1]["train_loss"] < history[0]["train_loss"], history
  out = capsys.readouterr().out
  assert "amp epoch  2: train_loss" in out and "no files written" in out


def test_runs_as_a_file():
  script = Path(__file__).resolve().parents[1] / "examples" / "flax_mnist_style" / "train_nnx.py"
  # --epochs 0: the imports (amp_optax, examples.flax_mnist_style) and set-up only.
  out = subprocess.run([sys.executable, str(script), "--epochs", "0"], capture_output=True,
                       text=True, cwd="/")
  assert out.returncode == 0, out.stderr
  assert "amp: 0 epochs in" in out.stdout


def test_linen_drop_in_mode_changes_only_the_optimiser_line_and_learns(capsys):
  args = train_linen.parse_args(TINY + ["--optimizer", "drop-in"])
  state = train_linen.create_train_state(jax.random.key(0), args)
  # By construction: Flax's own TrainState (its apply_gradients, no grad_fn), and the step is the
  # ERM one, which calls it with the gradients and the new statistics only.
  assert type(state) is train_linen.FlaxTrainState
  assert type(state).apply_gradients is train_state.TrainState.apply_gradients
  assert isinstance(state.opt_state, amp_optax.DropInAmpState)
  step_source = inspect.getsource(train_linen.update_model)
  assert "state.apply_gradients(grads=grads, batch_stats=updates[\"batch_stats\"])" in step_source
  assert "grad_fn" not in step_source
  # The loop sends drop-in through that step; the optimiser line is the only drop-in change.
  main_source = inspect.getsource(train_linen.main)
  assert "drop_in" not in main_source and "DropIn" not in main_source
  assert "state = update_model(state, grads, updates)" in main_source
  create_source = inspect.getsource(train_linen.create_train_state)
  assert create_source.count("drop_in_amp(") == 1

  history = train_linen.main(TINY + ["--optimizer", "drop-in"])
  # Two calls per AMP step (inner_steps=1): half ERM's descent steps in these two epochs.
  assert history[-1]["train_loss"] < history[0]["train_loss"] < 2.3, history
  assert history[-1]["test_accuracy"] > 0.3, history  # 10 classes: chance is 0.1.
  assert "drop-in epoch  2: train_loss" in capsys.readouterr().out
