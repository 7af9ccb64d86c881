"""One process of a multi-process AMP training run, for tests/test_multiprocess.py.

Run once per process, all with the same ``--num-processes``, ``--port`` and ``--cases``::

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
        python tests/multiprocess_worker.py --process-id 0 --num-processes 2 --port 12345 \
        --cases '[{"kind": "jit", "inner_steps": 1, "norm": "global"}]' --out /tmp/p0.npz

Each process joins ``jax.distributed`` (CPU collectives through gloo), builds one global mesh
over the devices of all processes, feeds only its own rows of each global batch
(``jax.make_array_from_process_local_data``) and trains the MLP below for ``STEPS`` steps with
``optax.chain(amp(...), sgd(momentum))``. It writes the final params (gathered from all
processes), the last ``AmpState.delta_norm`` and sharding facts to ``--out``.

Importing this module does not touch ``jax.distributed``: the test imports it for the model, the
data and :func:`train_single_process`, the reference the processes must reproduce.

Case kinds:

* ``jit``: 1-D ``("data",)`` mesh over all devices, batch split on it, params replicated.
* ``shard_map``: the same mesh, the step under ``jax.shard_map`` with per-device gradients
  averaged by ``jax.lax.pmean`` and ``amp(batch_axis_name="data")``.
* ``grouped``: as ``jit``, with grouped AMP (``grouped_amp(num_groups=GROUPS)``): each group of
  ``GLOBAL_BATCH / GROUPS`` rows ascends with its own Delta; the groups are spread over the
  devices of all processes.
* ``fsdp``: 2-D ``("data", "model")`` mesh whose ``"model"`` axis spans processes, Explicit
  axes; ``w1`` is split on ``"model"`` by columns and ``w2`` by rows, so every norm and every
  matmul needs a cross-process reduction. Records the shardings seen inside the step.
* Wrong set-ups, which must NOT reproduce the reference: ``dup_rows`` (every process feeds
  process 0's rows), ``local_grads`` (``shard_map`` without any averaging: each device trains
  on its own rows), ``no_axis_name`` (``shard_map``, clean gradients averaged but ``amp``
  without ``batch_axis_name``: each device ascends its own Delta).
* ``crash`` / ``hang`` (process 1 only; the others run ``jit``): exits with an error or sleeps
  before joining, to test that the launcher fails fast instead of hanging.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

STEPS = 3
GLOBAL_BATCH = 32  # divisible by every device count used: 2 processes x 2, 4 x 2.
N_IN, N_HIDDEN, N_OUT = 8, 16, 4
EPSILON = 0.05  # small enough that the ball binds for both norms: the projection matters.
INNER_LR = 1.0
LR, MOMENTUM = 0.1, 0.9
GROUPS = 8  # grouped AMP: groups of 4 rows, spread over the devices of all processes
GOOD_KINDS = ("jit", "shard_map", "fsdp", "grouped")
WRONG_KINDS = ("dup_rows", "local_grads", "no_axis_name")


def init_params() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return {"w1": (rng.normal(size=(N_IN, N_HIDDEN)) * 0.5).astype(np.float32),
          "b1": np.zeros((N_HIDDEN,), np.float32),
          "w2": (rng.normal(size=(N_HIDDEN, N_OUT)) * 0.5).astype(np.float32),
          "b2": np.zeros((N_OUT,), np.float32)}


def global_batches() -> tuple[np.ndarray, np.ndarray]:
  """``STEPS`` global batches: x of shape (STEPS, GLOBAL_BATCH, N_IN), y likewise."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(STEPS, GLOBAL_BATCH, N_IN)).astype(np.float32)
  y = rng.normal(size=(STEPS, GLOBAL_BATCH, N_OUT)).astype(np.float32)
  return x, y


def loss_fn(params, x, y, hidden_sharding=None, out_sharding=None):
  import jax.numpy as jnp

  h = jnp.tanh(jnp.matmul(x, params["w1"], out_sharding=hidden_sharding) + params["b1"])
  out = jnp.matmul(h, params["w2"], out_sharding=out_sharding) + params["b2"]
  return jnp.mean((out - y) ** 2)


def make_tx(inner_steps: int, norm: str, batch_axis_name: str | None = None,
            num_groups: int | None = None):
  import optax

  import amp_optax

  hp = dict(inner_lr=INNER_LR, inner_steps=inner_steps, norm=norm,
            batch_axis_name=batch_axis_name)
  if num_groups is None:
    ascent = amp_optax.amp(EPSILON, **hp)
  else:
    ascent = amp_optax.grouped_amp(EPSILON, num_groups=num_groups, **hp)
  return optax.chain(ascent, optax.sgd(LR, momentum=MOMENTUM))


def grouped_grads(loss, params, x, y, groups: int):
  """Per-group clean gradients and the grouped grad_fn (groups of consecutive rows)."""
  import jax

  gx, gy = (a.reshape((groups, -1) + a.shape[1:]) for a in (x, y))
  per_group = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))
  stacked = jax.vmap(jax.grad(loss), in_axes=(0, 0, 0))
  return per_group(params, gx, gy), lambda p, _: stacked(p, gx, gy)


