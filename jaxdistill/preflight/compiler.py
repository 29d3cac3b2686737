"""Compile the real distill step for a target the host does not have, and read what it costs.

``compile_for(cfg, topology)`` builds the run abstractly (``run.build_run(abstract=True)``:
shapes and shardings only, nothing allocated or loaded), lowers its one jitted step over the
target's devices and compiles it: for a TPU topology with libtpu (ahead of time, on this CPU),
for a GPU cluster or ``cpu`` with this host's CPU backend over as many (fake) devices (GPU
numbers are then estimates: XLA:CPU's memory plan and collectives stand in for XLA:GPU's).
The compiled program's ``memory_analysis()``, ``cost_analysis()`` and optimised HLO
(``hlo.collectives``) fill a ``roofline.Report``. A program the TPU compiler cannot fit
(RESOURCE_EXHAUSTED) is a "does not fit" verdict with the compiler's numbers, not an error.
"""

import contextlib
import copy
import re
import time
import warnings
from typing import Any

from jaxdistill.errors import JaxdistillError
from jaxdistill.preflight import chips as chips_lib
from jaxdistill.preflight import hlo
from jaxdistill.preflight import roofline
from jaxdistill.preflight import tpu_env

_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def devices_for(topology: chips_lib.Topology) -> list:
  """The (abstract, for TPUs) devices of ``topology``.

  Raises:
    JaxdistillError: libtpu is not installed (TPU), or this process has fewer CPU devices than
      a GPU cluster or ``cpu`` needs (set XLA_FLAGS=--xla_force_host_platform_device_count=N
      before JAX starts; ``jaxdistill compile`` does).
  """
  import jax

  if topology.chip.platform == "tpu":
    try:
      import libtpu  # noqa: F401
    except ImportError:
      raise JaxdistillError(
        f"compiling for {topology.name!r} needs libtpu: pip install 'jaxdistill[tpu]'"
      ) from None
    from jax.experimental import topologies

    # libtpu describes hosts of 2x2x1 chips; a smaller slice is one smaller host.
    grid3 = tuple(topology.grid) + (1,) * (3 - len(topology.grid))
    host = [min(g, d) for g, d in zip(grid3, (2, 2, 1))]
    extra = {} if host == [2, 2, 1] else {"chips_per_host_bounds": host}
    try:
      with tpu_env.prepared():  # libtpu's settings on a host without TPUs, while it starts
        desc = topologies.get_topology_desc(
          platform="tpu", topology_name=topology.tpu_name, **extra
        )
    except jax.errors.JaxRuntimeError as e:
      raise JaxdistillError(
        f"libtpu cannot describe topology {topology.name!r} ({topology.tpu_name}): "
        f"{str(e).splitlines()[0][:200]}"
      ) from None
    return list(desc.devices)
  cpus = jax.devices("cpu")
  want = topology.num_chips
  if len(cpus) < want:
    raise JaxdistillError(
      f"{topology.name!r} needs {want} devices but this process has {len(cpus)} CPU devices; "
      f"start it with XLA_FLAGS=--xla_force_host_platform_device_count={want}"
    )
  return cpus[:want]


def host_topology(num_devices: int | None = None) -> chips_lib.Topology:
  """This host's CPU devices (all, or the first ``num_devices``) as a ``Topology`` whose chip
  holds this host's measured peaks (``probe.host_chip``)."""
  import jax

  from jaxdistill.preflight import probe

  n = len(jax.devices("cpu")) if num_devices is None else num_devices
  return chips_lib.Topology(probe.host_chip(), n, (), "cpu")


def abstract_batch(cfg: Any, mesh) -> dict:
  """The step's global batch as ``jax.ShapeDtypeStruct``s in their shardings: the shapes one
  batch of the run's own data iterator has (built for one process; only its first batch's
  shapes are read), sharded like ``sharding.shard_batch``."""
  import jax

  from jaxdistill import data as data_lib
  from jaxdistill.parallel import sharding as sharding_lib

  it = data_lib.make_iterator(cfg, "train", process_index=0, process_count=1)
  batch = next(iter(it))
  spec = sharding_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=spec) for k, v in batch.items()}


def with_mesh(cfg: Any, mesh: tuple[int, int, int] | None) -> Any:
  """``cfg`` with its mesh section set to (data, fsdp, tensor) when given (a copy)."""
  if mesh is None:
    return cfg
  cfg = copy.deepcopy(cfg)
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return cfg


def compile_for(
  cfg: Any,
  topology: chips_lib.Topology,
  mesh: tuple[int, int, int] | None = None,
  devices: list | None = None,
) -> roofline.Report:
  """Compiles ``cfg``'s distill step for ``topology`` and reports on it.

  Args:
    cfg: a validated config (any size: nothing is allocated).
    topology: what to compile for (``chips.parse_topology``).
    mesh: (data, fsdp, tensor) instead of the config's mesh section.
    devices: the devices to use (default ``devices_for(topology)``).
  Returns:
    The report, roofline filled; ``fits`` False with ``error`` set when the compiler ran out
    of device memory.
  Raises:
    ConfigError: a mesh that does not divide the devices, a shape that does not split over
      its mesh axis (the run's own checks).
  """

  from jaxdistill.parallel import sharding as sharding_lib
  from jaxdistill.train import run as run_lib

  cfg = with_mesh(cfg, mesh)
  devices = devices_for(topology) if devices is None else devices
  run = run_lib.build_run(cfg, devices=devices, abstract=True)
  batch = abstract_batch(cfg, run.mesh)
  chip = topology.chip
  flops = run.flops.total
  report = new_report("step", topology, run.mesh, cfg.data.batch_size * cfg.data.seq_len, flops)
  report.hardware_flops = flops + recomputed_flops(cfg, run.flops)
  with sharding_lib.rules_context(run.mesh), no_persistent_cache(chip.platform != "cpu"):
    compile_into(report, run.step_fn.lower(run.state, run.teacher_vars, batch))
  return roofline.fill_roofline(report, chip)


