"""The preflight report: memory against the chip, FLOPs, collectives and a roofline step time.

A roofline step time is a lower bound: the step cannot run faster than its FLOPs at the chip's
peak, its HBM traffic at the HBM bandwidth, or its interconnect traffic at the link bandwidth,
so ``step_s = max(compute_s, hbm_s, ici_s)`` (each shown; real steps overlap them imperfectly
and run slower). Expected tokens/s and MFU are the ones that bound allows: MFU = model FLOPs
per device / (step_s x peak), so it is at most 1 and equals ``compute_s / step_s`` when no
rematerialisation adds FLOPs.

FLOPs are counted two ways. *Model* FLOPs (``models.flops``: forward + backward of the
student, forward of each teacher, heads and loss) are what MFU is defined on. *Hardware*
FLOPs add what the program really executes on top: the forward a remat policy recomputes.
XLA's ``cost_analysis()`` FLOPs are shown too, but count a ``while`` loop's body once (a
scanned model's layers), so the roofline reads the analytic count and XLA's only where it is
larger. HBM traffic is the largest of three counts: XLA's "bytes accessed" (same loop flaw),
``hlo.hbm_bytes`` (each kernel's operands and result, counted from the optimised HLO per loop
trip; on the CPU backend it matches XLA's count, on TPU it reads up to 40% lower for
unrolled programs) and the step's argument + output bytes, which every step reads or
writes at least once.
"""

import dataclasses
from typing import Any

from jaxdistill.preflight import chips as chips_lib
from jaxdistill.preflight import hlo

GIB = 1024**3


@dataclasses.dataclass
class Report:
  """What ``compile_for`` found; ``as_dict`` for ``--json``, ``format`` for people.

  Memory fields are bytes per device (XLA's ``memory_analysis`` of the compiled program, or the
  numbers of the compiler's out-of-memory error); ``fits`` is None when neither is known.
  """

  what: str  # "step" (the distill step) or "decode" / "prefill"
  topology: str
  chip: str
  platform: str
  num_devices: int
  mesh: dict
  estimate: bool  # True where no ahead-of-time compile for the target exists (GPUs)
  fits: bool | None = None
  error: str = ""  # the compiler's out-of-memory message, shortened
  argument_bytes: float = 0.0
  output_bytes: float = 0.0
  alias_bytes: float = 0.0
  temp_bytes: float = 0.0
  code_bytes: float = 0.0
  hbm_bytes: float = 0.0  # the chip's memory
  model_flops: float = 0.0  # per step, all devices
  hardware_flops: float = 0.0  # per step, all devices (model + recomputation)
  xla_flops: float = 0.0  # per device, as cost_analysis reports it (loop bodies once)
  xla_bytes: float = 0.0  # per device, likewise
  hlo_bytes: float = 0.0  # per device, counted from the optimised HLO per loop trip (hlo.py)
  hbm_traffic: float = 0.0  # per device, bytes the roofline charges
  collectives: dict = dataclasses.field(default_factory=dict)  # kind -> hlo.Collective
  tokens_per_step: int = 0
  compute_s: float = 0.0
  hbm_s: float = 0.0
  ici_s: float = 0.0
  step_s: float = 0.0
  tokens_per_s: float = 0.0
  mfu: float = 0.0
  compile_s: float = 0.0
  loops: bool = False  # the program has a loop of known trips > 1 (XLA's costs count it once)
  notes: list = dataclasses.field(default_factory=list)

  @property
  def total_bytes(self) -> float:
    """Device memory the program needs: arguments + outputs - donated aliases + temporaries +
    code."""
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["collectives"] = {k: dataclasses.asdict(v) for k, v in self.collectives.items()}
    out["total_bytes"] = self.total_bytes
    return out

  def format(self) -> str:
    """The human-readable report (a few aligned lines)."""
    gib = _bytes
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "unknown"}[self.fits]
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    head = f"{self.what} on {self.topology} ({self.num_devices} x {self.chip}; mesh {mesh})"
    lines = [
      head + (" [estimate: no ahead-of-time compile for this target]" if self.estimate else "")
    ]
    lines.append(f"  verdict          {verdict}" + (f"  ({self.error})" if self.error else ""))
    lines.append("  memory per device")
    for name in ("argument", "output", "temp", "code"):
      lines.append(f"    {name:<14}{gib(getattr(self, name + '_bytes'))}")
    if self.alias_bytes:
      lines.append(f"    {'donated':<14}{gib(-self.alias_bytes)}")
    lines.append(
      f"    {'total':<14}{gib(self.total_bytes)} of {_bytes(self.hbm_bytes).strip()} "
      f"({self.total_bytes / max(self.hbm_bytes, 1):.0%})"
    )
    lines.append(
      f"  FLOPs per step   model {self.model_flops:.3e}, hardware {self.hardware_flops:.3e} "
      f"(all devices); XLA cost analysis {self.xla_flops:.3e} per device"
    )
    lines.append("  collectives per device per step (bytes sent)")
    for kind, c in self.collectives.items():
      if c.count:
        lines.append(f"    {kind:<19}{c.count:6d} x  {_bytes(c.bytes_sent)}")
    if not any(c.count for c in self.collectives.values()):
      lines.append("    none")
    if self.error:  # no program: only the analytic compute term is known
      lines.append(
        f"  roofline         compute alone {_ms(self.compute_s)} (no compiled program: no HBM or "
        "interconnect terms)"
      )
      lines.extend(f"  note: {n}" for n in self.notes)
      return "\n".join(lines)
    lines.append(
      f"  roofline         compute {_ms(self.compute_s)}, HBM {_ms(self.hbm_s)}, "
      f"interconnect {_ms(self.ici_s)} -> step >= {_ms(self.step_s)}"
    )
    lines.append(
      f"  expected         <= {self.tokens_per_s:,.0f} tokens/s ({self.tokens_per_step:,} per "
      f"step), MFU <= {self.mfu:.1%}"
    )
    lines.append(f"  compile          {self.compile_s:.1f} s")
    lines.extend(f"  note: {n}" for n in self.notes)
    return "\n".join(lines)


