"""Starting JAX's multi-controller runtime the same way everywhere.

Every process of a multi-host job runs the same program; ``jax.distributed``
connects them through a coordinator (process 0) before any other JAX call, so
``jax.devices()`` lists the devices of all hosts. Where the settings come from,
first match wins per setting:

  1. flags         ``--coordinator_address``, ``--num_processes``, ``--process_id``
  2. environment   ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
                   (``launch/local.py`` and ``launch/multinode_gpu.sh`` set these)
  3. the cluster   SLURM (inside ``srun``), Open MPI (``mpirun``), Cloud TPU VMs:
                   JAX reads the cluster's own environment or metadata
  4. nothing       a single process; ``jax.distributed`` is not started

``--cluster NAME`` forces one detection method (``none`` turns it off).
Timeouts (seconds) come from ``--init_timeout`` / ``--heartbeat_timeout`` /
``--shutdown_timeout`` or ``JAXDISTILL_INIT_TIMEOUT`` /
``JAXDISTILL_HEARTBEAT_TIMEOUT`` / ``JAXDISTILL_SHUTDOWN_TIMEOUT``. When a
process dies the others get no exception: JAX aborts them once the heartbeat
timeout passes, so a launcher should kill the rest itself (launch/local.py does).

The rest of jaxdistill keeps multi-process runs consistent: metrics, configs and
summaries are written by process 0 only, the progress bar shows on process 0,
and every process makes the same Orbax calls in the same order. SIGTERM to any
process stops all of them at the same step (JAX's preemption sync point, which
loop.py leaves SIGTERM to when there are several processes), where they save.
"""

import argparse
import dataclasses
import glob
import importlib.util
import logging
import os
import sys
import warnings
from typing import Any, Mapping

from jaxdistill.errors import JaxdistillError

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_TIMEOUTS = {
  "init_timeout": "JAXDISTILL_INIT_TIMEOUT",
  "heartbeat_timeout": "JAXDISTILL_HEARTBEAT_TIMEOUT",
  "shutdown_timeout": "JAXDISTILL_SHUTDOWN_TIMEOUT",
}
DEFAULT_TIMEOUTS = {"init_timeout": 300, "heartbeat_timeout": 100, "shutdown_timeout": 300}
# Our names -> jax.distributed's cluster_detection_method names.
CLUSTERS = {"slurm": "slurm", "ompi": "ompi", "mpi4py": "mpi4py", "tpu": None}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How (and whether) to start ``jax.distributed`` in this process.

  ``source`` is ``none`` (single process), ``explicit`` (flags / env) or a
  cluster name (``slurm``, ``ompi``, ``mpi4py``, ``tpu``); unset fields are
  filled in by JAX from the cluster.
  """

  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  init_timeout: int = DEFAULT_TIMEOUTS["init_timeout"]
  heartbeat_timeout: int = DEFAULT_TIMEOUTS["heartbeat_timeout"]
  shutdown_timeout: int = DEFAULT_TIMEOUTS["shutdown_timeout"]

  def describe(self) -> str:
    if self.source == "none":
      return "single process"
    if self.source == "explicit":
      return (
        f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator_address}"
      )
    return f"settings from the {self.source} cluster"


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds the multi-process flags to a subcommand that runs JAX."""
  g = parser.add_argument_group("multi-process (see jaxdistill/parallel/distributed.py)")
  g.add_argument("--coordinator_address", help=f"HOST:PORT of process 0 (env {ENV_ADDRESS})")
  g.add_argument(
    "--num_processes", type=int, help=f"processes in the job (env {ENV_NUM_PROCESSES})"
  )
  g.add_argument("--process_id", type=int, help=f"this process's index (env {ENV_PROCESS_ID})")
  g.add_argument(
    "--cluster",
    default="auto",
    choices=["auto", "none", *CLUSTERS],
    help="cluster auto-detection: auto (default), none (off) or force one method",
  )
  for name, env in ENV_TIMEOUTS.items():
    g.add_argument(
      f"--{name}", type=int, help=f"seconds (env {env}; default {DEFAULT_TIMEOUTS[name]})"
    )


