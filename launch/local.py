"""Starts N processes of one command as a ``jax.distributed`` job on this machine.

  python launch/local.py --processes 2 --devices-per-process 4 -- \\
      jaxdistill train --config configs/smoke.py --workdir /tmp/run2

Each process gets the coordinator (a free local port), the process count and
its id through the environment jaxdistill reads (``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; see jaxdistill/parallel/distributed.py), and
its devices: ``--platform cpu`` (default) gives it k fake CPU devices, which is
how multi-host runs are tested on one machine; ``--platform gpu`` gives it k
local GPUs (``JAX_LOCAL_DEVICE_IDS``). Output lines are prefixed ``[pI]``.

If a process fails, the launcher stops the rest at once (SIGTERM, then SIGKILL
after ``--grace`` seconds) and exits with the failed process's status, naming
it. That matters: JAX gives the survivors no error, they would only abort after
the heartbeat timeout. ``--timeout`` bounds the whole job.

Several machines without a scheduler: run this on every node with
``--num-nodes M --node-rank R --coordinator HOST:PORT`` (launch/multinode_gpu.sh
does it over ssh). ``--dry-run`` prints each process's environment and command.

As a library (tests): ``run(command, processes=2, devices_per_process=4)``
returns the exit status.
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port that is free on this machine right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def worker_env(
  base: Mapping[str, str],
  *,
  process_id: int,
  num_processes: int,
  coordinator: str,
  devices_per_process: int,
  local_rank: int,
  platform: str = "cpu",
  init_timeout: int | None = None,
  heartbeat_timeout: int | None = None,
) -> dict[str, str]:
  """The environment of one process: ``base`` plus what JAX and jaxdistill need.

  For ``cpu`` an inherited device-count XLA flag is replaced (tests/conftest.py
  sets 8 for the test process; each worker must see exactly its own count).
  """
  env = dict(base)
  env.update(
    JAX_COORDINATOR_ADDRESS=coordinator,
    JAX_NUM_PROCESSES=str(num_processes),
    JAX_PROCESS_ID=str(process_id),
    PYTHONUNBUFFERED="1",  # lines reach the prefixer as they are printed
  )
  k = devices_per_process
  if platform == "cpu":
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={k}"])
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(k))
  elif platform == "gpu":
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(local_rank * k + j) for j in range(k))
  else:
    raise ValueError(f"platform must be cpu or gpu, got {platform!r}")
  if init_timeout is not None:
    env["JAXDISTILL_INIT_TIMEOUT"] = str(init_timeout)
  if heartbeat_timeout is not None:
    env["JAXDISTILL_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
  return env


def process_envs(
  base: Mapping[str, str],
  processes: int,
  devices_per_process: int,
  *,
  platform: str = "cpu",
  coordinator: str,
  num_nodes: int = 1,
  node_rank: int = 0,
  init_timeout: int | None = None,
  heartbeat_timeout: int | None = None,
) -> list[tuple[int, dict[str, str]]]:
  """(process id, environment) of each process this node starts."""
  return [
    (
      node_rank * processes + rank,
      worker_env(
        base,
        process_id=node_rank * processes + rank,
        num_processes=num_nodes * processes,
        coordinator=coordinator,
        devices_per_process=devices_per_process,
        local_rank=rank,
        platform=platform,
        init_timeout=init_timeout,
        heartbeat_timeout=heartbeat_timeout,
      ),
    )
    for rank in range(processes)
  ]


def _pump(stream, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  # Text mode turns progress-bar carriage returns into line ends, so each
  # update becomes its own prefixed line instead of garbling another process's.
  for line in stream:
    with lock:
      out.write(prefix + (line if line.endswith("\n") else line + "\n"))
      out.flush()
  stream.close()


def _status(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"killed by signal {-returncode}"
  return f"exit status {returncode}"


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to every live process group, then SIGKILL to those left after ``grace_s``."""
  for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
    live = [p for p in procs if p.poll() is None]
    for p in live:
      try:
        os.killpg(p.pid, sig)  # the group: also whatever the command started
      except ProcessLookupError:
        pass
    deadline = time.monotonic() + wait_s
    while any(p.poll() is None for p in live) and time.monotonic() < deadline:
      time.sleep(0.05)


class _Interrupted(Exception):
  pass


def _raise_interrupted(signum, frame):
  raise _Interrupted()


