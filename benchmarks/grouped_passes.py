"""How grouped ascent runs its per-group passes, measured: a loop of G passes or one ``jax.vmap``.

For two models written in plain JAX, a small CNN and the evidence MLP (768-256-256-10 with
BatchNorm, :mod:`benchmarks.evidence.model`), times one jitted train step of

* ERM and ungrouped AMP (``amp(eps, norm="global")``, K = 1);
* grouped AMP (``grouped_amp(eps, num_groups=G)`` with ``grouped_value_and_grad``) at G = 4 and
  16, as the library chooses on this backend (``default``), and forced to each form (``loop``,
  ``vmap``),

interleaved in rounds, and prints each step's time over ERM's and over the ungrouped AMP step's
in the same run. The library's choice (``amp_optax/_grouped.py``, ``_loop_over_groups``): on CPU
a loop when a group's pass holds a convolution, else one vmapped pass; on GPU/TPU one vmapped
pass.

Run from the repository root::

    python -m benchmarks.grouped_passes             # CPU: a few minutes
    python -m benchmarks.grouped_passes --smoke     # seconds
"""

import argparse
from collections.abc import Callable
import contextlib
import json
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amp_optax
from amp_optax import _grouped
from benchmarks.evidence import model as mlp_model
from benchmarks.step_time import time_runners

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
EPSILON = 0.01


def _cnn_init(key: jax.Array, width: int) -> dict[str, Any]:
  k = jax.random.split(key, 3)
  he = lambda kk, shape, fan_in: jax.random.normal(kk, shape) * jnp.sqrt(2 / fan_in)  # noqa: E731
  return {"c1": he(k[0], (3, 3, 3, width), 27), "c2": he(k[1], (3, 3, width, 2 * width), 9 * width),
          "w": he(k[2], (2 * width, 10), 2 * width), "b": jnp.zeros((10,))}


def _cnn_apply(p: dict[str, Any], x: jax.Array) -> jax.Array:
  conv = lambda x, k, s: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(conv(x, p["c1"], 1))
  h = jax.nn.relu(conv(h, p["c2"], 2))
  return h.mean((1, 2)) @ p["w"] + p["b"]


def _models(smoke: bool) -> dict[str, tuple[Callable[..., Any], Any, Callable[[int], Any]]]:
  """name -> (loss(params, x, y), params, batch(n) -> (x, y))."""
  rng = np.random.default_rng(0)

  def cnn_loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_cnn_apply(p, x), y).mean()

  def mlp_loss(p, x, y):
    logits, _ = mlp_model.apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def batch(shape):
    return lambda n: (jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32),
                      jnp.asarray(rng.integers(0, 10, size=n), jnp.int32))

  hidden = (16,) if smoke else (256, 256)
  return {
      "cnn": (cnn_loss, _cnn_init(jax.random.key(0), 4 if smoke else 16), batch((32, 32, 3))),
      "bn_mlp": (mlp_loss, mlp_model.init(jax.random.key(0), (768, *hidden, 10), True),
                 batch((768,))),
  }


@contextlib.contextmanager
def _forced(form: str):
  """Forces the per-group passes into one form while a step is traced. This reaches into the
  private ``amp_optax._grouped._loop_over_groups`` on purpose: the benchmark times the form the
  library did not choose, which no public argument selects."""
  if form == "default":
    yield
    return
  saved = _grouped._loop_over_groups
  _grouped._loop_over_groups = lambda *_: form == "loop"
  try:
    yield
  finally:
    _grouped._loop_over_groups = saved


def _step(loss, params, x, y, groups: int | None, form: str) -> Callable[[], Any]:
  base = optax.sgd(0.01, momentum=0.9)
  if groups is None:  # ERM (form "erm") or ungrouped AMP
    tx = base if form == "erm" else optax.chain(amp_optax.amp(EPSILON, norm="global"), base)

    def step(params, opt_state, x, y):
      grads = jax.grad(loss)(params, x, y)
      extra = {} if form == "erm" else {"grad_fn": lambda q, _: jax.grad(loss)(q, x, y)}
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state
  else:
    tx = optax.chain(amp_optax.grouped_amp(EPSILON, num_groups=groups, norm="global"), base)

    def step(params, opt_state, x, y):
      gx, gy = amp_optax.group_batch((x, y), groups)
      _, grads, grad_fn = amp_optax.grouped_value_and_grad(loss)(params, gx, gy)
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
      return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  with _forced(form):
    compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
  state = [params, opt_state]

  def call():
    state[:] = compiled(state[0], state[1], x, y)
    jax.block_until_ready(state)

  return call


