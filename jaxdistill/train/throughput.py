"""Throughput accounting: device peaks, model FLOPs utilisation (MFU) and goodput.

MFU = model FLOPs of a step / step time / (peak FLOP/s of one device x devices). The model
FLOPs come from the configs (``models/flops.py``: the student's forward + backward, the
teacher's forward only, the loss head), never from what the compiled program executes, so
recomputation, padding and the masked half of causal attention do not raise it.

Peaks (``PEAKS``): dense (no structured sparsity) tensor-core / MXU FLOP/s per chip from the
vendors' published specifications (Google Cloud TPU system-architecture pages; NVIDIA's A100,
H100, H200 and B200 datasheets, SXM parts unless named; the datasheets' "with sparsity"
figures are twice these). Which column: the student's compute dtype (``peak_dtype``): bf16
(f16 alike), fp8 for a c=fp8 student (the bf16 column where the chip has no fp8 units), and
for float32 compute on an accelerator the bf16 column (float32 matmuls run on the same units
at reduced precision or not at all; MFU then says how far the run is from what the chip can
do). A CPU has no published peak: ``cpu_probe`` measures one by timing a jitted square matmul
(a few hundred ms, once per CPU model, core count and dtype) and caches it in a JSON file.

Goodput (``Goodput``): the share of the training loop's wall time in input wait, compiling,
compute, checkpoint stalls and evaluation (and the rest, ``other``), cumulative from the
loop's start; the shares sum to 1.
"""

import contextlib
import dataclasses
import json
import os
import platform
import re
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip by dtype column (int8: TOP/s). Missing column: no such units.
PEAKS = {
  "TPU v4": {"bf16": 275e12, "int8": 275e12},
  "TPU v5e": {"bf16": 197e12, "int8": 394e12},
  "TPU v5p": {"bf16": 459e12, "int8": 918e12},
  "TPU v6e": {"bf16": 918e12, "int8": 1836e12},
  "A100": {"bf16": 312e12, "int8": 624e12},
  "H100": {"bf16": 989e12, "fp8": 1979e12, "int8": 1979e12},  # SXM
  "H100 PCIe": {"bf16": 756e12, "fp8": 1513e12, "int8": 1513e12},
  "H200": {"bf16": 989e12, "fp8": 1979e12, "int8": 1979e12},  # SXM
  "B200": {"bf16": 2250e12, "fp8": 4500e12, "int8": 4500e12},
}
# jax's device_kind -> PEAKS key, first match wins (TPUs report v5e as "TPU v5 lite", v5p as
# "TPU v5", v6e as "TPU v6 lite"; GPUs their marketing names, e.g. "NVIDIA H100 80GB HBM3").
_KINDS = (
  (r"^TPU v4$", "TPU v4"),
  (r"^TPU v5(e| lite)$", "TPU v5e"),
  (r"^TPU v5p?$", "TPU v5p"),
  (r"^TPU v6(e| lite)$", "TPU v6e"),
  (r"H100.*PCIe", "H100 PCIe"),
  (r"\bH100\b", "H100"),
  (r"\bH200\b", "H200"),
  (r"\bB200\b", "B200"),
  (r"\bA100\b", "A100"),
)
PROBE_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
GOODPUT_PHASES = ("input", "compile", "compute", "checkpoint", "eval")


@dataclasses.dataclass(frozen=True)
class Peak:
  """The peak FLOP/s of one device the MFU is measured against.

  Attributes:
    flops_per_s: dense peak of one device (a CPU: of the whole host, as measured).
    source: where it came from, e.g. "H100 bf16 (table)" or "cpu probe f32 (<cpu model>)".
  """

  flops_per_s: float
  source: str


def chip_of(device_kind: str) -> str | None:
  """The ``PEAKS`` key of a ``jax.Device.device_kind`` (None: not in the table)."""
  for pattern, chip in _KINDS:
    if re.search(pattern, device_kind):
      return chip
  return None


def peak_dtype(compute_dtype, fp8: bool = False) -> str:
  """The peak column of a compute dtype: "fp8" (c=fp8), "bf16" (bfloat16, float16) or "f32".

  Args:
    compute_dtype: the student's compute dtype (``precision.Policy.compute_dtype``).
    fp8: the student's projections run in FP8 (``Policy.fp8``).
  """
  if fp8:
    return "fp8"
  return "f32" if jnp.dtype(compute_dtype) == jnp.float32 else "bf16"


def table_peak(device_kind: str, dtype: str) -> Peak | None:
  """The table's peak of an accelerator for a dtype column (see the module docstring for the
  fallbacks: f32 and a missing fp8 column use bf16, and say so); None for an unknown chip."""
  chip = chip_of(device_kind)
  if chip is None:
    return None
  column = dtype if dtype in PEAKS[chip] else "bf16"
  note = "" if column == dtype else f", {dtype} compute counted against it"
  return Peak(PEAKS[chip][column], f"{chip} {column} (table{note})")


def cpu_model() -> str:
  """This host's CPU model name and usable core count, e.g. "Intel(R) Xeon(R) ... x2"."""
  name = ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{name or platform.processor() or platform.machine()} x{cores}"


