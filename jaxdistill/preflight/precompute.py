"""Preflight of ``jaxdistill precompute``: the teacher's targets program compiled for a target.

``compile_precompute(cfg, topology)`` builds the precompute job's own jitted targets function
(``precompute.text.build_teacher(abstract=True)``: the teacher forward, its top-k / sampled
targets in token chunks) with the teacher's params as shapes in their placement, and compiles
it for one batch of ``data.batch_size`` rows over the target's devices: how much of a pod one
pass over a corpus needs, and how fast it can go, before the teacher is ever loaded.
"""

from typing import Any

from jaxdistill.preflight import chips as chips_lib
from jaxdistill.preflight import compiler
from jaxdistill.preflight import roofline


def compile_precompute(
  cfg: Any,
  topology: chips_lib.Topology,
  mesh: tuple[int, int, int] | None = None,
  devices: list | None = None,
) -> roofline.Report:
  """The report of one targets batch of ``cfg``'s teacher(s) on ``topology``.

  Raises:
    JaxdistillError: an image classifier's config (its class-logit cache has its own job).
  """
  import jax
  import jax.numpy as jnp

  from jaxdistill.errors import JaxdistillError
  from jaxdistill.models import flops as flops_lib
  from jaxdistill.parallel import sharding as sharding_lib
  from jaxdistill.precompute import text as precompute_text
  from jaxdistill.train import run as run_lib
  from jaxdistill.train import teacher as teacher_lib

  if cfg.teacher.arch != "transformer" or cfg.teacher.encoder:
    raise JaxdistillError(
      "--what precompute compiles a decoder teacher's token targets (an image classifier's "
      "or an encoder's cache has its own, small, job)"
    )
  cfg = compiler.with_mesh(cfg, mesh)
  devices = compiler.devices_for(topology) if devices is None else devices
  teacher = precompute_text.build_teacher(cfg, "", devices=devices, abstract=True)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  rows = sharding_lib.batch_sharding(teacher.mesh)
  batch = {
    k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=rows) for k in precompute_text.ROW_KEYS
  }
  batch["weights"] = jax.ShapeDtypeStruct((b, t), jnp.float32, sharding=rows)
  rows_B = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)
  chip = topology.chip
  flops = 0.0
  for k in range(1 + len(cfg.teachers)):
    model = run_lib.model_of(teacher_lib.view(cfg, k), "teacher")
    flops += b * t * flops_lib.flops_per_token(model.config, t)
  report = compiler.new_report("precompute", topology, teacher.mesh, b * t, flops)
  with (
    sharding_lib.rules_context(teacher.mesh),
    compiler.no_persistent_cache(chip.platform != "cpu"),
  ):
    compiler.compile_into(report, teacher.fn.lower(teacher.params, batch, rows_B))
  return roofline.fill_roofline(report, chip)
