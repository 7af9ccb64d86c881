"""Prints the declared lower bounds of pyproject.toml's dependencies as exact pins.

    python .ci/lower_bounds.py   # e.g. jax==0.8.2 jaxlib==0.8.2 optax==0.2.8 chex==0.1.89 ...

.ci/run installs these in a fresh venv and runs the core tests there, so that every bound in
``[project] dependencies`` is a tested version, not a claim. jaxlib is pinned with jax.
Every dependency must have a ``>=`` bound (the one thing this script reads). Python >= 3.11
(tomllib), as the CI's Python is.
"""

import os
import re
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins() -> list[str]:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    dependencies = tomllib.load(f)["project"]["dependencies"]
  out = []
  for requirement in dependencies:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", requirement)
    if m is None:
      sys.exit(f"lower_bounds.py: {requirement!r} is not of the form 'name>=version'")
    name, version = m.groups()
    out.append(f"{name}=={version}")
    if name == "jax":
      out.append(f"jaxlib=={version}")
  return out


if __name__ == "__main__":
  print(" ".join(pins()))