def new_report(
  what: str, topology: chips_lib.Topology, mesh: Any, tokens: int, model_flops: float
) -> roofline.Report:
  """An empty report of ``what`` (step, prefill, decode, precompute) on ``topology`` over
  ``mesh``: ``tokens`` per run of the program, ``model_flops`` (all devices; the hardware
  count starts equal to it)."""
  chip = topology.chip
  return roofline.Report(
    what=what,
    topology=topology.name,
    chip=chip.name,
    platform=chip.platform,
    num_devices=mesh.size,
    mesh=dict(mesh.shape),
    estimate=not topology.can_compile and chip.platform != "cpu",
    hbm_bytes=chip.hbm_bytes,
    model_flops=model_flops,
    hardware_flops=model_flops,
    tokens_per_step=int(tokens),
    collectives=roofline.empty_collectives(),
  )


def compile_into(report: roofline.Report, lowered: Any) -> Any:
  """``lowered.compile()`` read into ``report`` (``read_compiled``); None, with the verdict
  and the compiler's numbers (``out_of_memory``), when the target's memory cannot hold it."""
  import jax

  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    report.compile_s = time.perf_counter() - start
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    out_of_memory(report, str(e))
    return None
  report.compile_s = time.perf_counter() - start
  read_compiled(report, compiled)
  return compiled


@contextlib.contextmanager
def no_persistent_cache(off: bool):
  """JAX's persistent compilation cache off while compiling for another platform: its
  executables cannot be loaded back here (no TPU client), so writing them only costs time."""
  import jax

  before = jax.config.jax_enable_compilation_cache
  if off:
    jax.config.update("jax_enable_compilation_cache", False)
  try:
    with warnings.catch_warnings():  # a cache set up earlier in the process may still be read
      warnings.filterwarnings("ignore", "Error reading persistent compilation cache")
      yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)


def read_compiled(report: roofline.Report, compiled: Any) -> None:
  """Fills memory, XLA cost and collectives of ``report`` from a compiled program."""
  mem = compiled.memory_analysis()
  if mem is not None:
    report.argument_bytes = float(mem.argument_size_in_bytes)
    report.output_bytes = float(mem.output_size_in_bytes)
    report.alias_bytes = float(mem.alias_size_in_bytes)
    report.temp_bytes = float(mem.temp_size_in_bytes)
    report.code_bytes = float(mem.generated_code_size_in_bytes)
    report.fits = report.total_bytes <= report.hbm_bytes
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  report.xla_flops = float(cost.get("flops", 0.0))
  report.xla_bytes = float(cost.get("bytes accessed", 0.0))
  text = compiled.as_text()
  report.collectives = hlo.collectives(text, report.num_devices)
  report.loops = max(hlo.loop_trips(text), default=0) > 1
  report.hlo_bytes = hlo.hbm_bytes(text)


def recomputed_flops(cfg: Any, flops: Any) -> float:
  """FLOPs a remat policy adds: ``full`` recomputes the student's forward in the backward
  pass (a third of its forward + backward); ``dots`` saves the matmul outputs, so only
  elementwise work (not counted) reruns; a teacher runs forward only and is never remat'd."""
  return flops.student / 3 if cfg.student.remat == "full" else 0.0


def out_of_memory(report: roofline.Report, message: str) -> roofline.Report:
  """The report of a program the compiler could not fit: its numbers from the message, e.g.
  'HLO temporaries (22.27G) exceeds available HBM (15.75G)' or 'Used 15.76G of 15.75G hbm'."""
  report.fits = False
  first = next((ln for ln in message.splitlines() if "RESOURCE_EXHAUSTED" in ln), message)
  report.error = re.sub(r"\s+", " ", first.split("RESOURCE_EXHAUSTED:", 1)[-1]).strip()[:300]
  m = re.search(r"temporaries \(" + _SIZE + r"\)", message)
  if m:
    report.temp_bytes = float(m.group(1)) * _UNITS[m.group(2)]
  m = re.search(r"available HBM \(" + _SIZE + r"\)", message)
  if m:
    report.hbm_bytes = float(m.group(1)) * _UNITS[m.group(2)]
  m = re.search(r"Used " + _SIZE + r" of " + _SIZE + r" hbm", message)
  if m:  # "Used 15.76G of 15.75G hbm": the compiler's total, counted here as temporaries
    report.temp_bytes = float(m.group(1)) * _UNITS[m.group(2)]
    report.hbm_bytes = float(m.group(3)) * _UNITS[m.group(4)]
  m = re.search(r"arguments? \(" + _SIZE + r"\)", message)
  if m:
    report.argument_bytes = float(m.group(1)) * _UNITS[m.group(2)]
  return report