def _ms(seconds: float) -> str:
  return f"{seconds * 1e3:.3g} ms"


def _bytes(b: float) -> str:
  """Bytes in the unit that reads best (KiB .. GiB), right-aligned."""
  for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if abs(b) >= size or unit == "KiB":
      return f"{b / size:9.2f} {unit}"
  return ""


def fill_roofline(r: Report, chip: chips_lib.Chip) -> Report:
  """Sets the time, token and MFU fields of ``r`` from its counts and ``chip``'s peaks."""
  n = max(r.num_devices, 1)
  flops_per_device = max(r.hardware_flops / n, r.xla_flops)
  r.compute_s = flops_per_device / chip.peak_flops
  r.hbm_traffic = max(r.hlo_bytes, r.xla_bytes, r.argument_bytes + r.output_bytes)
  r.hbm_s = r.hbm_traffic / chip.hbm_bw
  sent = sum(c.bytes_sent for c in r.collectives.values())
  r.ici_s = sent / chip.ici_bw if n > 1 else 0.0
  r.step_s = max(r.compute_s, r.hbm_s, r.ici_s)
  if r.step_s > 0:
    r.tokens_per_s = r.tokens_per_step / r.step_s
    r.mfu = (r.model_flops / n) / (r.step_s * chip.peak_flops)
  if r.loops:
    r.notes.append(
      "XLA's cost analysis counts loop bodies once: FLOPs from models/flops.py, HBM bytes "
      f"counted from the HLO per loop trip ({r.hlo_bytes / GIB:.2f} GiB vs XLA's "
      f"{r.xla_bytes / GIB:.2f} GiB)"
    )
  return r


def empty_collectives() -> dict:
  return {k: hlo.Collective() for k in hlo.KINDS}
