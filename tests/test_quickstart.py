"""The README's main job runs and learns (a short version of it)."""

import os

from examples import quickstart


def test_quickstart_short_run_learns_with_both_methods(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # anything written to a relative path would land here
  results = quickstart.main(["--epochs", "8", "--seeds", "1"])
  erm, amp = results["erm"][0], results["amp"][0]
  for r in (erm, amp):
    assert r["test_acc"] > 0.85  # 10 classes: chance is 0.1
    assert r["train_loss"] < 0.5
  # Same data, same init, same batches: AMP must have changed the training.
  assert amp["train_loss"] != erm["train_loss"]
  # It says it writes no files, and it writes none.
  assert capsys.readouterr().out.splitlines()[-1] == quickstart.NO_FILES
  assert os.listdir(tmp_path) == []
