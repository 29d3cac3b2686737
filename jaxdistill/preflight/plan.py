"""``jaxdistill compile --plan``: search the layouts of one run for a topology, best first.

The space: mesh shapes (data, fsdp, tensor) over the topology's devices (tensor 1-8), the
teacher's placement (``teacher.rules``: student, fsdp, tensor), the student's remat policy
(``student.remat``: none, dots, full) and micro-batching
(``optim.grad_accum``: 1-8). Compiling a large step takes tens of seconds on a CPU host, so the
search is two-staged:

1. Every candidate is *described* (``build_run(abstract=True)``: exact per-device bytes of the
   state and the teacher from their shardings, no compile), its activations estimated from the
   model shapes, and its step time estimated analytically (FLOPs at peak; FSDP gathers and
   reduce-scatters, tensor-parallel all-reduces and the gradient all-reduce at the link
   bandwidth). Candidates whose estimate exceeds 1.25x the chip's memory are dropped.
2. The survivors are compiled in order of estimated time (``compiler.compile_for``) until
   ``top`` of them fit or ``max_compiles`` compiles ran; the compiled ones are ranked by their
   roofline step time (``roofline``) and printed with the overrides that select each.
"""

import copy
import dataclasses
import itertools
import math
from typing import Any

from jaxdistill.errors import ConfigError
from jaxdistill.preflight import chips as chips_lib
from jaxdistill.preflight import roofline

REMATS = ("none", "dots", "full")
TEACHER_RULES = ("student", "fsdp", "tensor")
GRAD_ACCUM = (1, 2, 4, 8)


@dataclasses.dataclass
class Candidate:
  """One layout: its overrides, the stage-1 estimates and (once compiled) its report."""

  mesh: tuple[int, int, int]
  teacher_rules: str
  remat: str
  grad_accum: int
  state_bytes: float = 0.0  # per device, exact (state + teacher, from the shardings)
  activation_bytes: float = 0.0  # per device, estimated
  est_step_s: float = 0.0
  report: roofline.Report | None = None

  @property
  def overrides(self) -> str:
    d, f, t = self.mesh
    out = [f"--config.mesh.data={d}", f"--config.mesh.fsdp={f}", f"--config.mesh.tensor={t}"]
    out.append(f"--config.teacher.rules={self.teacher_rules}")
    out.append(f"--config.student.remat={self.remat}")
    out.append(f"--config.optim.grad_accum={self.grad_accum}")
    return " ".join(out)

  def as_dict(self) -> dict:
    out = {k: getattr(self, k) for k in ("mesh", "teacher_rules", "remat", "grad_accum")}
    out.update(
      overrides=self.overrides,
      est_bytes=self.state_bytes + self.activation_bytes,
      est_step_s=self.est_step_s,
      report=self.report.as_dict() if self.report else None,
    )
    return out


@dataclasses.dataclass
class PlanResult:
  """The search's outcome: compiled candidates (fitting first, by roofline time)."""

  topology: str
  considered: int
  described: int
  compiled: list

  @property
  def best(self) -> list:
    return [c for c in self.compiled if c.report.fits]

  def as_dict(self) -> dict:
    return {
      "topology": self.topology,
      "considered": self.considered,
      "described": self.described,
      "plans": [c.as_dict() for c in self.compiled],
    }

  def format(self) -> str:
    lines = [
      f"plan for {self.topology}: {self.considered} layouts, {self.described} within memory by "
      f"estimate, {len(self.compiled)} compiled, {len(self.best)} fit"
    ]
    header = f"  {'#':>2} {'mesh d,f,t':>11} {'teacher':>8} {'remat':>5} {'accum':>5} "
    header += f"{'GiB/dev':>8} {'step ms':>9} {'tok/s':>11} {'MFU':>6}  fits"
    lines.append(header)
    for i, c in enumerate(self.compiled, 1):
      r = c.report
      if r.error:  # the compiler refused it: no program, no roofline
        lines.append(
          f"  {i:>2} {','.join(map(str, c.mesh)):>11} {c.teacher_rules:>8} {c.remat:>5} "
          f"{c.grad_accum:>5} {r.total_bytes / 2**30:>8.2f} {'-':>9} {'-':>11} {'-':>6}  NO"
        )
        continue
      lines.append(
        f"  {i:>2} {','.join(map(str, c.mesh)):>11} {c.teacher_rules:>8} {c.remat:>5} "
        f"{c.grad_accum:>5} {r.total_bytes / 2**30:>8.2f} {r.step_s * 1e3:>9.1f} "
        f"{r.tokens_per_s:>11,.0f} {r.mfu:>6.1%}  {'yes' if r.fits else 'NO'}"
      )
    for i, c in enumerate(self.best, 1):
      lines.append(f"  best {i}: {c.overrides}")
    if not self.best:
      lines.append("  nothing fits: more chips, a smaller batch or a precomputed teacher cache")
    return "\n".join(lines)