def _int(value: Any, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise JaxdistillError(f"{name} must be an integer, got {value!r}") from None


def _setting(flag_value: Any, flag: str, environ: Mapping[str, str], env: str) -> int | None:
  """An int setting: the flag's value if given, else the environment's."""
  value = _int(flag_value, flag)
  return _int(environ.get(env), env) if value is None else value


def _tpu_vm_present(environ: Mapping[str, str]) -> bool:
  """A Cloud TPU VM (GCE or GKE): libtpu installed and TPU chips attached."""
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(environ.get("TPU_WORKER_HOSTNAMES") or glob.glob("/dev/accel*")) or bool(
    glob.glob("/dev/vfio/[0-9]*")
  )


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """The cluster this process runs in, judged from its environment only.

  SLURM counts only inside an ``srun`` step of more than one task (a batch
  script's own shell is not one of the job's processes); Open MPI only under
  ``mpirun`` with more than one rank.

  Returns:
    ``slurm``, ``ompi``, ``mpi4py``, ``tpu`` or None.
  """
  if "SLURM_STEP_NODELIST" in environ and "SLURM_PROCID" in environ:
    return "slurm" if (_int(environ.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1 else None
  if "OMPI_COMM_WORLD_SIZE" in environ:
    if (_int(environ["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE") or 1) <= 1:
      return None
    # Open MPI 5 (PMIx) no longer exports the ORTE URI JAX's own detection reads.
    return "ompi" if "OMPI_MCA_orte_hnp_uri" in environ else "mpi4py"
  if _tpu_vm_present(environ):
    return "tpu"
  return None


def resolve(args: Any = None, environ: Mapping[str, str] | None = None) -> Plan:
  """Decides how to start ``jax.distributed`` from flags, environment and cluster.

  Args:
    args: namespace with the attributes ``add_flags`` defines (missing ones
      count as unset); None for none.
    environ: the environment (default ``os.environ``).

  Returns:
    The Plan. Pure: starts nothing.

  Raises:
    JaxdistillError: inconsistent or incomplete settings, naming the flag and
      its environment variable.
  """
  environ = os.environ if environ is None else environ
  flag = lambda name: getattr(args, name, None) if args is not None else None
  address = flag("coordinator_address") or environ.get(ENV_ADDRESS) or None
  num = _setting(flag("num_processes"), "--num_processes", environ, ENV_NUM_PROCESSES)
  pid = _setting(flag("process_id"), "--process_id", environ, ENV_PROCESS_ID)
  timeouts = {}
  for name, env in ENV_TIMEOUTS.items():
    value = _setting(flag(name), f"--{name}", environ, env)
    if value is not None and value <= 0:
      raise JaxdistillError(f"--{name} ({env}) must be a positive number of seconds, got {value}")
    timeouts[name] = DEFAULT_TIMEOUTS[name] if value is None else value
  if num is not None and num < 1:
    raise JaxdistillError(f"--num_processes ({ENV_NUM_PROCESSES}) must be >= 1, got {num}")
  if pid is not None and num is not None and not 0 <= pid < num:
    raise JaxdistillError(
      f"--process_id ({ENV_PROCESS_ID}) must be in [0, {num}) for {num} processes, got {pid}"
    )

  cluster = flag("cluster") or "auto"
  detected = None if cluster == "none" else (cluster if cluster != "auto" else None)
  if detected is None and cluster == "auto" and None in (address, num, pid):
    detected = detect_cluster(environ)
  if detected == "mpi4py" and importlib.util.find_spec("mpi4py") is None:
    raise JaxdistillError(
      "this MPI job does not export OMPI_MCA_orte_hnp_uri (Open MPI 5?), so JAX needs mpi4py "
      "to find its peers: pip install mpi4py, or pass --coordinator_address, --num_processes "
      "and --process_id"
    )
  if detected is not None:
    return Plan(detected, address, num, pid, **timeouts)
  if address is None and num in (None, 1) and pid in (None, 0):
    return Plan("none", **timeouts)
  missing = [
    f"{flag_name} (env {env})"
    for flag_name, env, value in (
      ("--coordinator_address", ENV_ADDRESS, address),
      ("--num_processes", ENV_NUM_PROCESSES, num),
      ("--process_id", ENV_PROCESS_ID, pid),
    )
    if value is None
  ]
  if missing:
    raise JaxdistillError(
      "multi-process settings are incomplete and no cluster was detected: set "
      + ", ".join(missing)
      + " (or run under srun / mpirun / on a Cloud TPU VM)"
    )
  return Plan("explicit", address, num, pid, **timeouts)


def initialize(plan: Plan) -> None:
  """Starts ``jax.distributed`` per ``plan``; call before any other JAX call.

  Does nothing for a single process or when already started (so library
  callers and tests may call it again).

  Raises:
    JaxdistillError: the coordinator could not be reached in time.
  """
  import jax  # only here: importing this module must not start JAX

  if plan.source == "none" or jax.distributed.is_initialized():
    return
  method = "deactivate" if plan.source == "explicit" else CLUSTERS.get(plan.source)
  # A coordinator that never answers aborts the process from C++ after
  # init_timeout (no Python exception), so say first what is being waited for.
  print(
    f"jax.distributed: connecting as {plan.describe()}, timeout {plan.init_timeout} s",
    file=sys.stderr,
    flush=True,
  )
  try:
    jax.distributed.initialize(
      coordinator_address=plan.coordinator_address,
      num_processes=plan.num_processes,
      process_id=plan.process_id,
      cluster_detection_method=method,
      initialization_timeout=plan.init_timeout,
      heartbeat_timeout_seconds=plan.heartbeat_timeout,
      shutdown_timeout_seconds=plan.shutdown_timeout,
    )
  except (RuntimeError, ValueError) as e:  # XlaRuntimeError is a RuntimeError
    raise JaxdistillError(
      f"could not start jax.distributed as {plan.describe()}: {str(e).splitlines()[0]}; "
      "check that every process got the same --coordinator_address and --num_processes, "
      "distinct --process_id values, and that process 0 is running and reachable"
    ) from e


def initialize_from_args(args: Any = None, environ: Mapping[str, str] | None = None) -> Plan:
  """``resolve`` then ``initialize``; returns the plan used."""
  plan = resolve(args, environ)
  initialize(plan)
  return plan


def is_primary() -> bool:
  """True on the process that logs and writes files (process 0)."""
  import jax

  return jax.process_index() == 0


def quiet_unless_primary() -> None:
  """Silences Python warnings and INFO/WARNING log records on processes other
  than 0, so a job's log says each thing once; errors still show everywhere."""
  if not is_primary():
    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)


def summary_line(plan: Plan) -> str:
  """One line for the log: processes, devices, where the settings came from."""
  import jax

  return (
    f"jax.distributed: {jax.process_count()} process(es), {jax.device_count()} devices "
    f"({jax.local_device_count()} local, {jax.default_backend()}); {plan.describe()}"
  )


def barrier(name: str) -> None:
  """Waits until every process reaches ``barrier(name)``; free for one process.

  For file-system steps that must be ordered across processes (process 0
  deletes or creates, the others then look).
  """
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
