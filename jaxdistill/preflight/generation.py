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

  from jaxdistill.generate import cache as cache_lib
  from jaxdistill.models import flops as flops_lib
  from jaxdistill.parallel import sharding as sharding_lib

  cfg = compiler.with_mesh(cfg, mesh)
  devices = compiler.devices_for(topology) if devices is None else devices
  s = _Setup(cfg, devices, which, batch, prompt_len, new_tokens)
  config, chip = s.model.config, topology.chip
  # Prefill: the whole prompt batch, forward; decode: one token per row, attending over the
  # cache at its average fill (P + N / 2).
  per_token = flops_lib.flops_per_token
  tokens = batch * prompt_len
  prefill = compiler.new_report(
    "prefill", topology, s.mesh, tokens, tokens * per_token(config, prompt_len)
  )
  context = prompt_len + new_tokens // 2
  decode = compiler.new_report(
    "decode", topology, s.mesh, batch, batch * per_token(config, context)
  )
  capacity = cache_lib.bucket(prompt_len + new_tokens, config.max_len)
  replicated = sharding_lib.replicated(s.mesh)
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  with (
    sharding_lib.rules_context(s.mesh, s.table),
    compiler.no_persistent_cache(chip.platform != "cpu"),
  ):
    lowered = s.decoder.prefill.lower(s.variables, capacity, s.tokens, s.per_row, s.per_row, seed)
    compiled = compiler.compile_into(prefill, lowered)
    if compiled is None:
      decode.fits, decode.error = False, "the prefill does not fit"
    else:
      state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        lowered.out_info,
        compiled.output_shardings,
      )
      steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
      compiler.compile_into(decode, s.decoder.decode.lower(s.variables, state, steps, seed))
  shapes = cache_lib.cache_shapes(config, batch, capacity, s.decoder.cache_dtype)
  decode.notes.append(
    f"per decode step: {batch} rows x 1 token, cache of {capacity} slots "
    f"({cache_lib.nbytes(shapes) / 2**20:.0f} MiB)"
  )
  return roofline.fill_roofline(prefill, chip), roofline.fill_roofline(decode, chip)


class _Setup:
  """The model, its abstract variables in their shardings, the decoder and the prompt shapes."""

  def __init__(self, cfg, devices, which, batch, prompt_len, new_tokens):
    import jax
    import jax.numpy as jnp

    from jaxdistill import models
    from jaxdistill.errors import JaxdistillError
    from jaxdistill.generate import decode as decode_lib
    from jaxdistill.generate.sampling import SamplingParams
    from jaxdistill.parallel import sharding as sharding_lib
    from jaxdistill.train import run as run_lib
    from jaxdistill.train import teacher as teacher_lib

    self.mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    self.model = run_lib.model_of(cfg, which)
    max_len = self.model.config.max_len
    if prompt_len + new_tokens > max_len:
      raise JaxdistillError(
        f"prompt_len {prompt_len} + new_tokens {new_tokens} exceed {which}.max_len {max_len}"
      )
    rows = sharding_lib.axis_size(self.mesh, *sharding_lib.BATCH_AXES)
    if batch % rows:
      raise JaxdistillError(f"--gen_batch {batch} must split over mesh data*fsdp={rows} devices")
    self.table = teacher_lib.rules(cfg, self.model, self.mesh) if which == "teacher" else None
    variables = models.abstract_variables(self.model, self.mesh, min(8, max_len), self.table)
    self.variables = {"params": variables["params"]}
    self.decoder = decode_lib.Decoder(self.model, SamplingParams(), (), new_tokens)
    by_row = sharding_lib.batch_sharding(self.mesh)
    self.tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=by_row)
    self.per_row = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=by_row)