def run(args: argparse.Namespace) -> dict[str, Any]:
  rows = [("ERM", None, "erm"), ("AMP", None, "amp")]
  rows += [(f"G={g} {form}", g, form) for g in args.groups for form in ("default", "loop", "vmap")]
  out: dict[str, Any] = {
      "benchmark": "grouped_passes", "batch_size": args.batch_size, "epsilon": EPSILON,
      "backend": jax.default_backend(), "jax": jax.__version__, "python": platform.python_version(),
      "cpu_count": os.cpu_count(), "smoke": args.smoke, "models": {}}
  for name, (loss, params, batch) in _models(args.smoke).items():
    x, y = batch(args.batch_size)
    runners = [_step(loss, params, x, y, g, form) for _, g, form in rows]
    times = time_runners(runners, args.iters, args.warmup, args.rounds)
    ms = {label: 1e3 * float(np.median(times[id(r)])) for (label, _, _), r in zip(rows, runners)}
    out["models"][name] = {
        "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
        "default_loops": {g: _loops(loss, params, x, y, g) for g in args.groups},
        "rows": [{"name": label, "ms_median": ms[label], "x_erm": ms[label] / ms["ERM"],
                  "x_amp": ms[label] / ms["AMP"]} for label, _, _ in rows]}
  # One flat table as well, for the docs' benchmarks page.
  out["rows"] = [{"model": name, **r} for name, m in out["models"].items() for r in m["rows"]]
  return out


def _loops(loss, params, x, y, groups: int) -> bool:
  """Whether the library's default form for this model is the loop (G convolution or matrix
  products per pass, not one batched one), read from the step's jaxpr."""
  def passes(params, gx, gy):
    return amp_optax.grouped_value_and_grad(loss)(params, gx, gy)[:2]

  jaxpr = jax.make_jaxpr(passes)(params, *amp_optax.group_batch((x, y), groups)).jaxpr
  dots = sum(e.primitive.name in ("dot_general", "conv_general_dilated") for e in jaxpr.eqns)
  one = jax.make_jaxpr(jax.value_and_grad(loss))(params, x, y).jaxpr
  return dots > sum(e.primitive.name in ("dot_general", "conv_general_dilated")
                    for e in one.eqns)


def format_table(out: dict[str, Any]) -> str:
  lines = [f"grouped passes: backend {out['backend']}, batch {out['batch_size']}, "
           f"jax {out['jax']}, {out['cpu_count']} CPUs (median ms per step, interleaved)"]
  for name, m in out["models"].items():
    lines += ["", f"{name} ({m['num_params']:,} params); default is the loop at G = "
              f"{[g for g, loop in m['default_loops'].items() if loop]}",
              f"{'step':<16}{'ms':>10}{'x ERM':>8}{'x AMP':>8}"]
    lines += [f"{r['name']:<16}{r['ms_median']:>10.1f}{r['x_erm']:>8.2f}{r['x_amp']:>8.2f}"
              for r in m["rows"]]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--groups", type=int, nargs="+", default=[4, 16])
  p.add_argument("--iters", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--smoke", action="store_true", help="tiny models, few calls (seconds)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  if args.smoke:
    args.batch_size, args.groups, args.iters, args.warmup, args.rounds = 16, [4], 2, 1, 1
  out = run(args)
  path = args.out or os.path.join(
      RESULTS_DIR, f"grouped_passes_b{args.batch_size}_{out['backend']}"
      + ("_smoke" if args.smoke else "") + ".json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  print(format_table(out) + f"\nwritten: {path}")
  return out


if __name__ == "__main__":
  main()
