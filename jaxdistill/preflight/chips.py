"""Accelerator chips and pod topologies: peak figures and the names users type.

A *topology* names what ``jaxdistill compile`` compiles for: a Cloud TPU slice name
(``v5p-128``, ``v5e-64``, ``v6e-256``, ``v4-32``), a chip grid (``v5e:2x2``, ``v5p:4x4x4``),
or a GPU cluster (``h100:8``, ``h200:16``: GPUs, estimated only) or ``cpu`` (this host).
Slice names count TensorCores on v4 and v5p (two per chip: ``v5p-128`` is 64 chips, 4x4x4)
and chips on v5e and v6e.

Peak figures are the vendors' published numbers (Cloud TPU system-architecture pages, NVIDIA
H100/H200 datasheets): bf16 dense matmul FLOP/s (``train.throughput.PEAKS``, which the
training loop's MFU reads too), HBM capacity and bandwidth per chip, and the
inter-chip bandwidth one chip can drive (ICI for TPUs, NVLink for GPUs), bidirectional. Check a
figure there before a decision depends on it; ``docs/preflight.md`` lists them.
"""

import dataclasses
import math
import re

from jaxdistill.errors import JaxdistillError
from jaxdistill.train.throughput import PEAKS

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Peak figures of one accelerator chip.

  Attributes:
    name: short name (v5e, v5p, v6e, v4, h100, h200, cpu).
    platform: the JAX platform that compiles for it ("tpu", "gpu", "cpu").
    peak_flops: bf16 dense matmul FLOP/s per chip.
    hbm_bytes: usable device memory per chip (what XLA's fit check compares against is
      reported by the compiler itself; this is the datasheet capacity).
    hbm_bw: HBM bandwidth per chip, bytes/s.
    ici_bw: inter-chip bandwidth per chip, bytes/s, bidirectional (all links together).
    cores_per_chip: TensorCores a slice name counts per chip (2 on v4/v5p, else 1).
    dims: grid rank of its topologies (3 for v4/v5p tori, 2 for v5e/v6e, 1 for GPUs).
  """

  name: str
  platform: str
  peak_flops: float
  hbm_bytes: float
  hbm_bw: float
  ici_bw: float
  cores_per_chip: int = 1
  dims: int = 2


def _peak(kind: str) -> float:
  return PEAKS[kind]["bf16"]  # one home for peak FLOP/s: the throughput metrics' table


CHIPS = {
  "v4": Chip("v4", "tpu", _peak("TPU v4"), 32 * GIB, 1.2e12, 300e9, 2, 3),
  "v5e": Chip("v5e", "tpu", _peak("TPU v5e"), 16e9, 819e9, 400e9, 1, 2),
  "v5p": Chip("v5p", "tpu", _peak("TPU v5p"), 95e9, 2765e9, 600e9, 2, 3),  # 4,800 Gbps ICI
  "v6e": Chip("v6e", "tpu", _peak("TPU v6e"), 32e9, 1638e9, 800e9, 1, 2),
  "h100": Chip("h100", "gpu", _peak("H100"), 80e9, 3.35e12, 900e9, 1, 1),
  "h200": Chip("h200", "gpu", _peak("H200"), 141e9, 4.8e12, 900e9, 1, 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  """What to compile for.

  Attributes:
    chip: its chip.
    num_chips: devices of the mesh (chips; GPUs).
    grid: the chip grid (e.g. (4, 4, 4)); () for GPU clusters and the CPU.
    name: as the user wrote it.
  """

  chip: Chip
  num_chips: int
  grid: tuple[int, ...]
  name: str

  @property
  def tpu_name(self) -> str:
    """The name ``jax.experimental.topologies.get_topology_desc`` takes (e.g. 'v5p:4x4x4')."""
    return f"{self.chip.name}:{'x'.join(map(str, self.grid))}"

  @property
  def can_compile(self) -> bool:
    """True where an ahead-of-time compile exists here (TPUs via libtpu); GPU reports are
    estimates from a compile for the host's own backend."""
    return self.chip.platform == "tpu"


def _grid_for(chip: Chip, chips: int, name: str) -> tuple[int, ...]:
  """The usual Cloud TPU grid of ``chips`` chips (the slice shapes Google provisions):
  2-D v5e/v6e grids as square as powers of two allow, 3-D v4/v5p tori likewise."""
  if chips < 1 or chips & (chips - 1):
    raise JaxdistillError(
      f"topology {name!r}: {chips} chips is not a power of two; name a chip grid instead, "
      f"e.g. '{chip.name}:{'x'.join(['2'] * chip.dims)}'"
    )
  # Provisioned shapes: 2-D 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, ..., 16x16 (the last axis doubles
  # first); 3-D 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... (from 2x2x2 the last axis first).
  grid = [1] * chip.dims
  order = list(range(chip.dims))[::-1]
  if chip.dims == 3:
    grid, order = (
      ([2, 2, 2], [2, 1, 0])
      if chips >= 8
      else ([2, 2, 1], [2])
      if chips == 4
      else (
        [1, 1, 1],
        [1, 0],
      )
    )
  k = 0
  while math.prod(grid) < chips:
    grid[order[k % len(order)]] *= 2
    k += 1
  return tuple(grid)


def parse_topology(spec: str) -> Topology:
  """``Topology`` of a slice name, a chip grid, a GPU cluster or ``cpu``.

  Args:
    spec: 'v5p-128', 'v5e-64', 'v6e-256', 'v4-32' (slice names: TensorCores on v4/v5p, chips
      on v5e/v6e); 'v5e:2x2', 'v5p:4x4x4' (chip grids); 'h100:8', 'h200:64' (GPUs).
  Raises:
    JaxdistillError: an unknown chip or a malformed name (one line, with examples).
  """
  text = spec.strip().lower()
  examples = "e.g. v5p-128, v5e-64, v6e-256, v4-32, v5e:2x2, v5p:4x4x4, h100:8"
  m = re.fullmatch(r"([a-z0-9]+?)(?:pod)?([-:])([0-9x]+)", text)
  if not m:
    raise JaxdistillError(f"unknown topology {spec!r}; {examples}")
  chip_name = _ALIASES.get(m.group(1), m.group(1))
  if chip_name not in CHIPS:
    raise JaxdistillError(
      f"unknown chip {m.group(1)!r} in topology {spec!r}; choose from {sorted(CHIPS)} ({examples})"
    )
  chip, sep, size = CHIPS[chip_name], m.group(2), m.group(3)
  if chip.platform == "gpu":
    if sep != ":" or not size.isdigit() or int(size) < 1:
      raise JaxdistillError(f"a GPU cluster is named like '{chip.name}:8' (GPUs), got {spec!r}")
    return Topology(chip, int(size), (), spec)
  if sep == ":":
    try:
      grid = tuple(int(x) for x in size.split("x"))
    except ValueError:
      raise JaxdistillError(f"bad chip grid in topology {spec!r}; {examples}") from None
    if len(grid) != chip.dims or min(grid) < 1:
      raise JaxdistillError(
        f"a {chip.name} chip grid has {chip.dims} dimensions, got {spec!r}; {examples}"
      )
    return Topology(chip, math.prod(grid), grid, spec)
  if not size.isdigit() or int(size) < chip.cores_per_chip or int(size) % chip.cores_per_chip:
    raise JaxdistillError(
      f"bad slice size in {spec!r}: {chip.name} slices count "
      f"{'TensorCores (2 per chip)' if chip.cores_per_chip == 2 else 'chips'}; {examples}"
    )
  chips = int(size) // chip.cores_per_chip
  return Topology(chip, chips, _grid_for(chip, chips, spec), spec)
