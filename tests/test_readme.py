"""README.md as a user reads it: every Python block runs as printed, and its claims hold.

Each ```python block is executed on its own, in a fresh namespace, so it must be complete (its
imports, data, model and every name it uses). A failing block is reported by its line in
README.md and the heading it sits under; tracebacks point into README.md at the real line.
Shell commands and other text go in ```bash / ```text fences, which are not run.

The last tests check what the README says about where ``optax.apply_if_finite`` goes.
"""

import os
import re
import traceback
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import amp_optax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
LANGUAGES = ("python", "bash", "text")  # the fences the README may use; only python is run


class Block(NamedTuple):
  line: int  # 1-based line of the block's first code line in README.md
  heading: str  # the section heading, and the bold lead of its paragraph if any
  language: str
  code: str

  @property
  def label(self) -> str:
    """A test id without spaces, e.g. ``L54-Quick-start``, easy to pass to ``pytest -k``."""
    return f"L{self.line}-" + "-".join(re.findall(r"[A-Za-z0-9_]+", self.heading))


def _fenced_blocks(path: str = README) -> list[Block]:
  """The fenced code blocks of a Markdown file, with where they sit."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  blocks, heading, lead = [], "(top)", ""
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("```"):
      language = line[3:].strip()
      end = i + 1
      while end < len(lines) and not lines[end].startswith("```"):
        end += 1
      if end == len(lines):
        raise AssertionError(f"README.md:{i + 1}: a ``` fence is never closed")
      where = f"{heading} / {lead}" if lead else heading
      blocks.append(Block(i + 2, where, language, "\n".join(lines[i + 1:end]) + "\n"))
      i = end + 1
      continue
    if line.startswith("#"):
      heading, lead = line.lstrip("#").strip(), ""
    else:
      m = re.match(r"\*\*(.+?)\*\*", line)
      if m and (i == 0 or not lines[i - 1].strip()):
        lead = m.group(1).rstrip(".")
    i += 1
  return blocks


PYTHON_BLOCKS = [b for b in _fenced_blocks() if b.language == "python"]


def test_readme_has_the_python_blocks():
  """The parser finds the blocks (so that the parametrised test below cannot pass empty)."""
  headings = [b.heading for b in PYTHON_BLOCKS]
  assert len(PYTHON_BLOCKS) >= 4, headings
  assert any(h.startswith("Quick start") for h in headings), headings


def test_every_fence_names_a_known_language():
  """An untagged (or ```py) fence would escape the run below: every fence names its language."""
  bad = [f"README.md:{b.line - 1} fence {b.language!r} (under {b.heading})"
         for b in _fenced_blocks() if b.language not in LANGUAGES]
  assert not bad, (f"use ```python for code that must run, ```bash or ```text otherwise: {bad}")


def test_no_indented_code_blocks():
  """Indented (4-space) code blocks are not run either: code goes in fences."""
  with open(README, encoding="utf-8") as f:
    lines = f.read().splitlines()
  in_fence, bad = False, []
  for i, line in enumerate(lines):
    if line.startswith("```"):
      in_fence = not in_fence
    elif (not in_fence and line.startswith("    ") and i > 0 and not lines[i - 1].strip()
          and not _in_list(lines, i)):
      bad.append(f"README.md:{i + 1}: {line.strip()[:60]}")
  assert not bad, f"put these in ```python / ```bash / ```text fences: {bad}"


def _in_list(lines: list[str], i: int) -> bool:
  """Whether line ``i`` continues a list item (its paragraph above starts with - or 1.)."""
  j = i - 1
  while j >= 0 and not lines[j].strip():
    j -= 1
  while j >= 0 and lines[j].strip():
    if re.match(r"\s*([-*+]|\d+\.)\s", lines[j]):
      return True
    j -= 1
  return False


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.label for b in PYTHON_BLOCKS])
def test_python_block_runs_as_printed(block):
  # Blank lines before the code give tracebacks README.md's own line numbers; the file name is
  # not a real path, so that pytest does not print the README as the failing "source".
  filename = f"<README.md, block at line {block.line}>"
  code = compile("\n" * (block.line - 1) + block.code, filename, "exec")
  try:
    exec(code, {"__name__": "__readme__"})
  except Exception as e:
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == filename]
    where = lines[-1] if lines else block.line
    statement = block.code.splitlines()[where - block.line].strip()
    raise AssertionError(
        f"README.md:{where} (the block at line {block.line}, under '{block.heading}'): "
        f"{statement!r} raised {type(e).__name__}: {e}. Every ```python block must run on its "
        "own, as printed (its imports, data and every name it uses included)."
    ) from e


