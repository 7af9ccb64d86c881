"""Collectives an AMP train step issues, counted in the compiled HLO, against the ERM step.

Compiles (never runs) one train step of a small MLP on a 4-device data-parallel mesh, for

* ERM: ``sgd(momentum)`` on the gradient of the batch loss;
* AMP: ``optax.chain(amp_optax.amp(epsilon, inner_steps=K, norm=norm), <ERM optimiser>)``,
  K = 1 and 2 (``unroll=True``, so each inner step is its own code and is counted once per
  execution), and ``grouped_amp(epsilon, num_groups=G, ...)`` with a group per device;

each under four ways of spreading the batch:

* ``jit``: ``jax.jit`` with the batch sharded on a ``("data",)`` mesh, params replicated;
* ``jit_fsdp``: ``jax.jit`` on a 2 x 2 ``("data", "model")`` mesh, the hidden weights split on
  ``"model"`` (so norms of Delta and the matmuls need collectives too);
* ``shard_map``: ``jax.shard_map`` over ``"data"``, gradients averaged with
  ``jax.lax.pmean`` and ``amp(batch_axis_name="data")``;
* ``pmap``: ``jax.pmap(axis_name="data")``, the same averaging.

and counts, in ``.lower(...).compile().as_text()``, every collective op (``all-reduce``,
``all-gather``, ``reduce-scatter``, ``collective-permute``, ``all-to-all``, and their async
``-start`` forms), the tensors it carries (XLA combines several all-reduces into one op with a
tuple of operands) and its bytes (the size of the op's result on one device). Static counts:
a collective inside a loop body would run once per iteration, which is why K is unrolled.

Run from the repository root::

    python -m benchmarks.collectives                 # one process, 4 fake CPU devices
    python -m benchmarks.collectives --processes 2   # also 2 processes x 2 devices (gloo)
    python -m benchmarks.collectives --smoke         # CI: a subset, seconds

The table goes to stdout, the rows to ``benchmarks/results/collectives_cpu.json``.
"""

import argparse
from collections.abc import Callable
from collections.abc import Sequence
import dataclasses
from functools import partial
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from typing import Any
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import amp_optax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_DEVICES = 4
SIZES = (32, 128, 128, 10)  # MLP: in, hidden, hidden, out.
BATCH = 64
MODES = ("jit", "jit_fsdp", "shard_map", "pmap")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
                "c64": 8, "c128": 16}
