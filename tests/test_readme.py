"""README.md as a user reads it: every Python block runs as printed, and its claims hold.

Each ```python block is executed on its own, in a fresh namespace, so it must be complete (its
imports, data, model and every name it uses). A failing block is reported by its line in
README.md and the heading it sits under; tracebacks point into README.md at the real line.
Shell commands and other text go in ```bash / ```text fences, which are not run.

The README is the front door: its first two blocks are the main job and the test command that
``.ci/run`` runs, it stays short (the guides in docs/ hold the rest), its links resolve and the
helpers its recipes name exist. What its prose promises about behaviour is checked by running
it: ``epsilon=0`` is ERM's step, a step written for ``optax.contrib.sam(opaque_mode=True)`` runs
with ``amp``, ``AmpState`` is ``opt_state[0]`` with its diagnostics, and the cheaper step
(``reuse_correction=True`` with ``ascend=`` decided in Python) calls ``grad_fn`` only on ascent
steps and adds the last correction in between.
"""

import functools
import importlib
import importlib.util
import os
import re
import traceback
from typing import NamedTuple
import urllib.parse

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


# ---------------------------------------------------------------------------------------------
# What the README's prose promises, run.


def _problem():
  def loss_fn(params, batch):
    x, y = batch
    logits = jnp.tanh(x @ params["w"] + params["b"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  kx, ky, kw = jax.random.split(jax.random.key(0), 3)
  batch = (jax.random.normal(kx, (16, 5)), jax.random.randint(ky, (16,), 0, 3))
  params = {"w": jax.random.normal(kw, (5, 3)) * 0.5, "b": jnp.zeros(3)}
  return loss_fn, params, batch


def _train(tx, steps, ascend_every=None, grad_fn_calls=None):
  """The Quick start's step; with ``ascend_every`` k, ``ascend=step % k == 0`` static."""
  loss_fn, params, batch = _problem()

  def amp_grad_fn(p, inner_step):
    if grad_fn_calls is not None:
      jax.debug.callback(lambda s: grad_fn_calls.append(int(s)), jnp.asarray(inner_step))
    return jax.grad(loss_fn)(p, batch)

  @functools.partial(jax.jit, static_argnames="ascend")
  def train_step(params, opt_state, ascend=None):
    grads = jax.grad(loss_fn)(params, batch)
    if ascend is None:
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn)
    elif ascend:
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=amp_grad_fn, ascend=True)
    else:  # no grad_fn between ascents
      updates, opt_state = tx.update(grads, opt_state, params, ascend=False)
    return optax.apply_updates(params, updates), opt_state, updates

  opt_state = tx.init(params)
  trace = []
  for step in range(steps):
    ascend = None if ascend_every is None else step % ascend_every == 0
    params, opt_state, updates = train_step(params, opt_state, ascend=ascend)
    trace.append((params, opt_state, updates))
  jax.effects_barrier()
  return trace, train_step


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_epsilon_zero_is_erm():
  """The README: with ``epsilon=0`` every step computes ERM's arithmetic."""
  amp_run, _ = _train(optax.chain(amp_optax.amp(0.0), optax.sgd(0.1, momentum=0.9)), 5)
  erm_run, _ = _train(optax.chain(optax.identity(), optax.sgd(0.1, momentum=0.9)), 5)
  for (p_amp, _, _), (p_erm, _, _) in zip(amp_run, erm_run, strict=True):
    assert _max_diff(p_amp, p_erm) < 1e-6
  # Not vacuous: at epsilon 0.05 the same first step differs.
  amp_run, _ = _train(optax.chain(amp_optax.amp(0.05), optax.sgd(0.1, momentum=0.9)), 1)
  assert _max_diff(amp_run[0][0], erm_run[0][0]) > 1e-5


def test_a_step_written_for_opaque_sam_runs_with_amp():
  """The README: ``grad_fn`` is the one of ``optax.contrib.sam(..., opaque_mode=True)``, so a
  train step written for one runs with the other (and AMP with ``norm="global"``,
  ``inner_lr=1e6``, K = 1 steps to the sphere along the gradient: SAM's step)."""
  sam = optax.contrib.sam(optax.sgd(0.1), optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                          sync_period=2, opaque_mode=True)
  amp = optax.chain(amp_optax.amp(0.05, norm="global", inner_lr=1e6), optax.sgd(0.1))
  sam_run, _ = _train(sam, 3)
  amp_run, _ = _train(amp, 3)
  for (p_sam, _, _), (p_amp, _, _) in zip(sam_run, amp_run, strict=True):
    assert _max_diff(p_sam, p_amp) < 1e-5


def test_amp_state_is_first_in_the_chain_with_its_diagnostics():
  """The README: ``AmpState`` (``opt_state[0]``) holds ``delta_norm``, ``clean_grad_norm`` and
  ``perturbed_grad_norm`` for logging."""
  run, _ = _train(optax.chain(amp_optax.amp(0.05), optax.sgd(0.1)), 2)
  amp_state = run[-1][1][0]
  assert isinstance(amp_state, amp_optax.AmpState)
  assert int(amp_state.count) == 2
  assert abs(float(amp_state.delta_norm) - 0.05 * 2 ** 0.5) < 1e-5  # per tensor, 2 arrays
  assert float(amp_state.clean_grad_norm) > 0 and float(amp_state.perturbed_grad_norm) > 0


def test_the_cheaper_step_as_the_readme_writes_it():
  """The README: ``amp(epsilon, reuse_correction=True)`` and ``tx.update(..., ascend=step % k ==
  0)`` with ``ascend`` static: two compiled steps; the steps between need no ``grad_fn`` and
  add the last ascent's correction to the clean gradient."""
  calls: list[int] = []
  k, steps = 4, 8
  tx = optax.chain(amp_optax.amp(0.05, reuse_correction=True), optax.identity())
  run, train_step = _train(tx, steps, ascend_every=k, grad_fn_calls=calls)
  assert len(calls) == steps // k  # grad_fn runs on the ascent steps only
  assert train_step._cache_size() == 2  # pylint: disable=protected-access
  loss_fn, params, batch = _problem()
  correction = None
  for step in range(steps):
    clean = jax.grad(loss_fn)(params, batch)
    updates, amp_state = run[step][2], run[step][1][0]
    if step % k == 0:
      assert float(amp_state.delta_norm) > 0
      correction = jax.tree.map(jnp.subtract, updates, clean)  # adversarial - clean
      assert _max_diff(correction, jax.tree.map(jnp.zeros_like, clean)) > 1e-6
    else:
      assert float(amp_state.delta_norm) == 0
      assert _max_diff(updates, jax.tree.map(jnp.add, clean, correction)) < 1e-5
    params = run[step][0]
