"""amp() under multi-process jax: real processes on localhost give the single-process update.

Each test starts N Python processes (``tests/multiprocess_worker.py``) that join one
``jax.distributed`` cluster over gloo CPU collectives, 2 fake CPU devices each, build one
global mesh, feed only their own rows of every global batch and train a small MLP with
``optax.chain(amp(...), sgd(momentum))``. The final params must equal those of one process on
one device with the whole batch (:func:`multiprocess_worker.train_single_process`, run here).

Tolerance (float32): the sharded step computes every batch mean as per-device partial sums
added by an all-reduce, the reference as one sum, so each gradient differs by the rounding of a
re-ordered sum of ``GLOBAL_BATCH`` terms (a few ulps). Three steps of AMP + momentum carry that
into the params without amplifying it much: the largest difference measured is 6e-8 (one
float32 ulp at 0.5). ``RTOL = 1e-5``, ``ATOL = 1e-6`` leave a margin of more than 10x, and the
wrong set-ups of the guard test miss them by more than 100x.

A failed or hung process fails the test with every process's output: the launcher polls all
children, kills the rest as soon as one exits non-zero, and kills all at a deadline; the
children also pass ``initialization_timeout`` to ``jax.distributed.initialize``.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import multiprocess_worker as worker
import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
LOCAL_DEVICES = 2
TIMEOUT_S = 180  # per launch; a normal one takes 5-20 s on 2 busy cores.
RTOL, ATOL = 1e-5, 1e-6
ALL_K_NORMS = [{"inner_steps": k, "norm": n} for k in (1, 2) for n in ("per_tensor", "global")]


class MultiProcessError(AssertionError):
  """A child process failed or hung; the message holds every child's output."""


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env() -> dict[str, str]:
  """The parent's environment with 2 fake CPU devices instead of conftest's 8."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  # Optimisation level 0 compiles these tiny steps ~2.5x faster; it changes float rounding
  # only, which the tolerance covers.
  env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES} "
                      "--xla_backend_optimization_level=0").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  return env


def launch(num_processes: int, cases: list[dict], tmp_path, timeout: float = TIMEOUT_S,
           init_timeout: int = 60) -> list[dict]:
  """Runs ``cases`` in ``num_processes`` worker processes; returns each process's results.

  Raises:
    MultiProcessError: a process exited non-zero (the others are killed at once) or the
      launch passed ``timeout`` seconds (all are killed); the message shows all outputs.
  """
  port = free_port()
  env = child_env()
  procs, logs = [], []
  for i in range(num_processes):
    log = open(tmp_path / f"process{i}.log", "w+")  # noqa: SIM115 - closed below.
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, WORKER, "--process-id", str(i), "--num-processes", str(num_processes),
         "--port", str(port), "--cases", json.dumps(cases), "--out", str(tmp_path / f"{i}.npz"),
         "--init-timeout", str(init_timeout)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout
  problem = None
  try:
    while problem is None:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        break
      bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if bad:
        problem = f"process {bad[0]} exited with code {codes[bad[0]]}"
      elif time.monotonic() > deadline:
        problem = f"timed out after {timeout:.0f} s"
      else:
        time.sleep(0.05)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    outputs = []
    for i, log in enumerate(logs):
      log.seek(0)
      outputs.append(f"----- process {i} (exit code {procs[i].returncode}) -----\n{log.read()}")
      log.close()
  if problem is not None:
    raise MultiProcessError(
        f"{num_processes}-process run {problem}; cases {cases}\n" + "\n".join(outputs))
  results = []
  for i in range(num_processes):
    with np.load(tmp_path / f"{i}.npz") as data:
      meta = json.loads(str(data["meta"]))
      for j, case in enumerate(meta["cases"]):
        case["params"] = {k: data[f"{j}/{k}"] for k in worker.init_params()}
    results.append(meta)
  return results


_REFERENCE: dict = {}


def reference(inner_steps: int, norm: str, groups: int | None = None):
  key = (inner_steps, norm, groups)
  if key not in _REFERENCE:
    _REFERENCE[key] = worker.train_single_process(inner_steps, norm, groups)
  return _REFERENCE[key]


def max_abs_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def assert_same_across_processes(results: list[dict]) -> None:
  """Every process ends with the same (gathered) params: one global training run."""
  for meta in results[1:]:
    for got, first in zip(meta["cases"], results[0]["cases"]):
      for k in first["params"]:
        np.testing.assert_array_equal(got["params"][k], first["params"][k],
                                      err_msg=f"process {meta['process_index']}, {k}, {got}")


def assert_matches_reference(results: list[dict]) -> None:
  assert_same_across_processes(results)
  for case in results[0]["cases"]:
    groups = worker.GROUPS if case["kind"] == "grouped" else None
    want, want_delta_norm = reference(case["inner_steps"], case["norm"], groups)
    for k in want:
      np.testing.assert_allclose(case["params"][k], want[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"{k} of {case['kind']} K={case['inner_steps']} "
                                         f"{case['norm']}")
    np.testing.assert_allclose(case["delta_norm"], want_delta_norm, rtol=RTOL)


@pytest.mark.parametrize("num_processes,cases", [
    (2, [{"kind": "jit", **c} for c in ALL_K_NORMS]),
    # 4 processes on CI's 2 cores: one case per K and per norm keeps it to seconds.
    (4, [{"kind": "jit", "inner_steps": 1, "norm": "per_tensor"},
         {"kind": "jit", "inner_steps": 2, "norm": "global"}]),
])
def test_jit_data_parallel_matches_single_process(num_processes, cases, tmp_path):
  results = launch(num_processes, cases, tmp_path)
  assert [r["process_index"] for r in results] == list(range(num_processes))
  assert {r["device_count"] for r in results} == {num_processes * LOCAL_DEVICES}
  assert {r["local_device_count"] for r in results} == {LOCAL_DEVICES}
  # Each process fed its own block of rows; together they are the global batch, once.
  per_process = worker.GLOBAL_BATCH // num_processes
  for r in results:
    for case in r["cases"]:
      p = r["process_index"]
      assert case["facts"]["rows"] == [p * per_process, (p + 1) * per_process], case["facts"]
  assert_matches_reference(results)


def test_shard_map_with_batch_axis_name_across_processes(tmp_path):
  """pmean over an axis that spans processes: one shared Delta, the single-process update."""
  results = launch(2, [{"kind": "shard_map", "inner_steps": 2, "norm": n}
                       for n in ("per_tensor", "global")], tmp_path)
  assert_matches_reference(results)


def test_params_sharded_across_processes(tmp_path):
  """FSDP-style 2-D mesh, Explicit axes: w1, b1, w2 split over processes on "model".

  Delta keeps the params' sharding (the perturbed params grad_fn sees, the adversarial
  gradient returned, the momentum and the new params all carry the params' shardings), and
  the global norm is global: delta_norm and the params equal the single-process ones, which
  a norm over one process's shard would not give.
  """
  results = launch(2, [{"kind": "fsdp", **c} for c in ALL_K_NORMS], tmp_path)
  for meta in results:
    for case in meta["cases"]:
      facts = case["facts"]
      assert facts["params_cross_process"] == {"w1": True, "b1": True, "w2": True, "b2": False}
      assert facts["grad_fn_same_spec"], "grad_fn was not traced"
      for seen in facts["grad_fn_same_spec"]:
        assert all(seen.values()), f"theta + Delta resharded: {seen} ({case['kind']})"
      for what, same in facts["same_sharding"].items():
        assert all(same.values()), f"{what} lost the params' sharding: {same}"
  assert_matches_reference(results)
  for case in results[0]["cases"]:
    if case["norm"] == "global":  # the ball binds: Delta is on its surface.
      np.testing.assert_allclose(case["delta_norm"], worker.EPSILON, rtol=1e-5)


def test_wrong_setups_do_not_match(tmp_path):
  """Guards the tests above: their tolerance does catch a wrong data or averaging set-up."""
  cases = [{"kind": kind, "inner_steps": 2, "norm": "global"} for kind in worker.WRONG_KINDS]
  results = launch(2, cases, tmp_path)
  want, _ = reference(2, "global")
  for case in results[0]["cases"]:
    diff = max_abs_diff(case["params"], want)
    scale = max(float(np.max(np.abs(w))) for w in want.values())
    # 100x what assert_matches_reference allows, so not a near miss.
    assert diff > 100 * (ATOL + RTOL * scale), (case["kind"], diff)


def test_failed_process_fails_fast_with_its_output(tmp_path):
  start = time.monotonic()
  with pytest.raises(MultiProcessError, match="(?s)process 1 exited.*crashing on purpose"):
    launch(2, [{"kind": "crash", "inner_steps": 1, "norm": "global"}], tmp_path)
  assert time.monotonic() - start < 60


def test_hung_process_times_out_with_outputs(tmp_path):
  start = time.monotonic()
  with pytest.raises(MultiProcessError, match="(?s)timed out.*process 0.*process 1"):
    launch(2, [{"kind": "hang", "inner_steps": 1, "norm": "global"}], tmp_path, timeout=6)
  assert time.monotonic() - start < 30


def test_grouped_ascent_across_processes_matches_single_process(tmp_path):
  """Fixed groups spread over 2 processes x 2 devices: the single-device grouped run."""
  cases = [{"kind": "grouped", "inner_steps": k, "norm": norm}
           for k, norm in ((1, "per_tensor"), (2, "global"))]
  results = launch(2, cases, tmp_path)
  assert_matches_reference(results)
  ungrouped, _ = reference(2, "global")
  grouped = results[0]["cases"][1]["params"]
  assert max_abs_diff(grouped, ungrouped) > 100 * ATOL  # the groups do change the run