# ---------------------------------------------------------------------------------------------
# Where optax.apply_if_finite goes (README, "NaN and inf").

EPS, INNER_LR, LR = 3.5, 10.0, 0.1


def _loss(p):
  return -jnp.sum(jnp.sqrt(1.0 - p))  # finite for p <= 1, NaN beyond


def _grad_fn(p, _inner_step):
  return jax.grad(_loss)(p)


def _placements():
  amp = lambda: amp_optax.amp(EPS, inner_lr=INNER_LR)
  return {
      "outside": optax.apply_if_finite(optax.chain(amp(), optax.sgd(LR, momentum=0.9)), 5),
      "inside": optax.chain(amp(), optax.apply_if_finite(optax.sgd(LR, momentum=0.9), 5)),
  }


def _one_step(tx, params, clean_grads):
  state = tx.init(params)
  updates, new_state = tx.update(clean_grads, state, params, grad_fn=_grad_fn)
  return optax.apply_updates(params, updates), state, new_state


def _momentum_trace(state):
  return optax.tree_utils.tree_get(state, "trace")


def test_perturbed_point_reaches_nan():
  """The set-up of the tests below: finite at θ, NaN at θ + Δ (from an independent Δ)."""
  params = jnp.full(3, 0.2)
  g = jax.grad(_loss)(params)
  assert np.all(np.isfinite(g))
  # One ascent step projected onto the per-tensor ball, computed here with NumPy.
  step = INNER_LR * np.asarray(g)
  delta = step * min(1.0, EPS / np.linalg.norm(step))
  assert np.all(params + delta > 1) and np.all(np.isnan(jax.grad(_loss)(params + delta)))


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_apply_if_finite_all_finite_changes_nothing(placement):
  """Control: with finite gradients both placements step as the chain without the guard."""
  params = jnp.array([-3.0, -2.0, -4.0])  # θ + Δ stays below 1: everything finite
  plain = optax.chain(amp_optax.amp(EPS, inner_lr=INNER_LR), optax.sgd(LR, momentum=0.9))
  expected, _, _ = _one_step(plain, params, jax.grad(_loss)(params))
  got, _, _ = _one_step(_placements()[placement], params, jax.grad(_loss)(params))
  assert np.all(np.isfinite(expected)) and not np.allclose(expected, params)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("placement", ["outside", "inside"])
def test_apply_if_finite_nan_clean_gradient_skips_the_step(placement):
  """A NaN in the clean gradient: both placements leave θ and the momentum as they were."""
  params = jnp.full(3, 0.2)
  clean = jax.grad(_loss)(params).at[1].set(jnp.nan)
  new_params, state, new_state = _one_step(_placements()[placement], params, clean)
  np.testing.assert_array_equal(new_params, params)
  _assert_same(_momentum_trace(new_state), _momentum_trace(state))
  assert optax.tree_utils.tree_get(new_state, "total_notfinite") == 1
  count = optax.tree_utils.tree_get(new_state, "count")
  # Outside, the whole chain is skipped (AmpState too); inside, amp ran and only sgd was skipped.
  assert count == (0 if placement == "outside" else 1)


def test_apply_if_finite_outside_misses_nan_at_perturbed_point():
  """Outside, a finite clean gradient passes the check: the NaN at θ + Δ reaches θ."""
  params = jnp.full(3, 0.2)
  new_params, _, new_state = _one_step(_placements()["outside"], params,
                                       jax.grad(_loss)(params))
  assert optax.tree_utils.tree_get(new_state, "total_notfinite") == 0
  assert np.all(np.isnan(new_params))


def test_apply_if_finite_inside_catches_nan_at_perturbed_point():
  """Inside, the check sees ∇L(θ + Δ): the step is skipped, θ and the momentum stay."""
  params = jnp.full(3, 0.2)
  new_params, state, new_state = _one_step(_placements()["inside"], params,
                                           jax.grad(_loss)(params))
  assert optax.tree_utils.tree_get(new_state, "total_notfinite") == 1
  np.testing.assert_array_equal(new_params, params)
  _assert_same(_momentum_trace(new_state), _momentum_trace(state))
  assert optax.tree_utils.tree_get(new_state, "count") == 1  # AmpState still advances


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
