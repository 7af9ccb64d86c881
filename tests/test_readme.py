"""README.md as a user reads it: every Python block runs as printed, and its claims hold.

Each ```python block is executed on its own, in a fresh namespace, so it must be complete (its
imports, data, model and every name it uses). A failing block is reported by its line in
README.md and the heading it sits under; tracebacks point into README.md at the real line.
Shell commands and other text go in ```bash / ```text fences, which are not run.

The README is the front door: its first two blocks are the main job and the test command that
``.ci/run`` runs, it stays short (the guides in docs/ hold the rest), its links resolve, the
helpers its recipes name exist, and its snippets follow the project's conventions (``epsilon``
0.05, a built ``grad_fn`` named ``amp_grad_fn``).
"""

import importlib
import importlib.util
import os
import re
import traceback
from typing import NamedTuple
import urllib.parse

import pytest

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
  assert PYTHON_BLOCKS, "README.md has no ```python block"
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
# The front door.

MAX_LINES = 250
QUICKSTART = ('python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[examples]" '
              "&& python examples/quickstart.py")


def _readme_lines() -> list[str]:
  with open(README, encoding="utf-8") as f:
    return f.read().splitlines()


def _ci_test_command() -> str:
  """The pytest command of .ci/run: the line after its "# The README's test command:" comment."""
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  marker = [i for i, line in enumerate(lines) if line.startswith("# The README's test command")]
  assert len(marker) == 1, ".ci/run must mark the README's test command with one comment"
  return lines[marker[0] + 1].strip()


def test_readme_is_short():
  lines = _readme_lines()
  assert len(lines) <= MAX_LINES, (
      f"README.md has {len(lines)} lines (at most {MAX_LINES}): move the detail to a page of "
      "docs/ and link to it")


def test_first_blocks_are_the_main_job_and_the_ci_test_command():
  """On a fresh machine the first two blocks are all a reader needs: run it, test it."""
  blocks = _fenced_blocks()
  first, second = blocks[0], blocks[1]
  assert first.line < 12 and second.line < 24, "the two commands must open the README"
  assert first.language == "bash" and first.code.strip() == QUICKSTART, first.code
  ci = _ci_test_command()
  assert second.language == "bash" and second.code.strip().startswith('pip install -e ".[test'), (
      second.code)
  assert second.code.strip().endswith(ci), (
      f"the README's test command {second.code.strip()!r} is not .ci/run's {ci!r}")


def test_relative_links_resolve():
  """Links to files of the repository (docs pages, LICENSE, examples) point at files that exist."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  assert links, "no links found"
  missing = []
  for link in links:
    url = urllib.parse.urlparse(link)
    if url.scheme or link.startswith("#"):
      continue
    if not os.path.exists(os.path.join(REPO, urllib.parse.unquote(url.path))):
      missing.append(link)
  assert not missing, f"README.md links to files that do not exist: {missing}"


HELPER_MODULES = {"amp_optax": "amp_optax", "flax_nnx": "amp_optax.flax_nnx",
                  "flax_linen": "amp_optax.flax_linen", "amp_eqx": "amp_optax.equinox"}


def test_the_names_the_recipes_use_exist():
  """The one-change recipes are diffs (```text, not run): every helper they name must exist."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  used = {(alias, name) for alias, name in re.findall(
      r"(?<![/\w])(amp_optax|flax_nnx|flax_linen|amp_eqx)\.([A-Za-z_]\w*)", text)
      if name != "md"}  # not the guides' file names (docs/guides/flax_nnx.md)
  assert ("flax_nnx", "make_grad_fn") in used and ("amp_eqx", "value_and_grad") in used, used
  missing = []
  for alias, name in sorted(used):
    module = importlib.import_module(HELPER_MODULES[alias])
    submodule = alias == "amp_optax" and importlib.util.find_spec(f"amp_optax.{name}")
    if not hasattr(module, name) and not submodule:
      missing.append(f"{alias}.{name}")
  assert not missing, f"README.md names helpers that do not exist: {missing}"


def test_snippets_follow_the_conventions():
  """In code blocks: epsilon 0.05 (the advice) and a built grad_fn bound to ``amp_grad_fn``.

  ``grad_fn = ...`` would shadow the name users' Flax code already uses for
  ``jax.value_and_grad``; the paper's 0.5 belongs to PreActResNet18 on all of CIFAR-10.
  """
  bad = []
  for block in _fenced_blocks():
    if block.language not in ("python", "text"):
      continue
    for offset, line in enumerate(block.code.splitlines()):
      where = f"README.md:{block.line + offset}"
      code = line.lstrip("+- ")
      if re.match(r"grad_fn\s*=", code):
        bad.append(f"{where}: bind the built grad_fn to `amp_grad_fn`: {line.strip()}")
      for value in re.findall(r"\bamp\((?:epsilon=)?([0-9.]+)", code):
        if float(value) != 0.05:
          bad.append(f"{where}: epsilon={value} in a snippet (use 0.05): {line.strip()}")
  assert not bad, "\n".join(bad)


def test_the_paper_value_is_said_to_be_the_papers():
  """Wherever the README gives 0.5 as an epsilon, it says whose value it is."""
  text = " ".join(_readme_lines())
  for m in re.finditer(r"(ε|epsilon) ?= ?0\.5\b|paper's (ε = )?0\.5", text):
    context = text[max(0, m.start() - 200):m.end() + 200]
    assert "paper" in context, f"an unexplained 0.5: ...{context}..."
  assert "PreActResNet18 on all of CIFAR-10" in text


def test_every_guide_is_in_the_table():
  """The README's table of guides links every page of docs/guides/ (and the other docs pages)."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  guides = os.path.join(REPO, "docs", "guides")
  pages = [f"docs/guides/{name}" for name in sorted(os.listdir(guides))
           if name.endswith(".md") and name != "index.md"]
  pages += ["docs/getting_started.md", "docs/benchmarks.md", "docs/development.md"]
  missing = [page for page in pages if f"]({page})" not in text]
  assert not missing, f"add these pages to the README's table of guides: {missing}"
