"""The Flax MNIST-style examples run, learn, and with epsilon=0 AMP gives ERM's run exactly."""

from pathlib import Path
import subprocess
import sys

import pytest

from examples.flax_mnist_style import train_linen
from examples.flax_mnist_style import train_nnx

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