# `%name = <shape> <op>(` where <shape> is one array shape or a tuple of them.
_OP_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+(?P<op>"
    + "|".join(re.escape(c) for c in COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")


@dataclasses.dataclass
class Collective:
  """One collective op of a compiled HLO module."""

  op: str  # e.g. "all-reduce"; an async "-start" form counts as its op.
  shapes: list[tuple[str, tuple[int, ...]]]  # (dtype, dims) of each result tensor.

  @property
  def bytes(self) -> int:
    return sum(_DTYPE_BYTES[d] * int(np.prod(s, dtype=np.int64)) for d, s in self.shapes)


def parse_collectives(hlo_text: str) -> list[Collective]:
  """The collective ops in an HLO module's text (``compiled.as_text()``).

  Args:
    hlo_text: HLO text, e.g. ``jax.jit(f).lower(*args).compile().as_text()``.

  Returns:
    One :class:`Collective` per op, with the dtypes and shapes of its results. For an async
    ``-start`` op (GPU, TPU) the result tuple also holds the operands; only the outputs (the
    second half for all-gather / collective-permute, all of it for all-reduce) are kept.

  Examples:
    >>> text = "%ar = (f32[3,8]{1,0}, f32[3]{0}) all-reduce(%a, %b), to_apply=%add"
    >>> [(c.op, c.bytes) for c in parse_collectives(text)]
    [('all-reduce', 108)]
  """
  found = []
  for line in hlo_text.splitlines():
    m = _OP_RE.match(line)
    if not m:
      continue
    shapes = [(d, tuple(int(x) for x in dims.split(",") if x))
              for d, dims in _ARRAY_RE.findall(m["shape"]) if d in _DTYPE_BYTES]
    if m["start"] and m["op"] != "all-reduce" and len(shapes) % 2 == 0:
      shapes = shapes[len(shapes) // 2:]  # (operands..., outputs...) of an async start.
    found.append(Collective(m["op"], shapes))
  return found


def summarize(collectives: Sequence[Collective]) -> dict[str, dict[str, int]]:
  """Per op kind: ``{"ops", "tensors", "scalars", "bytes"}`` counts; only kinds that occur.

  ``scalars`` counts the tensors of one element among ``tensors`` (losses, norms).
  """
  out: dict[str, dict[str, int]] = {}
  for c in collectives:
    row = out.setdefault(c.op, {"ops": 0, "tensors": 0, "scalars": 0, "bytes": 0})
    row["ops"] += 1
    row["tensors"] += len(c.shapes)
    row["scalars"] += sum(int(np.prod(s)) == 1 for _, s in c.shapes)
    row["bytes"] += c.bytes
  return out


# ---------------------------------------------------------------------------------------------
# The model and the steps.


def init_params(sizes: Sequence[int] = SIZES) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  params = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
    params[f"b{i}"] = np.zeros((b,), np.float32)
  return params


def loss_fn(params, x, y):
  n = len(params) // 2
  h = x
  for i in range(n):
    h = h @ params[f"w{i}"] + params[f"b{i}"]
    if i < n - 1:
      h = jnp.tanh(h)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(h, y))


def make_tx(method: str, inner_steps: int = 0, norm: str = "per_tensor",
            batch_axis_name: str | None = None,
            num_groups: int | None = None) -> optax.GradientTransformation:
  base = optax.sgd(0.1, momentum=0.9)
  if method == "erm":
    return base
  if num_groups is not None:
    return optax.chain(
        amp_optax.grouped_amp(0.05, num_groups=num_groups, inner_steps=inner_steps, norm=norm,
                              batch_axis_name=batch_axis_name, unroll=True),
        base)
  return optax.chain(
      amp_optax.amp(0.05, inner_steps=inner_steps, norm=norm, batch_axis_name=batch_axis_name,
                    unroll=True),
      base)


def step_body(tx, axis_name: str | None, params, state, x, y, groups: int | None = None):
  """One train step; with ``axis_name`` the gradient and loss are averaged over it.

  With ``groups`` (grouped AMP) the batch is split into that many groups, each with its own
  gradients (``jax.vmap``); amp averages them, over the axis too, at the end.
  """
  if groups is None:
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    if axis_name is not None:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    grad_fn = jax.grad(lambda p, _: loss_fn(p, x, y))
  else:
    gx, gy = (a.reshape((groups, -1) + a.shape[1:]) for a in (x, y))
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))(params, gx, gy)
    loss = jnp.mean(losses)
    if axis_name is not None:
      loss = jax.lax.pmean(loss, axis_name)
    grad_fn = lambda p, _: jax.vmap(jax.grad(loss_fn))(p, gx, gy)  # noqa: E731
  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
  return optax.apply_updates(params, updates), state, loss


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  method: str  # "erm" or "amp"
  inner_steps: int = 0
  norm: str = "per_tensor"
  groups: int | None = None  # grouped AMP: this many groups in the whole batch


VARIANTS = (Variant("ERM", "erm"), Variant("AMP K=1 per_tensor", "amp", 1, "per_tensor"),
            Variant("AMP K=1 global", "amp", 1, "global"),
            Variant("AMP K=2 global", "amp", 2, "global"),
            Variant("AMP K=1 global, a group per device", "amp", 1, "global", N_DEVICES),
            Variant("AMP K=2 global, a group per device", "amp", 2, "global", N_DEVICES))


