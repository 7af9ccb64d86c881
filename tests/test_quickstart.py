"""The README's main job runs and learns (a short version of it)."""

from examples import quickstart


def test_quickstart_short_run_learns_with_both_methods():
  results = quickstart.main(["--epochs", "8", "--seeds", "1"])
  erm, amp = results["erm"][0], results["amp"][0]
  for r in (erm, amp):
    assert r["test_acc"] > 0.85  # 10 classes: chance is 0.1
    assert r["train_loss"] < 0.5
  # Same data, same init, same batches: AMP must have changed the training.
  assert amp["train_loss"] != erm["train_loss"]
