"""Memory of a compiled AMP train step against ERM and SAM, without running it.

Compiles the train step of :mod:`benchmarks.step_time` (same optimisers, donated state) for ERM,
AMP K = 1 and 2 (per-tensor and global balls) and ``optax.contrib.sam`` (opaque mode), and reads
each executable's ``memory_analysis()``: the temporary buffers beyond ERM's, in units of the
bytes of the model's parameters ("parameter copies"). Compiling on the CPU is enough: XLA's
buffer assignment, not a run, gives the figures.

Models: ``preactresnet18`` and ``small`` (the CIFAR models, batch statistics included) and
``mlp`` (four 1024x1024 layers at batch 8, where the parameters dominate memory as in large
models), with grouped AMP rows (``grouped_amp(..., num_groups=4)``: four stacked per-group
gradients on one device), and the same steps compiled for 4 (CPU) devices with the batch, and the
group axis, sharded over them: per-device memory beyond the sharded ERM step's, one group per
device.

Run from the repository root::

    python -m benchmarks.step_memory --model preactresnet18 --batch-size 128   # ~2 min on CPU
    python -m benchmarks.step_memory --model mlp --batch-size 8
"""

import argparse
import json
import os
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import step_time
from examples.cifar import models as cifar_models

ROWS = (
    step_time.Variant("ERM", "jax", "erm"),
    step_time.Variant("AMP K=1 per_tensor", "jax", "amp", 1, "per_tensor"),
    step_time.Variant("AMP K=1 global", "jax", "amp", 1, "global"),
    step_time.Variant("AMP K=2 per_tensor", "jax", "amp", 2, "per_tensor"),
    step_time.Variant("AMP K=2 global", "jax", "amp", 2, "global"),
    step_time.Variant("SAM opaque (optax.contrib)", "jax", "sam"),
)


def mlp_params(width: int = 1024, depth: int = 4) -> Any:
  keys = jax.random.split(jax.random.key(0), depth)
  return [{"w": jax.random.normal(k, (width, width)) / np.sqrt(width), "b": jnp.zeros((width,))}
          for k in keys]


# grouped_amp(..., num_groups=G) rows, MLP only: the per-group gradients are G stacked copies.
GROUPED_ROWS = (
    step_time.Variant("AMP K=1 per_tensor, 4 groups", "jax", "amp", 1, "per_tensor",
                      num_groups=4),
    step_time.Variant("AMP K=1 global, 4 groups", "jax", "amp", 1, "global", num_groups=4),
    step_time.Variant("AMP K=2 global, 4 groups", "jax", "amp", 2, "global", num_groups=4),
)


def mlp_step(tx: optax.GradientTransformation, groups: int | None = None) -> Any:
  def loss_fn(params, x):
    h = x
    for layer in params:
      h = jnp.tanh(h @ layer["w"] + layer["b"])
    return jnp.mean(h ** 2)

  def step(state, x):
    params, opt_state = state
    if groups is None:
      grads = jax.grad(loss_fn)(params, x)
      grad_fn = lambda p, _: jax.grad(loss_fn)(p, x)  # noqa: E731
    else:
      gx = x.reshape((groups, -1) + x.shape[1:])
      grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, gx)
      grad_fn = lambda p, _: jax.vmap(jax.grad(loss_fn))(p, gx)  # noqa: E731
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), opt_state

  return step


SHARDED_DEVICES = 4


def sharded_memory(args: argparse.Namespace) -> dict[str, Any]:
  """Per-device memory of the MLP steps compiled for :data:`SHARDED_DEVICES` devices.

  The parameters and optimiser state replicated, the batch sharded over a ``"data"`` mesh axis
  (for grouped AMP the batch's leading axis splits into the groups, so each device holds its
  groups): ERM, ungrouped AMP K = 1 (global), and AMP K = 1 with one group per device.
  """
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  n = SHARDED_DEVICES
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  cases = (step_time.Variant(f"ERM, {n} devices", "jax", "erm"),
           step_time.Variant(f"AMP K=1 global, {n} devices", "jax", "amp", 1, "global"),
           step_time.Variant(f"AMP K=1 global, {n} groups on {n} devices", "jax", "amp", 1,
                             "global", num_groups=n))
  params = mlp_params()
  batch = max(args.batch_size, n) // n * n
  x = jnp.ones((batch, params[0]["w"].shape[0]))
  out = {}
  for v in cases:
    tx = step_time.make_optimizer(v, args)
    step = jax.jit(mlp_step(tx, v.num_groups), donate_argnums=0,
                   in_shardings=(replicated, data), out_shardings=replicated)
    out[v.name] = step_time.memory_stats(step.lower((params, tx.init(params)), x).compile())
  return out