def _devices_by_process(devices: Sequence[Any]) -> list[Any]:
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def compiled_text(mode: str, variant: Variant, devices: Sequence[Any]) -> str:
  """The compiled HLO text of one train step of ``variant`` spread over ``devices`` by ``mode``."""
  devices = _devices_by_process(devices)
  n = len(devices)
  params = init_params()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(BATCH, SIZES[0])).astype(np.float32)
  y = rng.integers(0, SIZES[-1], size=(BATCH,)).astype(np.int32)
  per_device = mode in ("shard_map", "pmap")
  # num_groups counts the groups of the whole batch; under shard_map/pmap each device splits
  # its own batch into its share of them.
  groups = variant.groups and (variant.groups // n if per_device else variant.groups)
  tx = make_tx(variant.method, variant.inner_steps, variant.norm,
               batch_axis_name="data" if per_device else None, num_groups=variant.groups)
  abstract = lambda t, sh=None: jax.tree.map(  # noqa: E731
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sh), t)

  if mode == "pmap":
    if jax.process_count() > 1:
      raise NotImplementedError("pmap rows are measured in one process only")
    stack = lambda t: jax.tree.map(lambda a: np.broadcast_to(a, (n,) + np.shape(a)), t)  # noqa: E731
    state = jax.device_get(tx.init(params))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # newer jax may deprecate pmap.
      step = jax.pmap(partial(step_body, tx, "data", groups=groups), axis_name="data",
                      devices=devices)
      lowered = step.lower(abstract(stack(params)), abstract(stack(state)),
                           abstract(x.reshape(n, -1, x.shape[1])), abstract(y.reshape(n, -1)))
    return lowered.compile().as_text()

  if mode == "jit_fsdp":
    mesh = Mesh(np.array(devices).reshape(n // 2, 2), ("data", "model"),
                axis_types=(AxisType.Auto,) * 2)
    specs = {k: P() for k in params}
    specs.update({"w0": P(None, "model"), "b0": P("model"), "w1": P("model", None)})
  else:
    mesh = Mesh(np.array(devices), ("data",), axis_types=(AxisType.Auto,))
    specs = {k: P() for k in params}
  param_sh = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  batch_sh = NamedSharding(mesh, P("data"))
  a_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=param_sh[k])
              for k, v in params.items()}
  a_state = jax.eval_shape(jax.jit(tx.init), a_params)
  a_x, a_y = abstract(x, batch_sh), abstract(y, batch_sh)
  if mode == "shard_map":
    # check_vma=False: per-device gradients of replicated params, averaged by the step.
    step = jax.jit(jax.shard_map(
        partial(step_body, tx, "data", groups=groups), mesh=mesh,
        in_specs=(P(), P(), P("data"), P("data")),
        out_specs=(P(), P(), P()), check_vma=False))
  else:
    step = jax.jit(partial(step_body, tx, None, groups=groups))
  return step.lower(a_params, a_state, a_x, a_y).compile().as_text()


def param_bytes() -> int:
  return sum(v.nbytes for v in init_params().values())


def measure(devices: Sequence[Any], modes: Sequence[str] = MODES,
            variants: Sequence[Variant] = VARIANTS, setup: str | None = None) -> list[dict]:
  """One row per (mode, variant): the collectives of its compiled step and the compile time."""
  setup = setup or f"1 process x {len(devices)} devices"
  rows = []
  for mode in modes:
    for variant in variants:
      t = time.perf_counter()
      try:
        text = compiled_text(mode, variant, devices)
      except NotImplementedError as e:
        print(f"skipped {mode} {variant.name}: {e}", file=sys.stderr)
        continue
      found = summarize(parse_collectives(text))
      rows.append({"setup": setup, "mode": mode, "variant": variant.name,
                   "method": variant.method, "inner_steps": variant.inner_steps,
                   "norm": variant.norm, "collectives": found,
                   "all_reduce_ops": found.get("all-reduce", {}).get("ops", 0),
                   "all_reduce_bytes": found.get("all-reduce", {}).get("bytes", 0),
                   "total_ops": sum(v["ops"] for v in found.values()),
                   "total_bytes": sum(v["bytes"] for v in found.values()),
                   "compile_s": round(time.perf_counter() - t, 3)})
  return rows