def train_single_process(inner_steps: int, norm: str, groups: int | None = None):
  """The reference: one device, the whole global batch, plain ``jax.jit``.

  Returns:
    ``(params, delta_norm)`` as numpy after ``STEPS`` steps.
  """
  import jax
  import optax

  tx = make_tx(inner_steps, norm, num_groups=groups)
  device = jax.local_devices()[0]
  params = jax.device_put(init_params(), device)
  state = tx.init(params)

  def step(params, state, x, y):
    if groups:
      grads, grad_fn = grouped_grads(loss_fn, params, x, y, groups)
    else:
      grads = jax.grad(loss_fn)(params, x, y)
      grad_fn = jax.grad(lambda p, _: loss_fn(p, x, y))
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  # Optimisation level 0, as in the children (see the test's child_env): ~2.5x faster to
  # compile, the same float32 arithmetic up to rounding.
  step = jax.jit(step, compiler_options={"xla_backend_optimization_level": 0})

  xs, ys = global_batches()
  for t in range(STEPS):
    params, state = step(params, state, jax.device_put(xs[t], device),
                         jax.device_put(ys[t], device))
  return jax.device_get(params), float(state[0].delta_norm)


# ---------------------------------------------------------------------------------------------
# Everything below runs only in a child process.


def _mesh_devices(shape: tuple[int, ...]) -> np.ndarray:
  """All devices as an array of ``shape``; the last axis spans processes when 2-D.

  1-D: ordered by (process, local device), so each process owns a contiguous run of the
  batch. 2-D ``(data, model)`` with ``model`` dividing the process count: position ``(d, m)``
  is local device ``d % L`` of process ``(d // L) * model + m`` (``L`` local devices), so the
  ``model`` axis always crosses processes and, with more processes than ``model``, so does
  ``data``.
  """
  import jax

  by_process: dict[int, list] = {}
  for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  if len(shape) == 1:
    return np.array([d for p in sorted(by_process) for d in by_process[p]])
  n_data, n_model = shape
  n_local = len(by_process[0])
  grid = np.empty(shape, dtype=object)
  for d in range(n_data):
    for m in range(n_model):
      grid[d, m] = by_process[(d // n_local) * n_model + m][d % n_local]
  return grid


def _local_rows(sharding, global_shape) -> slice:
  """The contiguous rows of a global batch that this process's devices hold."""
  import jax

  index_map = sharding.devices_indices_map(global_shape)
  blocks = sorted({index_map[d][0].indices(global_shape[0])[:2]
                   for d in sharding.addressable_devices})
  for (_, stop), (start, _) in zip(blocks, blocks[1:]):
    if stop != start:
      raise RuntimeError(
          f"process {jax.process_index()}: its batch rows {blocks} are not contiguous; "
          "order the mesh devices by process.")
  return slice(blocks[0][0], blocks[-1][1])


def _global_batch(sharding, x: np.ndarray, wrong_rows: bool = False):
  """This process's rows of ``x`` (process 0's if ``wrong_rows``) as one global array."""
  import jax

  rows = _local_rows(sharding, x.shape)
  if wrong_rows:
    n = rows.stop - rows.start
    rows = slice(0, n)
  return jax.make_array_from_process_local_data(sharding, x[rows], x.shape)


def _same_spec(a, b, ndim: int) -> bool:
  """Whether two PartitionSpecs split an ndim-array alike (trailing Nones do not count)."""
  pad = lambda s: tuple(s) + (None,) * (ndim - len(s))  # noqa: E731
  return pad(a) == pad(b)


def _gather(x) -> np.ndarray:
  """The whole of a global array on every process (replicated ones without a collective)."""
  from jax.experimental import multihost_utils

  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_case(case: dict) -> dict:
  """Trains one case; returns numpy params, delta_norm and sharding facts."""

  import jax
  from jax.sharding import AxisType
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  kind = case["kind"]
  xs, ys = global_batches()
  facts: dict = {}

  if kind == "fsdp":
    n_model = case.get("model", 2)
    n_data = jax.device_count() // n_model
    mesh = Mesh(_mesh_devices((n_data, n_model)), ("data", "model"),
                axis_types=(AxisType.Explicit, AxisType.Explicit))
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}
  else:
    mesh = Mesh(_mesh_devices((jax.device_count(),)), ("data",),
                axis_types=(AxisType.Auto,))
    specs = {k: P() for k in ("w1", "b1", "w2", "b2")}
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  batch_sharding = NamedSharding(mesh, P("data"))
  rows = _local_rows(batch_sharding, xs[0].shape)
  facts["rows"] = [rows.start, rows.stop]  # of each global batch, fed by this process
  facts["params_cross_process"] = {
      k: len({d.process_index for d in s.device_set}) > 1 and not s.is_fully_replicated
      for k, s in shardings.items()}

  use_shard_map = kind in ("shard_map", "local_grads", "no_axis_name")
  # "local_grads"/"no_axis_name" leave the averaging out on purpose (batch_axis_name=(), the
  # explicit opt-out; None raises under a mapped axis) to show that the tolerance catches it.
  axis_name = {"shard_map": "data", "local_grads": (), "no_axis_name": ()}.get(kind)
  groups = GROUPS if kind == "grouped" else None
  tx = make_tx(case["inner_steps"], case["norm"], batch_axis_name=axis_name, num_groups=groups)

  with jax.set_mesh(mesh):
    params = jax.device_put(init_params(), shardings)
    state = jax.jit(tx.init)(params)
    seen_specs: list[dict] = []

    if kind == "fsdp":
      def loss(p, x, y):
        return loss_fn(p, x, y, hidden_sharding=P("data", "model"), out_sharding=P("data"))

      def grad_fn(p, x, y):
        # Traced once per inner step: the perturbed params theta + Delta must carry theta's
        # sharding, i.e. Delta did not gather or reshard the params.
        seen_specs.append({k: _same_spec(jax.typeof(v).sharding.spec, specs[k], v.ndim)
                           for k, v in p.items()})
        return jax.grad(loss)(p, x, y)
    else:
      loss = loss_fn

      def grad_fn(p, x, y):
        return jax.grad(loss)(p, x, y)

    def step_body(params, state, x, y):
      if groups:
        grads, grouped_fn = grouped_grads(loss, params, x, y, groups)
        updates, state = tx.update(grads, state, params, grad_fn=grouped_fn)
        return optax.apply_updates(params, updates), state, updates
      grads = jax.grad(loss)(params, x, y)
      if kind in ("shard_map", "no_axis_name"):
        grads = jax.lax.pmean(grads, "data")
      updates, state = tx.update(grads, state, params,
                                 grad_fn=lambda p, _: grad_fn(p, x, y))
      return optax.apply_updates(params, updates), state, updates

    if use_shard_map:
      # check_vma=False: gradients of the replicated params are per-device values here, so
      # averaging them (or, in the wrong set-ups, not) is up to the step, as under pmap.
      step = jax.jit(jax.shard_map(
          step_body, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
          out_specs=(P(), P(), P()), check_vma=False))
    else:
      step = jax.jit(step_body)

    for t in range(STEPS):
      x = _global_batch(batch_sharding, xs[t], wrong_rows=kind == "dup_rows")
      y = _global_batch(batch_sharding, ys[t], wrong_rows=kind == "dup_rows")
      params, state, updates = step(params, state, x, y)

    if kind == "fsdp":
      momentum = state[1][0].trace  # chain(amp, sgd); sgd = chain(trace, scale).
      facts["grad_fn_same_spec"] = seen_specs
      facts["same_sharding"] = {
          what: {k: tree[k].sharding.is_equivalent_to(shardings[k], tree[k].ndim)
                 for k in shardings}
          for what, tree in (("params", params), ("updates", updates),
                             ("momentum", momentum))}
    params = {k: _gather(v) for k, v in params.items()}
    delta_norm = float(_gather(state[0].delta_norm))
  return {"params": params, "delta_norm": delta_norm, "facts": facts}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--cases", required=True, help="JSON list of case dicts")
  parser.add_argument("--out", required=True, help="where to write this process's .npz")
  parser.add_argument("--init-timeout", type=int, default=60)
  args = parser.parse_args()
  cases = json.loads(args.cases)

  if any(c["kind"] == "crash" for c in cases) and args.process_id == 1:
    raise SystemExit("worker 1: crashing on purpose (the 'crash' case)")
  if any(c["kind"] == "hang" for c in cases) and args.process_id == 1:
    time.sleep(3600)

  import jax

  # gloo is the default CPU collectives in recent jax; older ones default to none and then
  # cannot run a computation that spans processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  t0 = time.perf_counter()
  jax.distributed.initialize(
      coordinator_address=f"localhost:{args.port}", num_processes=args.num_processes,
      process_id=args.process_id, initialization_timeout=args.init_timeout,
      heartbeat_timeout_seconds=10, shutdown_timeout_seconds=10)
  t_init = time.perf_counter() - t0
  assert jax.process_count() == args.num_processes, jax.process_count()

  out: dict[str, np.ndarray] = {}
  meta = {"process_index": jax.process_index(), "device_count": jax.device_count(),
          "local_device_count": jax.local_device_count(), "init_s": t_init, "cases": []}
  for i, case in enumerate(cases):
    if case["kind"] in ("crash", "hang"):
      case = {**case, "kind": "jit"}
    t = time.perf_counter()
    result = run_case(case)
    for k, v in result["params"].items():
      out[f"{i}/{k}"] = v
    meta["cases"].append({**case, "delta_norm": result["delta_norm"], "facts": result["facts"],
                          "seconds": time.perf_counter() - t})
  out["meta"] = np.array(json.dumps(meta))
  np.savez(args.out, **out)
  jax.distributed.shutdown()
  print(f"process {args.process_id}: done in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
