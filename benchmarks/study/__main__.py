"""``python -m benchmarks.study --preset ...``: see :mod:`benchmarks.study`."""

from benchmarks.study.cli import main

if __name__ == "__main__":
  main()