def format_table(rows: list[dict]) -> str:
  pb = param_bytes()
  erm = {(r["setup"], r["mode"]): r for r in rows if r["method"] == "erm"}
  lines = ["| setup | mode | step | all-reduce ops (tensors, of them scalars) | all-reduce bytes "
           "| other collectives | total bytes | x ERM bytes | x param bytes |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ar = r["collectives"].get("all-reduce", {"ops": 0, "tensors": 0, "scalars": 0, "bytes": 0})
    other = ", ".join(f"{k} {v['ops']} ({v['bytes']:,} B)" for k, v in r["collectives"].items()
                      if k != "all-reduce") or "none"
    base = erm.get((r["setup"], r["mode"]))
    ratio = "n/a"
    if base and base["total_bytes"]:
      ratio = f"{r['total_bytes'] / base['total_bytes']:.2f}"
    lines.append(f"| {r['setup']} | {r['mode']} | {r['variant']} "
                 f"| {ar['ops']} ({ar['tensors']}, {ar['scalars']}) "
                 f"| {ar['bytes']:,} | {other} | {r['total_bytes']:,} | {ratio} "
                 f"| {r['total_bytes'] / pb:.2f} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Several processes on this machine (jax.distributed over gloo).


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_processes(num_processes: int, local_devices: int, out: str,
                     timeout: float = 300) -> list[dict]:
  """Runs this script as ``num_processes`` processes; returns process 0's rows."""
  port = _free_port()
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={local_devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "benchmarks.collectives", "--process-id", str(i),
       "--num-processes", str(num_processes), "--port", str(port), "--child-out", out],
      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.1)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  logs = [p.communicate()[0] for p in procs]
  if any(p.returncode != 0 for p in procs):
    raise RuntimeError("a benchmark process failed or timed out:\n" + "\n".join(
        f"--- process {i} (exit {p.returncode}) ---\n{log}"
        for i, (p, log) in enumerate(zip(procs, logs))))
  with open(out) as f:
    return json.load(f)


def _child(args: argparse.Namespace) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id,
                             initialization_timeout=60)
  setup = f"{jax.process_count()} processes x {jax.local_device_count()} devices"
  rows = measure(jax.devices(), modes=[m for m in MODES if m != "pmap"], setup=setup)
  if jax.process_index() == 0:
    with open(args.child_out, "w") as f:
      json.dump(rows, f)
  jax.distributed.shutdown()


def main(argv: Sequence[str] | None = None, print_fn: Callable[[str], None] = print) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=0,
                      help="also measure N processes x (4 / N) devices, N > 1 (jax.distributed)")
  parser.add_argument("--smoke", action="store_true",
                      help="jit and shard_map, ERM and AMP K=1 only; writes no file")
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "collectives_cpu.json"))
  parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--child-out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.process_id is not None:
    _child(args)
    return []

  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    try:
      jax.config.update("jax_num_cpu_devices", N_DEVICES)
    except RuntimeError:
      pass  # the backend is already up (called from a test): use its devices.
  if jax.device_count() < N_DEVICES:
    raise SystemExit(f"needs {N_DEVICES} devices, found {jax.device_count()}: run it as a "
                     f"script, or set XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{N_DEVICES} before jax starts.")
  devices = jax.devices()[:N_DEVICES]
  if args.smoke:
    rows = measure(devices, modes=("jit", "shard_map"), variants=VARIANTS[:2])
  else:
    rows = measure(devices)
    if args.processes > 1:
      rows += launch_processes(args.processes, N_DEVICES // args.processes,
                               args.out + ".child.json")
      os.remove(args.out + ".child.json")
  print_fn(f"MLP {SIZES}, {sum(v.size for v in init_params().values()):,} params "
           f"({param_bytes():,} B float32), global batch {BATCH}, {N_DEVICES} CPU devices")
  print_fn(format_table(rows))
  if not args.smoke:
    command = "python -m benchmarks.collectives" + (
        f" --processes {args.processes}" if args.processes > 1 else "")
    environment = {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "optax": optax.__version__,
                   "python": platform.python_version(), "machine": platform.machine(),
                   "cpu_count": os.cpu_count()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"benchmark": "collectives", "command": command, "smoke": False,
                 "environment": environment, "sizes": SIZES, "batch": BATCH,
                 "num_params": sum(v.size for v in init_params().values()),
                 "param_bytes": param_bytes(), "markdown": format_table(rows), "rows": rows},
                f, indent=1)
  return rows


if __name__ == "__main__":
  main()