def run(
  command: Sequence[str],
  processes: int,
  devices_per_process: int = 1,
  *,
  platform: str = "cpu",
  coordinator: str | None = None,
  num_nodes: int = 1,
  node_rank: int = 0,
  env: Mapping[str, str] | None = None,
  grace_s: float = 5.0,
  timeout_s: float | None = None,
  init_timeout: int | None = None,
  heartbeat_timeout: int | None = None,
  out: TextIO | None = None,
) -> int:
  """Runs ``command`` as ``processes`` local processes of one JAX job.

  Args:
    command: argv of each process (the same for all).
    processes: processes on this node; the job has ``num_nodes * processes``.
    devices_per_process: fake CPU devices (cpu) or GPUs (gpu) per process.
    platform: ``cpu`` or ``gpu``.
    coordinator: HOST:PORT of process 0; default localhost on a free port
      (required when ``num_nodes > 1``).
    num_nodes, node_rank: this node's place in a multi-node job.
    env: base environment (default ``os.environ``).
    grace_s: seconds between SIGTERM and SIGKILL when stopping processes.
    timeout_s: stop everything and fail after this many seconds (None: never).
    init_timeout, heartbeat_timeout: passed to jax.distributed (seconds).
    out: where prefixed output goes (default stdout).

  Returns:
    0 when every process exits 0; else the first failure's exit status
    (128 + signal number for a signal; 124 on timeout).
  """
  out = out or sys.stdout
  if num_nodes > 1 and not coordinator:
    raise ValueError("a multi-node job needs coordinator=HOST:PORT (node 0's address)")
  coordinator = coordinator or f"localhost:{free_port()}"
  total, lock, procs, pumps = num_nodes * processes, threading.Lock(), [], []

  def say(msg: str) -> None:
    with lock:
      out.write(f"launch: {msg}\n")
      out.flush()

  # SIGTERM (a scheduler stopping the job) or SIGHUP (a lost ssh session) to the
  # launcher stops the processes too.
  handled = (signal.SIGTERM, signal.SIGHUP)
  main_thread = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, _raise_interrupted) for s in handled} if main_thread else {}
  try:
    for pid, child_env in process_envs(
      os.environ if env is None else env,
      processes,
      devices_per_process,
      platform=platform,
      coordinator=coordinator,
      num_nodes=num_nodes,
      node_rank=node_rank,
      init_timeout=init_timeout,
      heartbeat_timeout=heartbeat_timeout,
    ):
      p = subprocess.Popen(
        list(command),
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # own process group, so _stop reaches its children
      )
      procs.append(p)
      prefix = f"[p{pid}] "
      pumps.append(threading.Thread(target=_pump, args=(p.stdout, prefix, out, lock), daemon=True))
      pumps[-1].start()
    say(f"started {processes} of {total} processes (coordinator {coordinator})")
    return _watch(procs, node_rank * processes, grace_s, timeout_s, say)
  except (KeyboardInterrupt, _Interrupted):
    say("interrupted; stopping all processes")
    _stop(procs, grace_s)
    return 130
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    _stop(procs, grace_s)
    for t in pumps:
      t.join(timeout=2.0)


def _watch(procs, first_id: int, grace_s: float, timeout_s: float | None, say) -> int:
  """Waits for all processes; on the first failure stops the rest and reports it."""
  deadline = None if timeout_s is None else time.monotonic() + timeout_s
  while True:
    codes = [p.poll() for p in procs]
    for i, code in enumerate(codes):
      if code not in (None, 0):
        others = sum(c is None for c in codes)
        say(
          f"process {first_id + i} (pid {procs[i].pid}) failed with {_status(code)}; "
          f"stopping the {others} still running"
        )
        _stop(procs, grace_s)
        return code if code > 0 else 128 - code
    if all(c == 0 for c in codes):
      say(f"all {len(procs)} processes finished")
      return 0
    if deadline is not None and time.monotonic() > deadline:
      running = [first_id + i for i, c in enumerate(codes) if c is None]
      say(f"timeout after {timeout_s:g} s; processes {running} still running; stopping them")
      _stop(procs, grace_s)
      return 124
    time.sleep(0.1)


def dry_run_lines(command: Sequence[str], args: argparse.Namespace) -> list[str]:
  """The commands ``main`` would run, one line per process (env assignments first)."""
  envs = process_envs(
    {},
    args.processes,
    args.devices_per_process,
    platform=args.platform,
    coordinator=args.coordinator or "localhost:PORT",
    num_nodes=args.num_nodes,
    node_rank=args.node_rank,
    init_timeout=args.init_timeout,
    heartbeat_timeout=args.heartbeat_timeout,
  )
  return [
    "env "
    + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    + f" {shlex.join(command)}"
    for _, env in envs
  ]


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: launch/local.py [options] -- COMMAND [ARGS...]  (see --help)", file=sys.stderr)
    if "-h" not in argv and "--help" not in argv:
      return 2
  split = argv.index("--") if "--" in argv else len(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, required=True, help="processes on this node")
  parser.add_argument("--devices-per-process", type=int, default=1)
  parser.add_argument("--platform", choices=["cpu", "gpu"], default="cpu")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (default: a free local port)")
  parser.add_argument("--num-nodes", type=int, default=1)
  parser.add_argument("--node-rank", type=int, default=0)
  parser.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL")
  parser.add_argument("--timeout", type=float, help="fail after this many seconds")
  parser.add_argument("--init-timeout", type=int, help="jax.distributed connect timeout (s)")
  parser.add_argument("--heartbeat-timeout", type=int, help="jax.distributed heartbeat (s)")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1 :]
  if not command or args.processes < 1 or not 0 <= args.node_rank < args.num_nodes:
    parser.error("need a command after --, --processes >= 1 and 0 <= --node-rank < --num-nodes")
  if args.num_nodes > 1 and not args.coordinator:
    parser.error("--num-nodes > 1 needs --coordinator HOST:PORT (node 0's address)")
  if args.dry_run:
    print("\n".join(dry_run_lines(command, args)))
    return 0
  return run(
    command,
    args.processes,
    args.devices_per_process,
    platform=args.platform,
    coordinator=args.coordinator,
    num_nodes=args.num_nodes,
    node_rank=args.node_rank,
    grace_s=args.grace,
    timeout_s=args.timeout,
    init_timeout=args.init_timeout,
    heartbeat_timeout=args.heartbeat_timeout,
  )


if __name__ == "__main__":
  sys.exit(main())
