"""Cost of an AMP train step: time, memory and compile time, against ERM and SAM.

Times one jitted train step (forward, backward, optimiser update, BatchNorm statistics) of the
same model on the same batch for

* ERM: SGD with Nesterov momentum and weight decay (the base optimiser of every row);
* AMP (``amp_optax.amp``) with K = 1, 2, 3 inner steps, per-tensor and global norm balls;
* SAM: ``optax.contrib.sam`` in opaque mode (one adversarial step, two gradients per step);
* PyTorch (eager, CPU or CUDA): ERM and the same AMP step written from the algorithm
  (:mod:`benchmarks.torch_models`), on twin models; skipped with a note without ``torch``.

Each step time is the median over ``--iters`` calls after ``--warmup`` calls, each call waited
for (``block_until_ready``); the variants are interleaved in ``--rounds`` rounds so that a
machine whose load drifts affects them alike. Ratios are to the ERM step of the same framework in
the same run. The cheaper-step rows ("every k", named ``py`` for the Python dispatch) ascend on
every k-th step only, decided in Python (``tx.update(..., ascend=step % k == 0)`` with ``ascend``
static: two compiled steps), with or without ``amp(..., reuse_correction=True)``; one timed call is
a whole period of k steps and the row reports its time / k: the mean cost of a step.

Memory: from the compiled executable's ``memory_analysis()`` (argument + output + temporary
buffers, minus donated buffers that alias an output), the difference to the ERM step in units of
the bytes of the model's parameters. Compile time: trace + lower and XLA compile of the AMP step
for K = 1, 2, 4, 8 (flat in K: the inner loop is a ``lax.fori_loop``).

Run from the repository root::

    python -m benchmarks.step_time --model small                       # CPU, minutes
    python -m benchmarks.step_time --model preactresnet18 --batch-size 128
    python -m benchmarks.step_time --smoke                             # CI, seconds
"""

import argparse
from collections.abc import Callable
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import amp_optax
from amp_optax import flax_linen
from examples.cifar import models as cifar_models

