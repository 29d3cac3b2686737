"""Static FP8 scales of a frozen model (a c=fp8 teacher), calibrated on a few batches.

A training FP8 model updates its delayed-scaling state (scales, amax histories in the
``_overwrite_with_gradient`` collection) every step. A frozen teacher has no steps: ``calibrate``
runs it forward on a few batches, updating that state with Flax's own rule, then
``precision.freeze_fp8_scales`` fixes every scale to its history's maximum. The teacher then
runs with these scales unchanged for the whole distillation.
"""

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import fp8_ops

from jaxdistill.models import api
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.parallel.precision import freeze_fp8_scales


def _update_fn(model: nn.Module) -> Any:
  """(fp8_state, params, batch) -> fp8_state after one forward on ``batch``."""
  collection = fp8_ops.OVERWRITE_WITH_GRADIENT

  def total(fp8_state, params, batch):
    out = api.apply(model, {"params": params, collection: fp8_state}, batch, return_logits=False)
    # Any scalar of the outputs: the FP8 ops return their updated state as its
    # "gradient", whatever the cotangent (the training rule, exactly).
    return jnp.sum(out["final_hidden"].astype(jnp.float32))

  return jax.grad(total)


_CALIBRATION_FNS: dict = {}  # (model type, config, mesh, T) -> jitted fns: a resume reuses them


def _calibration_fns(model: nn.Module, mesh: jax.sharding.Mesh, seq_len: int) -> tuple:
  """(shardings, init, update, restart, freeze) of ``model``'s FP8 state, jitted once."""
  key = (type(model), model.config, mesh, seq_len)
  if key not in _CALIBRATION_FNS:
    collection = fp8_ops.OVERWRITE_WITH_GRADIENT
    init_fn = lambda r: api.init_variables(model, r, seq_len)[collection]
    shardings = sharding_lib.shardings_of(jax.eval_shape(init_fn, jax.random.key(0)), mesh)
    jit = lambda fn: jax.jit(fn, out_shardings=shardings)
    # restart: keep the scales a warm-up batch gave, forget the amaxes it recorded.
    clear = lambda path, x: jnp.zeros_like(x) if "amax_history" in jax.tree_util.keystr(path) else x
    restart = lambda state: jax.tree_util.tree_map_with_path(clear, freeze_fp8_scales(state))
    _CALIBRATION_FNS[key] = (
      shardings,
      jit(lambda r: nn.unbox(init_fn(r))),
      jit(_update_fn(model)),
      jit(restart),
      jit(freeze_fp8_scales),
    )
  return _CALIBRATION_FNS[key]


def calibrate(
  model: nn.Module,
  params: Any,
  batches: Iterable[dict[str, np.ndarray]],
  mesh: jax.sharding.Mesh,
  seq_len: int,
) -> tuple[Any, Any]:
  """Static FP8 scales of a frozen model (a c=fp8 teacher) from a few batches.

  Updates the model's FP8 state with one forward per batch (Flax's
  delayed-scaling rule: each amax history gains the batch's max |tensor|),
  then freezes the scales (``freeze_fp8_scales``). Input scales are thus set
  by the largest activation seen in calibration; kernel scales by the weights'
  own max |w| (exact: frozen weights never change). The first batch runs once
  more before, as a warm-up whose amaxes are dropped: it runs with the initial
  scales (1.0), which round small weights coarsely, so the activations it sees
  after the first layer are not the model's.

  Args:
    model: a model (``api.build``) with ``config.fp8``.
    params: its params (sharded).
    batches: this process's rows of each calibration batch (as the data
      iterators yield them); deterministic batches give identical scales.
    mesh: the device mesh.
    seq_len: T, to build the initial state.

  Returns:
    (variables, shardings): ``{"_overwrite_with_gradient": ...}`` ready to pass
    as a model's non-param variables, and their (replicated) shardings.
  """
  shardings, init, update, restart, freeze = _calibration_fns(model, mesh, seq_len)
  with sharding_lib.rules_context(mesh):
    state = init(jax.random.key(0))
    batches = [sharding_lib.shard_batch(b, mesh) for b in batches]
    if batches:
      state = restart(update(state, params, batches[0]))
    for batch in batches:
      state = update(state, params, batch)
    state = freeze(state)
  collection = fp8_ops.OVERWRITE_WITH_GRADIENT
  return {collection: state}, {collection: shardings}