def candidates(cfg: Any, num_devices: int) -> list[Candidate]:
  """Every layout of the search space that the config's own checks accept."""
  from jaxdistill.config import validate

  rules = TEACHER_RULES if cfg.teacher.source not in ("none", "cache") else ("student",)
  out = []
  for t in (1, 2, 4, 8):
    if num_devices % t:
      continue
    for f in _divisors(num_devices // t):
      mesh = (num_devices // t // f, f, t)
      for accum, remat, rule in itertools.product(GRAD_ACCUM, REMATS, rules):
        cand = Candidate(mesh, rule, remat, accum)
        try:
          validate.validate(apply(cfg, cand))
          validate.check_mesh(apply(cfg, cand), dict(zip(("data", "fsdp", "tensor"), mesh)))
        except ConfigError:
          continue
        out.append(cand)
  return out


def apply(cfg: Any, cand: Candidate) -> Any:
  """``cfg`` with the candidate's overrides (a copy)."""
  cfg = copy.deepcopy(cfg)
  d, f, t = cand.mesh
  cfg.mesh.update(data=d, fsdp=f, tensor=t)
  cfg.teacher.rules = cand.teacher_rules
  cfg.student.remat = cand.remat
  cfg.optim.grad_accum = cand.grad_accum
  return cfg


def describe(
  cfg: Any, cand: Candidate, devices: list, chip: chips_lib.Chip, runs: dict | None = None
) -> None:
  """Stage 1: exact state bytes from the abstract run, estimated activations and time.
  ``runs`` caches abstract runs by (mesh, teacher rules): remat and micro-batching change
  neither the state nor the teacher."""
  import jax

  from jaxdistill.train import run as run_lib

  c = apply(cfg, cand)
  runs = {} if runs is None else runs
  key = (cand.mesh, cand.teacher_rules)
  if key not in runs:
    runs[key] = run_lib.build_run(c, devices=devices, abstract=True)
  run = runs[key]
  state = sum(_shard_bytes(x) for x in jax.tree.leaves(run.state))
  grads = sum(_shard_bytes(x) for x in jax.tree.leaves(run.state.params))
  cand.state_bytes = state + grads + sum(_shard_bytes(x) for x in jax.tree.leaves(run.teacher_vars))
  s = run.student.config
  d, f, t = cand.mesh
  tokens = c.data.batch_size * c.data.seq_len / (d * f) / cand.grad_accum  # per device, micro
  act = 2  # bf16 / f32 activations: assume 2 bytes (a float32 policy doubles it)
  per_layer = {
    "full": s.d_model,
    "dots": 4 * s.d_model + 3 * s.d_ff / t,
    "none": 10 * s.d_model + 4 * s.d_ff / t,
  }[cand.remat]
  logits = 3 * 4 * s.vocab_size / t  # float32 rows of both models' logits and the loss
  cand.activation_bytes = tokens * (per_layer * act * s.num_layers + logits)
  # Time: hardware FLOPs at peak, and the interconnect at the link bandwidth.
  n = d * f * t
  from jaxdistill.preflight import compiler

  hw = run.flops.total + compiler.recomputed_flops(c, run.flops)
  params_s = sum(math.prod(x.shape) for x in jax.tree.leaves(run.state.params)) * 2
  params_t = sum(math.prod(x.shape) for x in jax.tree.leaves(run.teacher_vars or {})) * 2
  gather = cand.grad_accum * (3 * params_s / t + params_t / t) * (f - 1) / f
  tensor_ar = 4 * s.num_layers * tokens * s.d_model * act * (t - 1) / t * cand.grad_accum
  grads = 2 * params_s * 2 / (f * t) * (d - 1) / d
  cand.est_step_s = max(hw / n / chip.peak_flops, (gather + tensor_ar + grads) / chip.ici_bw)


def search(
  cfg: Any,
  topology: chips_lib.Topology,
  top: int = 5,
  max_compiles: int = 8,
  devices: list | None = None,
) -> PlanResult:
  """Both stages (see the module docstring).

  Args:
    cfg: a validated config.
    topology: what to plan for.
    top: stop once this many compiled candidates fit.
    max_compiles: compile at most this many.
    devices: the topology's devices (default ``compiler.devices_for``).
  Returns:
    The ``PlanResult`` (``best``: fitting plans by roofline step time).
  """
  from jaxdistill.preflight import compiler

  devices = compiler.devices_for(topology) if devices is None else devices
  chip = topology.chip
  cands = candidates(cfg, len(devices))
  kept, runs = [], {}
  for cand in cands:
    describe(cfg, cand, devices, chip, runs)
    if cand.state_bytes + cand.activation_bytes <= 1.25 * chip.hbm_bytes:
      kept.append(cand)
  # Tight estimates (over 90% of the chip) go last: compiles are expensive, and those are the
  # likeliest to miss. Estimates within a few percent are ties: then fewer micro-batches and
  # cheaper remat first.
  kept.sort(
    key=lambda c: (
      c.state_bytes + c.activation_bytes > 0.9 * chip.hbm_bytes,
      float(f"{c.est_step_s:.2g}"),
      c.grad_accum,
      REMATS.index(c.remat),
    )
  )
  compiled = []
  for cand in kept[:max_compiles]:
    cand.report = compiler.compile_for(apply(cfg, cand), topology, devices=devices)
    compiled.append(cand)
    if sum(1 for c in compiled if c.report.fits) >= top:
      break
  compiled.sort(key=lambda c: (not c.report.fits, c.report.step_s))
  return PlanResult(topology.name, len(cands), len(kept), compiled)


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def _shard_bytes(x: Any) -> float:
  """Bytes one device holds of an abstract array (its sharding's shard shape)."""
  import jax

  shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return 8.0
  return math.prod(shape) * x.dtype.itemsize