def time_matmul(dtype, size: int, budget_s: float) -> float:
  """Best-of FLOP/s of a jitted [size, size] @ [size, size] matmul on the first CPU device."""
  device = jax.devices("cpu")[0]
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device) for k in keys)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()  # compile
  best, repeats, start = float("inf"), 0, time.perf_counter()
  while repeats < 3 or time.perf_counter() - start < budget_s:
    t0 = time.perf_counter()
    matmul(a, b).block_until_ready()
    best, repeats = min(best, time.perf_counter() - t0), repeats + 1
  return 2 * size**3 / best


_PROBED: dict[str, float] = {}  # this process's probes, whatever the cache file


def cpu_probe(dtype: str, cache_path: str | None, size: int = 1024, budget_s: float = 0.15) -> Peak:
  """The host's measured matmul FLOP/s for ``dtype`` ("f32" or "bf16"), cached.

  Read from ``cache_path`` (a JSON file {"<cpu model>|<dtype>": {"flops_per_s", "size",
  "date"}}) when it holds this CPU model and dtype; else measured (``time_matmul``: the
  fastest of repeats over ``budget_s``) and written there (atomically; an unwritable cache
  only costs a probe next time).

  Args:
    dtype: "f32" or "bf16" (an fp8 student's CPU matmuls are probed as bf16).
    cache_path: the JSON file (None: measure, keep in this process only).
    size: the matmul's side.
    budget_s: seconds of repeats.
  Returns:
    Peak(flops_per_s, "cpu probe <dtype> (<cpu model>)").
  """
  dtype = "bf16" if dtype == "fp8" else dtype
  key = f"{cpu_model()}|{dtype}"
  cache = _read_json(cache_path)
  if key not in _PROBED:
    if isinstance(cache.get(key), dict) and cache[key].get("flops_per_s", 0) > 0:
      _PROBED[key] = float(cache[key]["flops_per_s"])
    else:
      _PROBED[key] = time_matmul(PROBE_DTYPES[dtype], size, budget_s)
  if cache_path and cache.get(key, {}).get("flops_per_s") != _PROBED[key]:
    date = time.strftime("%Y-%m-%dT%H:%M:%S")
    cache[key] = {"flops_per_s": _PROBED[key], "size": size, "date": date}
    _write_json(cache_path, cache)
  return Peak(_PROBED[key], f"cpu probe {dtype} ({key.split('|')[0]})")


def _read_json(path: str | None) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, TypeError, ValueError):
    return {}


def _write_json(path: str, data: dict) -> None:
  try:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
  except OSError:
    pass


def device_peak(device: jax.Device, dtype: str, cache_path: str | None) -> Peak | None:
  """The peak of ``device`` for a ``peak_dtype`` column: the table for an accelerator, the
  probe for a CPU (``cache_path``: its JSON cache); None for an accelerator not in the table."""
  if device.platform == "cpu":
    return cpu_probe(dtype, cache_path)
  return table_peak(device.device_kind, dtype)


def mfu(flops: dict[str, float], seconds: float, peak_flops_per_s: float) -> dict[str, float]:
  """MFU of one step, in total and by part.

  Args:
    flops: model FLOPs of the step by part, {"student", "teacher", "loss"} (others ignored).
    seconds: the step's wall time.
    peak_flops_per_s: the peak of all the devices the step runs on.
  Returns:
    {"perf/mfu", "perf/mfu_student", "perf/mfu_teacher", "perf/mfu_loss"}; the parts sum to
    the total.
  """
  parts = {
    f"perf/mfu_{k}": flops[k] / seconds / peak_flops_per_s for k in ("student", "teacher", "loss")
  }
  return {"perf/mfu": sum(parts.values()), **parts}


class Goodput:
  """Wall time of a loop by phase, cumulative from construction.

  ``with goodput.phase("input"): ...`` adds the block's time to a phase (``GOODPUT_PHASES``);
  ``shares()`` divides each by the wall time since construction, the rest being ``other``
  (bookkeeping between phases), so the shares sum to 1. A phase still open counts up to now,
  so a row written from inside ``compute`` sees the loop as it stands.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self.clock, self.start = clock, clock()
    self.spent = dict.fromkeys(GOODPUT_PHASES, 0.0)
    self._open: tuple[str, float] | None = None

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    if name not in self.spent:
      raise ValueError(f"unknown goodput phase {name!r}; known: {GOODPUT_PHASES}")
    if self._open is not None:  # nested: the outer phase keeps counting
      yield
      return
    self._open = (name, self.clock())
    try:
      yield
    finally:
      self.spent[name] += self.clock() - self._open[1]
      self._open = None

  def seconds(self) -> dict[str, float]:
    """Seconds per phase so far, the open one up to now, plus "other" and "wall"."""
    now = self.clock()
    spent = dict(self.spent)
    if self._open is not None:
      spent[self._open[0]] += now - self._open[1]
    wall = now - self.start
    return {**spent, "other": max(wall - sum(spent.values()), 0.0), "wall": wall}

  def shares(self) -> dict[str, float]:
    """{phase: share of the wall time} for every phase and "other"; they sum to 1."""
    seconds = self.seconds()
    del seconds["wall"]
    total = sum(seconds.values()) or 1.0  # the wall time (other is the rest of it)
    return {k: v / total for k, v in seconds.items()}

  def row(self) -> dict[str, float]:
    """The shares as metrics.jsonl keys: {"perf/goodput_<phase>": share} (``perf/`` like every
    timing-dependent value, so comparisons of runs' metrics leave them out)."""
    return {f"perf/goodput_{k}": v for k, v in self.shares().items()}
