"""Preflight of generation: the prefill and decode programs compiled for a target.

``compile_generation(cfg, topology, batch, prompt_len, new_tokens)`` compiles the sampler's own
programs (``generate.decode.Decoder``: ``prefill`` of a [batch, prompt_len] prompt batch, then
the ``decode`` while-loop) for the student (or the teacher) of ``cfg``, with abstract variables
in their shardings and the cache sharded by its logical names, over ``topology``'s devices. The
decode loop's trip count is a runtime value, so its HLO body (one token for every row) is what
``cost_analysis`` and ``hlo.collectives`` count: the decode report is per generated token step.
Its roofline is the classic decode bound: a step reads every weight and the cache once, so at
small batch the HBM term dominates.
"""

import time
from typing import Any

from jaxdistill.preflight import chips as chips_lib
from jaxdistill.preflight import compiler
from jaxdistill.preflight import roofline


def compile_generation(
  cfg: Any,
  topology: chips_lib.Topology,
  batch: int,
  prompt_len: int,
  new_tokens: int,
  which: str = "student",
  mesh: tuple[int, int, int] | None = None,
  devices: list | None = None,
) -> tuple[roofline.Report, roofline.Report]:
  """(prefill report, decode report) of ``cfg``'s ``which`` model on ``topology``.

  Args:
    cfg: a validated config (its model section and mesh; nothing is allocated).
    topology: the target.
    batch: rows generated together (must split over the mesh's data x fsdp).
    prompt_len: P, prompt tokens per row.
    new_tokens: N, tokens generated per row (the cache holds P + N, in its power-of-two bucket).
    which: "student" or "teacher".
    mesh: (data, fsdp, tensor) instead of the config's.
    devices: the target's devices (default ``compiler.devices_for``).
  Raises:
    JaxdistillError: a prompt longer than the model's context, or a batch that does not split.
  """
  import jax
  import jax.numpy as jnp

  from jaxdistill import models
  from jaxdistill.errors import JaxdistillError
  from jaxdistill.generate import cache as cache_lib
  from jaxdistill.generate import decode as decode_lib
  from jaxdistill.generate.sampling import SamplingParams
  from jaxdistill.models import flops as flops_lib
  from jaxdistill.parallel import sharding as sharding_lib
  from jaxdistill.train import run as run_lib
  from jaxdistill.train import teacher as teacher_lib

  cfg = compiler.with_mesh(cfg, mesh)
  devices = compiler.devices_for(topology) if devices is None else devices
  mesh_ = sharding_lib.make_mesh(cfg.mesh, devices)
  model = run_lib.model_of(cfg, which)
  config = model.config
  if prompt_len + new_tokens > config.max_len:
    raise JaxdistillError(
      f"prompt_len {prompt_len} + new_tokens {new_tokens} exceed {which}.max_len {config.max_len}"
    )
  rows = sharding_lib.axis_size(mesh_, *sharding_lib.BATCH_AXES)
  if batch % rows:
    raise JaxdistillError(f"--gen_batch {batch} must split over mesh data*fsdp={rows} devices")
  table = teacher_lib.rules(cfg, model, mesh_) if which == "teacher" else None
  variables = models.abstract_variables(model, mesh_, min(8, config.max_len), table)
  variables = {"params": variables["params"]}
  decoder = decode_lib.Decoder(model, SamplingParams(), (), new_tokens)
  capacity = cache_lib.bucket(prompt_len + new_tokens, config.max_len)
  rows_sharding = sharding_lib.batch_sharding(mesh_)
  tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows_sharding)
  per_row = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows_sharding)
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding_lib.replicated(mesh_))
  chip = topology.chip

  def report(what: str, tokens_per_step: int, flops: float) -> roofline.Report:
    return roofline.Report(
      what=what,
      topology=topology.name,
      chip=chip.name,
      platform=chip.platform,
      num_devices=len(devices),
      mesh=dict(mesh_.shape),
      estimate=not topology.can_compile and chip.platform != "cpu",
      hbm_bytes=chip.hbm_bytes,
      model_flops=flops,
      hardware_flops=flops,
      tokens_per_step=tokens_per_step,
      collectives=roofline.empty_collectives(),
    )

  # Prefill: the whole prompt batch, forward; decode: one token per row, attending over the
  # cache at its average fill (P + N / 2).
  prefill = report(
    "prefill",
    batch * prompt_len,
    batch * prompt_len * flops_lib.flops_per_token(config, prompt_len),
  )
  context = prompt_len + new_tokens // 2
  decode = report("decode", batch, batch * flops_lib.flops_per_token(config, context))
  with (
    sharding_lib.rules_context(mesh_, table),
    compiler.no_persistent_cache(chip.platform != "cpu"),
  ):
    start = time.perf_counter()
    lowered = decoder.prefill.lower(variables, capacity, tokens, per_row, per_row, seed)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      prefill.compile_s = time.perf_counter() - start
      compiler.out_of_memory(prefill, str(e))
      decode.fits, decode.error = False, "the prefill does not fit"
      return roofline.fill_roofline(prefill, chip), roofline.fill_roofline(decode, chip)
    prefill.compile_s = time.perf_counter() - start
    compiler.read_compiled(prefill, compiled)
    state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      lowered.out_info,
      compiled.output_shardings,
    )
    start = time.perf_counter()
    steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding_lib.replicated(mesh_))
    try:
      compiled = decoder.decode.lower(variables, state, steps, seed).compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      decode.compile_s = time.perf_counter() - start
      compiler.out_of_memory(decode, str(e))
      return roofline.fill_roofline(prefill, chip), roofline.fill_roofline(decode, chip)
    decode.compile_s = time.perf_counter() - start
    compiler.read_compiled(decode, compiled)
  cache_mib = cache_lib.nbytes(cache_lib.cache_shapes(config, batch, capacity, decoder.cache_dtype))
  decode.notes.append(
    f"per decode step: {batch} rows x 1 token, cache of {capacity} slots "
    f"({cache_mib / 2**20:.0f} MiB)"
  )
  return roofline.fill_roofline(prefill, chip), roofline.fill_roofline(decode, chip)