MODELS = {"small": "tiny_cnn", "preactresnet18": "preactresnet18"}
LATE_FRACTION = 0.25  # the late phase: AMP on the last quarter of the steps
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the table: a method and its hyper-parameters."""

  name: str
  framework: str  # "jax" or "torch"
  method: str  # "erm", "amp" or "sam"
  inner_steps: int = 0
  norm: str | None = None
  # amp(unroll=...): None is amp's backend default (unrolled on CPU, one loop body elsewhere);
  # 1 forces the lax loop, True unrolls the K steps.
  unroll: bool | int | None = None
  # The cheaper step: ascend on every k-th step only, decided in Python (two compiled steps,
  # tx.update(..., ascend=step % k == 0)); reuse_correction: amp(..., reuse_correction=True), the
  # steps between ascents add the last ascent's correction to the clean gradient.
  ascend_every: int | None = None
  reuse_correction: bool = False
  # amp_optax.drop_in_amp(ascent=...) in the plain step: "gradient" or "momentum".
  drop_in: str | None = None
  # ERM, then AMP for the last quarter of training: timed as 3 ERM-like steps + 1 AMP step.
  late: bool = False
  # grouped_amp(num_groups=G): grouped ascent (m-sharpness), per-group passes under one jax.vmap
  # (amp_optax.flax_linen.grouped_value_and_grad, BatchNorm per group).
  num_groups: int | None = None

  @property
  def grad_evals(self) -> float:
    """Forward-backward passes per (descent) step, on average over training."""
    if self.drop_in == "momentum":
      return 1
    if self.drop_in == "gradient":
      return 1 + self.inner_steps
    if self.late:
      return 1 + self.inner_steps * LATE_FRACTION
    every = self.ascend_every or 1
    return {"erm": 1, "amp": 1 + self.inner_steps / every, "sam": 2}[self.method]

  @property
  def period(self) -> int | None:
    """Steps decided in Python: one ascent step every ``period`` steps (the last of them)."""
    if self.late:
      return round(1 / LATE_FRACTION)
    return self.ascend_every


def variants(inner_steps: tuple[int, ...], with_torch: bool,
             batch_size: int = 128) -> list[Variant]:
  """The rows of the time table, ERM first in each framework."""
  out = [Variant("ERM", "jax", "erm")]
  for norm in ("per_tensor", "global"):
    out += [Variant(f"AMP K={k} {norm}", "jax", "amp", k, norm) for k in inner_steps]
  out += [Variant(f"AMP K={k} per_tensor loop", "jax", "amp", k, "per_tensor", 1)
          for k in inner_steps if k > 1]
  out += [Variant(f"AMP K={k} per_tensor unroll", "jax", "amp", k, "per_tensor", True)
          for k in inner_steps if k > 1]
  out.append(Variant("SAM opaque (optax.contrib)", "jax", "sam"))
  # The cheaper step, decided in Python ("py"; 0.1's lax.cond rows without it are gone with
  # amp(ascent_every=)).
  out += [Variant(f"AMP K=1 per_tensor every {every} {'reuse' if reuse else 'clean'} py", "jax",
                  "amp", 1, "per_tensor", ascend_every=every, reuse_correction=reuse)
          for every in (2, 4) for reuse in (False, True)]
  # AMP at ERM's cost (issue 16).
  out += [Variant("AMP K=1 per_tensor drop-in momentum", "jax", "amp", 1, "per_tensor",
                  drop_in="momentum"),
          Variant("AMP K=1 per_tensor drop-in gradient", "jax", "amp", 1, "per_tensor",
                  drop_in="gradient"),
          Variant("AMP K=1 per_tensor late 25%", "jax", "amp", 1, "per_tensor", late=True),
          Variant("AMP K=1 per_tensor every 8 reuse py", "jax", "amp", 1, "per_tensor",
                  ascend_every=8, reuse_correction=True)]
  # Grouped ascent (issue 17): G groups of batch / G examples, each with its own Delta.
  out += [Variant(f"AMP K=1 global G={g}", "jax", "amp", 1, "global", num_groups=g)
          for g in (4, 16) if batch_size % g == 0]
  if with_torch:
    out.append(Variant("ERM", "torch", "erm"))
    out += [Variant(f"AMP K={k} per_tensor", "torch", "amp", k, "per_tensor")
            for k in inner_steps]
  return out


def make_optimizer(variant: Variant, hp: argparse.Namespace) -> optax.GradientTransformation:
  """The optax chain of a JAX variant; every one shares the same base optimiser."""
  base = optax.chain(optax.add_decayed_weights(hp.weight_decay),
                     optax.sgd(hp.lr, momentum=0.9, nesterov=True))
  if variant.method == "erm":
    return base
  if variant.drop_in:
    return amp_optax.drop_in_amp(base, hp.epsilon, inner_lr=hp.inner_lr,
                                 inner_steps=variant.inner_steps, norm=variant.norm,
                                 ascent=variant.drop_in)
  if variant.method == "amp" and variant.num_groups is not None:
    return optax.chain(
        amp_optax.grouped_amp(hp.epsilon, num_groups=variant.num_groups, inner_lr=hp.inner_lr,
                              inner_steps=variant.inner_steps, norm=variant.norm,
                              unroll=variant.unroll), base)
  if variant.method == "amp":
    return optax.chain(
        amp_optax.amp(hp.epsilon, inner_lr=hp.inner_lr, inner_steps=variant.inner_steps,
                      norm=variant.norm, unroll=variant.unroll,
                      reuse_correction=variant.reuse_correction), base)
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(hp.rho))
  return optax.contrib.sam(base, adv, sync_period=2, opaque_mode=True)


def make_train_step(model: Any, tx: optax.GradientTransformation,
                    ascend: bool | None = None, plain: bool = False,
                    num_groups: int | None = None) -> Callable[..., Any]:
  """A train step ``(state, x, y) -> (state, loss)``; ``state = (params, batch_stats, opt)``.

  The clean pass updates the BatchNorm statistics; ``grad_fn`` (called by AMP and SAM at
  perturbed parameters) normalises with batch statistics too and discards their update.
  ``ascend`` (AMP only) is passed on to ``tx.update`` when not None. ``plain``: no
  ``grad_fn`` (the unchanged step :func:`amp_optax.drop_in_amp` is made for).
  ``num_groups``: the grouped step (per-group clean passes and ``grad_fn`` from
  :func:`amp_optax.flax_linen.grouped_value_and_grad`, new statistics the groups' mean).
  """
  extra = {} if ascend is None else {"ascend": ascend}
  def loss_fn(params, batch_stats, x, y):
    logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                   train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_vars["batch_stats"]

  def grouped_step(state, x, y):
    params, batch_stats, opt_state = state
    (loss, new_stats), grads, grad_fn = flax_linen.grouped_value_and_grad(
        lambda p, s, b, _: loss_fn(p, s, *b))(
            params, batch_stats, amp_optax.group_batch((x, y), num_groups))
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return (optax.apply_updates(params, updates), new_stats, opt_state), jnp.mean(loss)

  if num_groups is not None:
    return grouped_step

  def step(state, x, y):
    params, batch_stats, opt_state = state
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y)
    grad_fn = lambda p, _: jax.grad(lambda q: loss_fn(q, batch_stats, x, y)[0])(p)
    if plain:
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, **extra)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  return step


def tree_bytes(tree: Any) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree.leaves(tree)))


def memory_stats(compiled: Any) -> dict[str, Any] | None:
  """Buffer sizes of a compiled executable, or None where the backend does not report them."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends raise NotImplemented errors.
    return None
  if stats is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  out = {f: int(getattr(stats, f, 0) or 0) for f in fields}
  peak = getattr(stats, "peak_memory_in_bytes", None)
  out["peak_memory_in_bytes"] = int(peak) if peak else None
  out["footprint_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                            + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


class JaxRunner:
  """Compiles a variant's step once and runs it on its own copy of the state."""

  def __init__(self, variant: Variant, model: Any, variables: Any, x: jax.Array, y: jax.Array,
               hp: argparse.Namespace):
    self.variant = variant
    tx = make_optimizer(variant, hp)
    params = variables["params"]
    state = (params, variables["batch_stats"], tx.init(params))
    self.state = jax.tree.map(jnp.copy, state)  # donated below: never share buffers.
    self.x, self.y = x, y
    self.every = variant.period
    plain = variant.drop_in is not None
    step = jax.jit(make_train_step(model, tx, True if self.every else None, plain,
                                   variant.num_groups), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(self.state, x, y)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    t2 = time.perf_counter()
    self.trace_lower_s, self.compile_s = t1 - t0, t2 - t1
    self.memory = memory_stats(self.compiled)
    if self.every:  # the steps between ascents, compiled apart
      self.compiled_clean = jax.jit(make_train_step(model, tx, False), donate_argnums=0).lower(
          self.state, x, y).compile()
    self.calls = 0
    # With an ascent every k-th step a timed call is one whole period of k steps (one ascent
    # step and k - 1 without), so that the per-step time is a mean over the period, not the
    # median of two kinds of step. The drop-in gradient ascent's step is K + 1 calls.
    self.steps_per_call = self.every or 1
    self.step_calls = variant.inner_steps + 1 if variant.drop_in == "gradient" else 1
    self.kind_times: dict[str, list[float]] = {"ascent": [], "between": []}
    self.loss = float("nan")

  def __call__(self) -> None:
    for _ in range(self.steps_per_call):
      t0 = time.perf_counter()
      for _ in range(self.step_calls):
        compiled = self.compiled
        # The ascent on the last step of a period: the late phase's ERM steps come first.
        ascent = not self.every or self.calls % self.every == (
            self.every - 1 if self.variant.late else 0)
        if not ascent:
          compiled = self.compiled_clean
        self.calls += 1
        self.state, loss = compiled(self.state, self.x, self.y)
        jax.block_until_ready((self.state, loss))
      if self.every:
        self.kind_times["ascent" if ascent else "between"].append(time.perf_counter() - t0)
    self.loss = loss


class TorchRunner:
  """The same step in PyTorch (eager), on a twin model initialised once for all rows."""

  def __init__(self, variant: Variant, model: Any, x: Any, y: Any, hp: argparse.Namespace):
    from benchmarks import torch_models

    self.variant = variant
    self.step = torch_models.AmpSGD(
        model, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay, nesterov=True,
        epsilon=hp.epsilon, inner_lr=hp.inner_lr, inner_steps=variant.inner_steps)
    self.x, self.y = x, y
    self.loss = float("nan")

  def __call__(self) -> None:
    self.loss = float(self.step(self.x, self.y))  # float() waits for the device.


def compile_time(model: Any, variables: Any, x: jax.Array, y: jax.Array, k: int,
                 hp: argparse.Namespace, unroll: bool | int | None = None) -> dict[str, float]:
  """Seconds to trace + lower and to compile a fresh AMP (per-tensor) step with K = k."""
  variant = Variant(f"AMP K={k} per_tensor", "jax", "amp", k, "per_tensor", unroll)
  tx = make_optimizer(variant, hp)
  params = variables["params"]
  state = (params, variables["batch_stats"], tx.init(params))
  step = jax.jit(make_train_step(model, tx), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = step.lower(state, x, y)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"inner_steps": k, "unroll": unroll, "trace_lower_s": t1 - t0,
          "compile_s": t2 - t1, "memory": memory_stats(compiled)}


def time_runners(runners: list[Any], iters: int, warmup: int, rounds: int,
                 max_seconds: float = 0.0) -> dict[int, list[float]]:
  """Per-call seconds of each runner, warmed up, interleaved in ``rounds`` rounds.

  With ``max_seconds > 0`` a runner stops early in a round once it has used its share
  (``max_seconds / rounds``) of time there, after at least one call: slow rows get fewer calls.
  """
  for r in runners:
    for _ in range(warmup):
      r()
  times: dict[int, list[float]] = {id(r): [] for r in runners}
  per_round = [iters // rounds + (1 if i < iters % rounds else 0) for i in range(rounds)]
  for n in per_round:
    for r in runners:
      spent = 0.0
      for _ in range(n):
        t0 = time.perf_counter()
        r()
        dt = time.perf_counter() - t0
        times[id(r)].append(dt)
        spent += dt
        if max_seconds > 0 and spent >= max_seconds / rounds:
          break
  return times


def _torch_setup(model_name: str, x: np.ndarray, y: np.ndarray, num_classes: int,
                 device: str) -> tuple[Any, Any, Any, str]:
  """A PyTorch twin model and the batch as tensors, or a note saying why not."""
  try:
    import torch

    from benchmarks import torch_models
  except ImportError as e:
    return None, None, None, f"PyTorch rows skipped: torch is not installed ({e})."
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
      return None, None, None, (
          f"PyTorch rows skipped: JAX runs on {jax.default_backend()} but this torch "
          f"({torch.__version__}) has no CUDA; pass --torch-device cpu to time it on the CPU.")
  torch.manual_seed(0)
  model = torch_models.get_model(model_name, num_classes).to(device)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
  yt = torch.from_numpy(y.astype(np.int64)).to(device)
  note = (f"torch {torch.__version__}, eager, device {device}, "
          f"{torch.get_num_threads()} intra-op threads")
  return model, xt, yt, note


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Runs the benchmark; returns (and writes) the results as a JSON-able dict."""
  model_name = MODELS[args.model]
  model_kwargs: dict[str, Any] = {}  # the default TinyCNN, which has a PyTorch twin
  model = cifar_models.get_model(model_name, args.num_classes, **model_kwargs)
  rng = np.random.default_rng(0)
  x_np = rng.normal(size=(args.batch_size, 32, 32, 3)).astype(np.float32)
  y_np = rng.integers(0, args.num_classes, size=args.batch_size).astype(np.int32)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  variables = model.init(jax.random.key(0), x[:1], train=False)
  param_bytes = tree_bytes(variables["params"])
  num_params = int(sum(p.size for p in jax.tree.leaves(variables["params"])))

  # A throwaway compile, so that the first measured one does not pay XLA's start-up.
  jax.jit(lambda a: jnp.tanh(a) @ a.T)(jnp.ones((8, 8))).block_until_ready()

  notes = []
  torch_model = xt = yt = None
  if not args.no_torch:
    if model_kwargs:
      notes.append("PyTorch rows skipped: no twin for the reduced smoke model.")
    else:
      torch_model, xt, yt, note = _torch_setup(model_name, x_np, y_np, args.num_classes,
                                               args.torch_device)
      notes.append(note)
  else:
    notes.append("PyTorch rows skipped (--no-torch).")

  rows = variants(tuple(args.inner_steps), torch_model is not None, args.batch_size)
  runners = []
  for v in rows:
    if v.framework == "jax":
      runners.append(JaxRunner(v, model, variables, x, y, args))
    else:
      runners.append(TorchRunner(v, copy.deepcopy(torch_model), xt, yt, args))
  times = time_runners(runners, args.iters, args.warmup, args.rounds, args.max_seconds)
  if jax.default_backend() == "cpu" and any(k > 1 for k in args.inner_steps):
    notes.append("CPU: XLA:CPU runs convolutions inside loops many times slower than outside "
                 "them (https://github.com/jax-ml/jax/issues/12868). amp's default (unroll=None)"
                 " unrolls the K >= 2 inner steps on CPU; the 'loop' rows force the "
                 "lax.fori_loop (unroll=1, the default on GPU/TPU), the 'unroll' rows pass "
                 "unroll=True. K = 1 has no loop.")

  results = []
  erm_ms = {}
  for r in runners:
    t = np.asarray(times[id(r)]) * 1e3 / getattr(r, "steps_per_call", 1)
    v = r.variant
    row = {
        "name": v.name, "framework": v.framework, "method": v.method,
        "inner_steps": v.inner_steps, "norm": v.norm, "grad_evals": v.grad_evals,
        "ms_median": float(np.median(t)), "ms_p10": float(np.percentile(t, 10)),
        "ms_p90": float(np.percentile(t, 90)), "calls": int(t.size),
        "final_loss": float(r.loss),
    }
    if v.method == "erm":
      erm_ms[v.framework] = row["ms_median"]
    if v.framework == "jax":
      row["trace_lower_s"], row["compile_s"] = r.trace_lower_s, r.compile_s
      if r.every:  # the two kinds of step decided in Python, each on its own
        for kind, kt in r.kind_times.items():
          row[f"ms_{kind}_step"] = 1e3 * float(np.median(kt)) if kt else float("nan")
    results.append(row)
  for row in results:
    row["ratio_vs_erm"] = row["ms_median"] / erm_ms[row["framework"]]
    row["ratio_vs_jax_erm"] = row["ms_median"] / erm_ms["jax"]

  memory = []
  erm_mem = next(r.memory for r in runners if r.variant.method == "erm")
  for r in runners:
    if r.variant.framework != "jax":
      continue
    entry = {"name": r.variant.name, "stats": r.memory}
    if r.memory is not None and erm_mem is not None:
      entry["extra_footprint_param_units"] = (
          (r.memory["footprint_bytes"] - erm_mem["footprint_bytes"]) / param_bytes)
      entry["extra_temp_param_units"] = (
          (r.memory["temp_size_in_bytes"] - erm_mem["temp_size_in_bytes"]) / param_bytes)
    memory.append(entry)
  if erm_mem is None:
    notes.append("memory_analysis() is not available on this backend: no memory figures.")

  compile_rows = [{"method": "ERM", "inner_steps": 0, "trace_lower_s": runners[0].trace_lower_s,
                   "compile_s": runners[0].compile_s, "memory": erm_mem}]
  for unroll in (1, True):
    for k in args.compile_steps:
      name = "AMP per_tensor unroll" if unroll is True else "AMP per_tensor loop"
      compile_rows.append({"method": name, **compile_time(model, variables, x, y, k, args,
                                                           unroll)})
  for c in compile_rows:
    if c["memory"] is not None and erm_mem is not None:
      c["extra_footprint_param_units"] = (
          (c["memory"]["footprint_bytes"] - erm_mem["footprint_bytes"]) / param_bytes)

  device = jax.devices()[0]
  out = {
      "benchmark": "step_time",
      "model": model_name, "model_kwargs": model_kwargs, "batch_size": args.batch_size,
      "num_params": num_params, "param_bytes": param_bytes,
      "hyperparameters": {"lr": args.lr, "weight_decay": args.weight_decay,
                          "epsilon": args.epsilon, "inner_lr": args.inner_lr, "rho": args.rho},
      "timing": {"iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
                 "max_seconds": args.max_seconds},
      "smoke": bool(args.smoke),
      "environment": {
          "platform": device.platform, "device_kind": getattr(device, "device_kind", "?"),
          "jax": jax.__version__, "optax": optax.__version__, "python": platform.python_version(),
          "machine": platform.machine(), "cpu_count": os.cpu_count(),
      },
      "rows": results, "memory": memory, "compile": compile_rows, "notes": notes,
  }
  path = args.out or os.path.join(
      RESULTS_DIR, f"step_time_{args.model}_b{args.batch_size}_{device.platform}"
      f"{'_smoke' if args.smoke else ''}.json")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  out["path"] = path
  return out


def format_report(out: dict[str, Any]) -> str:
  """The results as plain-text tables."""
  env = out["environment"]
  lines = [
      f"model {out['model']} ({out['num_params']:,} params, {out['param_bytes'] / 2**20:.2f} MiB)"
      f", batch {out['batch_size']}, {env['platform']} ({env['device_kind']}, "
      f"{env['cpu_count']} CPUs), jax {env['jax']}, optax {env['optax']}",
      f"median of up to {out['timing']['iters']} calls (at most ~{out['timing']['max_seconds']:g}"
      f" s per row) after {out['timing']['warmup']} warm-up, {out['timing']['rounds']} "
      "interleaved rounds",
      "",
      f"{'step':<34} {'fw':<6} {'grads':>5} {'calls':>5} {'ms/step':>10} {'p10-p90 ms':>17} "
      f"{'x ERM':>7} {'x jax ERM':>10}",
  ]
  for r in out["rows"]:
    lines.append(
        f"{r['name']:<34} {r['framework']:<6} {r['grad_evals']:>5g} {r['calls']:>5} "
        f"{r['ms_median']:>10.2f} "
        f"{r['ms_p10']:>8.2f}-{r['ms_p90']:<8.2f} {r['ratio_vs_erm']:>7.2f} "
        f"{r['ratio_vs_jax_erm']:>10.2f}")
  kinds = [r for r in out["rows"] if "ms_ascent_step" in r]
  if kinds:
    lines += ["", "steps decided in Python, each kind on its own (median ms; x jax ERM)",
              f"{'step':<34} {'ascent step':>16} {'step between':>16}"]
    erm = next(r["ms_median"] for r in out["rows"]
               if r["framework"] == "jax" and r["method"] == "erm")
    for r in kinds:
      a, b = r["ms_ascent_step"], r["ms_between_step"]
      lines.append(f"{r['name']:<34} {a:>8.2f} ({a / erm:>4.2f}x) {b:>8.2f} ({b / erm:>4.2f}x)")
  lines += ["", "memory (compiled step: argument + output + temp - aliased), vs ERM, in units of "
            f"parameter bytes ({out['param_bytes']:,} B)"]
  lines.append(f"{'step':<34} {'footprint MiB':>14} {'temp MiB':>10} {'extra':>8} "
               f"{'extra temp':>11}")
  for m in out["memory"]:
    s = m["stats"]
    if s is None:
      lines.append(f"{m['name']:<34} {'n/a':>14}")
      continue
    lines.append(
        f"{m['name']:<34} {s['footprint_bytes'] / 2**20:>14.2f} "
        f"{s['temp_size_in_bytes'] / 2**20:>10.2f} "
        f"{m.get('extra_footprint_param_units', float('nan')):>8.2f} "
        f"{m.get('extra_temp_param_units', float('nan')):>11.2f}")
  lines += ["", "compile time (fresh jit; s), and the memory of each program (extra vs ERM in "
            "parameter bytes)", f"{'step':<22} {'K':>3} {'trace+lower':>12} {'compile':>9} "
            f"{'footprint MiB':>14} {'extra':>8}"]
  for c in out["compile"]:
    mem = c.get("memory")
    foot = f"{mem['footprint_bytes'] / 2**20:>14.2f}" if mem else f"{'n/a':>14}"
    lines.append(f"{c['method']:<22} {c['inner_steps']:>3} {c['trace_lower_s']:>12.2f} "
                 f"{c['compile_s']:>9.2f} {foot} "
                 f"{c.get('extra_footprint_param_units', float('nan')):>8.2f}")
  if out["notes"]:
    lines += [""] + [f"note: {n}" for n in out["notes"]]
  lines.append(f"written: {out['path']}")
  return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=sorted(MODELS), default="small",
                 help="small: examples.cifar TinyCNN; preactresnet18: the paper's model")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--num-classes", type=int, default=10)
  p.add_argument("--iters", type=int, default=None,
                 help="timed calls per row (default 60 small, 20 preactresnet18)")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls per row first")
  p.add_argument("--max-seconds", type=float, default=60.0,
                 help="stop timing a row after about this many seconds (0: no limit)")
  p.add_argument("--rounds", type=int, default=None,
                 help="interleave the rows in this many rounds (default 5)")
  p.add_argument("--inner-steps", type=int, nargs="+", default=[1, 2, 3],
                 help="AMP K values timed")
  p.add_argument("--compile-steps", type=int, nargs="+", default=[1, 2, 4, 8],
                 help="AMP K values whose compile time is measured")
  p.add_argument("--epsilon", type=float, default=0.5)
  p.add_argument("--inner-lr", type=float, default=1.0)
  p.add_argument("--rho", type=float, default=0.05, help="SAM radius")
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--weight-decay", type=float, default=5e-4)
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
  p.add_argument("--torch-device", default="auto", help="auto, cpu or cuda")
  p.add_argument("--smoke", action="store_true",
                 help="tiny model and batch, few calls: a check that it runs (CI)")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  if args.smoke:
    args.model, args.batch_size = "small", min(args.batch_size, 8)
    args.iters = args.iters or 3
    args.warmup, args.rounds = min(args.warmup, 1), args.rounds or 1
    args.inner_steps = [k for k in args.inner_steps if k <= 2] or [1]
    args.compile_steps = [k for k in args.compile_steps if k <= 2] or [1]
  args.iters = args.iters or (60 if args.model == "small" else 20)
  args.rounds = max(1, min(args.rounds or 5, args.iters))
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  out = run(parse_args(argv))
  print(format_report(out))
  sys.stdout.flush()
  return out


if __name__ == "__main__":
  main()
