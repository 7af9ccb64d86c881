"""The Equinox examples run (a few steps), and with epsilon=0 AMP gives ERM's run exactly."""

from pathlib import Path
import subprocess
import sys

import pytest

from examples.equinox import mnist_cnn
from examples.equinox import stateful_cnn

pytestmark = pytest.mark.slow

# A few steps, evaluated on the first and the last: the set-up, both steps and the evaluation.
TINY = ["--steps", "3", "--print-every", "2"]


@pytest.mark.parametrize("script", [mnist_cnn, stateful_cnn], ids=["mnist_cnn", "stateful_cnn"])
def test_epsilon_zero_reproduces_erm(script, capsys):
  """Both steps, the evaluation and the comparison run; epsilon > 0 learning is tested in
  tests/test_equinox.py (one run here costs two compilations of the step)."""
  results = script.main(TINY + ["--epsilon", "0"])
  assert results["amp"] == results["erm"] and results["max_abs_diff"] == 0.0
  assert [row["step"] for row in results["erm"]] == [0, 2]
  assert results["erm"][-1]["train_loss"] < results["erm"][0]["train_loss"] < 2.5
  out = capsys.readouterr().out
  assert "amp(epsilon=0) step=2, train_loss=" in out and mnist_cnn.NO_FILES in out


def test_runs_as_a_file():
  script = Path(__file__).resolve().parents[1] / "examples" / "equinox" / "stateful_cnn.py"
  # --steps 0: the imports (amp_optax, examples.equinox) and the set-up only.
  out = subprocess.run([sys.executable, str(script), "--steps", "0"], capture_output=True,
                       text=True, cwd="/")
  assert out.returncode == 0, out.stderr
  assert "after 0 steps" in out.stdout