def compiled_memory(variant: step_time.Variant, args: argparse.Namespace) -> tuple[Any, int]:
  """The memory stats of one variant's compiled step, and the parameters' bytes."""
  tx = step_time.make_optimizer(variant, args)
  if args.model == "mlp":
    params = mlp_params()
    x = jnp.ones((args.batch_size, params[0]["w"].shape[0]))
    lowered = jax.jit(mlp_step(tx, variant.num_groups), donate_argnums=0).lower(
        (params, tx.init(params)), x)
  else:
    model = cifar_models.get_model(step_time.MODELS[args.model], 10)
    x = jnp.zeros((args.batch_size, 32, 32, 3))
    y = jnp.zeros((args.batch_size,), jnp.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    params = variables["params"]
    state = (params, variables["batch_stats"], tx.init(params))
    lowered = jax.jit(step_time.make_train_step(model, tx), donate_argnums=0).lower(state, x, y)
  return step_time.memory_stats(lowered.compile()), step_time.tree_bytes(params)


def run(args: argparse.Namespace) -> dict[str, Any]:
  stats = {}
  param_bytes = 0
  for v in ROWS + (GROUPED_ROWS if args.model == "mlp" else ()):
    stats[v.name], param_bytes = compiled_memory(v, args)
  if stats["ERM"] is None:
    raise SystemExit("memory_analysis() is not available on this backend.")
  erm = stats["ERM"]["temp_size_in_bytes"]
  rows = [{"name": name, "temp_bytes": s["temp_size_in_bytes"],
           "extra_temp_param_copies": (s["temp_size_in_bytes"] - erm) / param_bytes}
          for name, s in stats.items()]
  sharded_rows = []
  if args.model == "mlp" and jax.device_count() >= SHARDED_DEVICES:
    sharded = sharded_memory(args)
    sharded_erm = next(iter(sharded.values()))["temp_size_in_bytes"]
    sharded_rows = [{"name": name, "temp_bytes_per_device": s["temp_size_in_bytes"],
                     "extra_temp_param_copies_per_device":
                         (s["temp_size_in_bytes"] - sharded_erm) / param_bytes}
                    for name, s in sharded.items()]
  sam = next(r for r in rows if r["name"].startswith("SAM"))["extra_temp_param_copies"]
  for r in rows:
    r["minus_sam"] = r["extra_temp_param_copies"] - sam
  device = jax.devices()[0]
  out = {"benchmark": "step_memory", "model": args.model, "batch_size": args.batch_size,
         "param_bytes": param_bytes, "rows": rows, "sharded_rows": sharded_rows,
         "environment": {"platform": device.platform, "jax": jax.__version__,
                         "optax": optax.__version__, "python": platform.python_version()}}
  path = args.out or os.path.join(step_time.RESULTS_DIR,
                                  f"step_memory_{args.model}_b{args.batch_size}_"
                                  f"{device.platform}.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=2)
  out["path"] = path
  return out


def format_report(out: dict[str, Any]) -> str:
  lines = [f"{out['model']} batch {out['batch_size']}: temporary memory of the compiled step "
           "beyond ERM's, in parameter copies",
           f"{'row':28s} {'extra':>8s} {'vs SAM':>8s}"]
  for r in out["rows"]:
    lines.append(f"{r['name']:28s} {r['extra_temp_param_copies']:+8.3f} {r['minus_sam']:+8.3f}")
  if out.get("sharded_rows"):
    lines += ["", f"compiled for {SHARDED_DEVICES} devices (batch / group axis sharded): "
              "temporary memory per device beyond the sharded ERM step's, in parameter copies"]
    for r in out["sharded_rows"]:
      lines.append(f"{r['name']:36s} {r['extra_temp_param_copies_per_device']:+8.3f}")
  return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=("preactresnet18", "small", "mlp"), default="mlp")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--epsilon", type=float, default=0.5)
  p.add_argument("--inner-lr", type=float, default=1.0)
  p.add_argument("--rho", type=float, default=0.05, help="SAM radius")
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--weight-decay", type=float, default=5e-4)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.model == "mlp" and "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", ""):
    try:  # CPU devices for the sharded rows
      jax.config.update("jax_num_cpu_devices", SHARDED_DEVICES)
    except RuntimeError:
      pass  # the backend is already up (called from a test): use its devices.
  out = run(args)
  print(format_report(out))
  return out


if __name__ == "__main__":
  main()
