"""The Examples sections of the public docstrings run and give what they show."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["amp_optax._amp", "amp_optax._grouped", "amp_optax.flax_linen",
                                    "amp_optax.flax_nnx", "amp_optax.diagnostics"])
def test_docstring_examples(module):
  mod = importlib.import_module(module)
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0
  if module == "amp_optax._amp":
    assert result.attempted > 0
