"""Executes ``examples/notebooks/amp_nnx_digits.ipynb`` and stores it, with outputs, in ``docs/``.

The documentation shows the notebook stored executed (``docs/notebooks/``) rather than running
it at every build (about 80 s on 2 CPU cores; CI already runs it with ``pytest --nbmake``).
``tests/test_docs.py`` fails when the stored copy's cells differ from the example's; then run,
from the repository root::

    python docs/_ext/refresh_notebook.py

which needs the ``examples`` extra (Flax, scikit-learn, matplotlib) and a Jupyter kernel.
"""

import os
import sys
import time

import nbclient
import nbformat

DOCS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(DOCS)
NOTEBOOKS = ("amp_nnx_digits.ipynb",)


def refresh(name: str) -> str:
  source = os.path.join(REPO, "examples", "notebooks", name)
  target = os.path.join(DOCS, "notebooks", name)
  nb = nbformat.read(source, as_version=4)
  start = time.perf_counter()
  nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(source)}}).execute()
  os.makedirs(os.path.dirname(target), exist_ok=True)
  nbformat.write(nb, target)
  print(f"{target}: executed in {time.perf_counter() - start:.0f} s")
  return target


if __name__ == "__main__":
  for notebook in sys.argv[1:] or NOTEBOOKS:
    refresh(notebook)
