"""Start N processes of the CIFAR example on this machine, as one multi-process JAX run.

Each process runs python examples/cifar/train.py with the flags after -- and with
JAX_COORDINATOR_ADDRESS (localhost and a free port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID set, so the processes join one jax.distributed cluster. Process 0's
output is shown as it comes; the other processes' lines are prefixed with [process I].
If a process fails, the others are stopped at once; --timeout stops all of them.

  # 2 processes with 2 CPU devices each: one 4-device mesh (CPU collectives through gloo)
  python examples/cifar/launch_local.py --num-processes 2 --cpu-devices 2 -- --quick
  # 4 processes, one GPU each, on a 4-GPU machine
  python examples/cifar/launch_local.py --num-processes 4 --gpus-per-process 1 -- \
      --data-dir DATA --out-dir runs/x

Stop a run with --stop-after E and continue it with the same command and --resume.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_PY = os.path.join(HERE, "train.py")


class LaunchError(RuntimeError):
  """A process failed or the run timed out; the message holds every process's output."""


@dataclasses.dataclass
class ProcessResult:
  """How one process ended: ``returncode`` (``None`` if killed) and its output."""

  process_id: int
  returncode: int | None
  output: str


def free_port() -> int:
  """A TCP port that was free a moment ago (bound to port 0 and released)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, *,
                cpu_devices: int | None = None, gpus_per_process: int | None = None,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process ``process_id``: the base one plus the JAX_* cluster settings.

  Args:
    process_id, num_processes, port: the cluster (coordinator on ``localhost:port``).
    cpu_devices: run on CPU with this many devices per process (``XLA_FLAGS``).
    gpus_per_process: give process ``i`` GPUs ``i*G .. i*G+G-1`` of those visible.
    base: the environment to extend (default: this process's).
  """
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  if cpu_devices is not None:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  if gpus_per_process is not None:
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(num_processes *
                                                                     gpus_per_process)]
    mine = ids[process_id * gpus_per_process:(process_id + 1) * gpus_per_process]
    if len(mine) < gpus_per_process:
      raise ValueError(f"{num_processes} processes x {gpus_per_process} GPUs, but only "
                       f"{len(ids)} GPUs are visible")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
  return env


def launch(num_processes: int, train_args: Sequence[str], *, cpu_devices: int | None = None,
           gpus_per_process: int | None = None, timeout: float | None = None,
           env: dict[str, str] | None = None, command: Sequence[str] | None = None,
           echo: bool = True) -> list[ProcessResult]:
  """Runs ``num_processes`` processes of the example as one cluster; returns how each ended.

  Args:
    num_processes: how many processes.
    train_args: the example's flags, the same for every process.
    cpu_devices, gpus_per_process: see :func:`process_env`.
    timeout: seconds until all processes are killed (default: none).
    env: the base environment (default: this process's).
    command: what to run instead of ``python examples/cifar/train.py`` (``train_args`` are
      appended).
    echo: print the processes' output as it comes.

  Returns:
    One :class:`ProcessResult` per process, in process order.

  Raises:
    LaunchError: a process exited non-zero (the others are then killed) or the timeout passed;
      the message holds all outputs.
  """
  port = free_port()
  command = list(command or [sys.executable, TRAIN_PY])
  procs, outputs, pumps = [], [], []
  lock = threading.Lock()

  def pump(i, stream, lines):
    for line in stream:
      lines.append(line)
      if echo:
        with lock:
          sys.stdout.write(line if i == 0 else f"[process {i}] {line}")
          sys.stdout.flush()

  try:
    for i in range(num_processes):
      proc_env = process_env(i, num_processes, port, cpu_devices=cpu_devices,
                             gpus_per_process=gpus_per_process, base=env)
      procs.append(subprocess.Popen([*command, *train_args], env=proc_env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
      outputs.append([])
      pumps.append(threading.Thread(target=pump, args=(i, procs[-1].stdout, outputs[-1]),
                                    daemon=True))
      pumps[-1].start()
    deadline = None if timeout is None else time.monotonic() + timeout
    problem = None
    while problem is None:
      codes = [p.poll() for p in procs]
      if all(c == 0 for c in codes):
        break
      bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
      if bad:
        problem = f"process {bad[0]} exited with code {codes[bad[0]]}"
      elif deadline is not None and time.monotonic() > deadline:
        problem = f"timed out after {timeout:.0f} s"
      else:
        time.sleep(0.05)
  finally:  # also on KeyboardInterrupt: no process outlives the launcher
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
    for t in pumps:
      t.join(timeout=10)
  results = [ProcessResult(i, p.returncode, "".join(out))
             for i, (p, out) in enumerate(zip(procs, outputs, strict=True))]
  if problem is not None:
    shown = "\n".join(f"----- process {r.process_id} (exit code {r.returncode}) -----\n"
                      f"{r.output}" for r in results)
    raise LaunchError(f"{num_processes}-process run {problem}\n{shown}")
  return results


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (0, or the first failure's)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  train_args = []
  if "--" in argv:
    train_args = argv[argv.index("--") + 1:]
    argv = argv[:argv.index("--")]
  p = argparse.ArgumentParser(
      prog="python examples/cifar/launch_local.py", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      usage="%(prog)s --num-processes N [options] -- TRAIN_FLAGS...")
  p.add_argument("--num-processes", "-n", type=int, required=True)
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="run on CPU, with this many (fake) devices per process")
  p.add_argument("--gpus-per-process", type=int, default=None,
                 help="give each process this many of the visible GPUs (CUDA_VISIBLE_DEVICES)")
  p.add_argument("--timeout", type=float, default=None,
                 help="kill all processes after this many seconds")
  args = p.parse_args(argv)
  try:
    launch(args.num_processes, train_args, cpu_devices=args.cpu_devices,
           gpus_per_process=args.gpus_per_process, timeout=args.timeout, echo=True)
  except LaunchError as e:
    first = str(e).splitlines()[0]
    print(f"error: {first} (the others were stopped)", file=sys.stderr)
    match = re.search(r"exited with code (-?\d+)", first)
    return int(match.group(1)) if match else 124
  return 0


if __name__ == "__main__":
  sys.exit(main())
