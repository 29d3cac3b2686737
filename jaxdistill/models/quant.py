"""Int8 models through qwix: QAT students, their static activation scales, PTQ, int8 files.

A ``c=int8`` student (``precision.parse_policy``) is its float module rewritten by
``qwix.quantize_model`` with a quantised-training provider (``qat_model``): every projection
matmul (a transformer's query / key / value / out / MLP kernels, every conv and dense layer of
an image classifier) runs on int8 weights (per output channel, symmetric, ``max|w| / 127.5``,
qwix's bound) and int8 activations (per tensor; ``absmax`` symmetric or ``minmax`` asymmetric),
computed as ``int8 x int8 -> int32`` and rescaled. The backward pass is qwix's straight-through
estimator: the gradients are the float matmul's (float residuals), not masked (absmax / minmax
ranges cover the data they were taken from). Embeddings, norms, attention scores and the
vocabulary head stay float: the fused loss heads compute logits outside the model.

Activation scales are static: ``calibrate`` runs the model on a few batches and keeps qwix's
statistics in the "quant_stats" collection (per tensor: the mean over batches of each batch's
max |x|, or min and max), which a training step reads and never updates (the collection is not
mutable there) and the optimizer never sees. qwix's own activation calibration is per token /
per example; ``_ActPerTensor`` / ``_PER_TENSOR_QARRAY`` make it per tensor, the one thing qwix's
rules cannot say.

``int8_model`` + ``quantize`` turn float params (a QAT student's, or any finished student's:
post-training quantisation, PTQ) and those statistics into qwix's PTQ params: int8 ``qvalue``,
float ``scale`` (and activation zero points), run by the same module with integer matmuls.
``save`` writes them as ``model.safetensors`` + ``int8.json`` (``quantize.load_int8`` reads
them back).
"""

import dataclasses
import json
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src import averaging
from qwix._src.core import qarray
from qwix._src.utils import flax_util

from jaxdistill import paths
from jaxdistill.models.vision_config import VisionConfig
from jaxdistill.parallel import sharding as sharding_lib

COLLECTION = "quant_stats"
ACTS = ("symmetric", "asymmetric")
# The transformer's projections (layers.EinsumDense names); attention's own einsums are not.
_PROJECTIONS = r"(.*/)?(query|key|value|out|wi|wi_gate|wi_up|wo)"
CONFIG_FILE, TENSORS_FILE = "int8.json", "model.safetensors"


def _is_vision(model: nn.Module) -> bool:
  return isinstance(getattr(model, "config", None), VisionConfig)


def init_variables(model: nn.Module, rng: jax.Array, seq_len: int) -> dict:
  """``api.init_variables`` (which imports this module, so it is not imported here)."""
  cfg = model.config
  if _is_vision(model):
    shape = (1, cfg.image_size, cfg.image_size, cfg.image_channels)
    return model.init(rng, jnp.zeros(shape, cfg.dtype))
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))


def rules(model: nn.Module, act: str) -> list[qwix.QtRule]:
  """The qwix rule of an int8 ``model``: int8 weights and static int8 activations.

  Args:
    model: the float module (``api.build``'s).
    act: "symmetric" (absmax) or "asymmetric" (minmax) activations.
  """
  return [
    qwix.QtRule(
      module_path=".*" if _is_vision(model) else _PROJECTIONS,
      weight_qtype=jnp.int8,
      act_qtype=jnp.int8,
      act_static_scale=True,
      act_calibration_method="absmax" if act == "symmetric" else "minmax",
      act_batch_axes=(0,),
    )
  ]


class _ActPerTensor(qwix.QtProvider):
  """qwix's quantised training with per-tensor activation scales (weights stay per channel)."""

  def _create_dot_general_qt_config(self, rule, op_id, lhs, rhs):
    config = super()._create_dot_general_qt_config(rule, op_id, lhs, rhs)
    lhs_weight = flax_util.find_param(lhs) is not None
    return dataclasses.replace(
      config, lhs_disable_channelwise_axes=not lhs_weight, rhs_disable_channelwise_axes=lhs_weight
    )

  def _create_conv_general_qt_config(self, rule, op_id, lhs, rhs):
    # qwix 0.1.8 reads and updates a convolution's "quant_stats" inside its custom_vjp, which
    # leaks a tracer out of it; the statistics are taken here instead, before that trace, and
    # the op is handed the (constant) calibration.
    config = super()._create_conv_general_qt_config(rule, op_id, lhs, rhs)
    if config.lhs_collect_quant_stat is None:
      return config
    module = flax_util.get_current_module()
    if module.is_initializing() or flax_util.should_update_quant_stats():
      method = config.lhs_calibration_method
      how = qarray.HowToQuantize(qtype=rule.act_qtype, calibration_method=method)
      calibration = config.lhs_collect_quant_stat(qarray.calibrate(lhs, how))
    else:  # training / inference: the stored statistics alone (no trace of lhs in them)
      stat = module.scope.get_variable(COLLECTION, f"{op_id}_lhs")
      calibration = averaging.SimpleMovingAverage().get_calibration(stat)
    return dataclasses.replace(
      config, lhs_collect_quant_stat=lambda _: calibration, lhs_disable_channelwise_axes=True
    )


class _PerTensorQarray:
  """qwix's qarray module whose ``calibrate`` (PTQ calls it for activations only) reduces
  over every axis: the PTQ twin of ``_ActPerTensor``."""

  def __getattr__(self, name: str) -> Any:
    return getattr(qarray, name)

  @staticmethod
  def calibrate(array: jax.Array, how: Any) -> dict:
    return qarray.calibrate(array, dataclasses.replace(how, channelwise_axes=()))


_PER_TENSOR_QARRAY = _PerTensorQarray()


def float_model(model: nn.Module) -> nn.Module:
  """The float module under a qwix-quantised one (``model`` itself when not quantised)."""
  base = getattr(type(model), "_unquantized_type", None)
  return model if base is None else base(model.config)


def is_int8(model: nn.Module) -> bool:
  """Whether ``model`` is a qwix-quantised (QAT or int8) module."""
  return hasattr(type(model), "_unquantized_type")


def qat_model(model: nn.Module, act: str) -> nn.Module:
  """``model`` with fake-quantised int8 projections for training (see the module docstring).

  Its variables gain the "quant_stats" collection (zero counts until ``calibrate``)."""
  qat = qwix.quantize_model(float_model(model), _ActPerTensor(rules(float_model(model), act)))
  type(qat).int8_act = act  # qwix made this class for this module alone
  return qat


def act_of(model: nn.Module) -> str:
  """The activation scheme of a ``qat_model`` / ``int8_model`` module."""
  return type(model).int8_act


def int8_model(model: nn.Module, act: str) -> nn.Module:
  """``model`` for int8 inference: it applies the params of ``quantize`` (int8 kernels +
  scales) with ``int8 x int8 -> int32`` matmuls and convolutions."""
  base = float_model(model)
  provider = qwix.PtqProvider(rules(base, act), _qarray_module=_PER_TENSOR_QARRAY)
  int8 = qwix.quantize_model(base, provider)
  type(int8).int8_act = act
  return int8


# --- static activation scales --------------------------------------------------------


def _stats_forward(model: nn.Module, variables: dict, batch: dict) -> Any:
  """The "quant_stats" after one more forward on ``batch`` (as the training step runs it:
  an image classifier's BatchNorm by batch statistics, their update dropped)."""
  if _is_vision(model):
    mutable = [COLLECTION] + (["batch_stats"] if "batch_stats" in variables else [])
    _, updates = model.apply(variables, batch["inputs"], train=True, mutable=mutable)
  else:
    _, updates = model.apply(
      variables,
      batch["inputs"],
      segment_ids_BxT=batch.get("segment_ids"),
      positions_BxT=batch.get("positions"),
      return_logits=False,
      mutable=[COLLECTION],
    )
  return updates[COLLECTION]


def calibrate(
  model: nn.Module, variables: dict, batches: Iterable[dict], mesh: jax.sharding.Mesh
) -> Any:
  """Static activation scales of a QAT ``model`` from a few batches.

  Args:
    model: ``qat_model``'s module.
    variables: its variables (sharded): "params", "quant_stats" (their values are
      ignored: the statistics start from zero), and "batch_stats" for BatchNorm models.
    batches: this process's rows of each calibration batch (deterministic batches give
      identical scales).
    mesh: the device mesh.
  Returns:
    The new "quant_stats" (replicated, like the ones given): per quantised activation its
    batch count and the sums of its per-batch absmax (or min and max).
  """
  stats = jax.tree.map(jnp.zeros_like, variables[COLLECTION])
  step = jax.jit(lambda s, v, b: _stats_forward(model, {**v, COLLECTION: s}, b))
  with sharding_lib.rules_context(mesh):
    for local in batches:
      stats = step(stats, variables, sharding_lib.shard_batch(local, mesh))
  return jax.device_put(stats, jax.tree.map(lambda a: a.sharding, variables[COLLECTION]))


# --- int8 params: conversion, files ---------------------------------------------------


def quantize(model: nn.Module, variables: dict, act: str, seq_len: int) -> tuple[nn.Module, dict]:
  """Int8 weights + scales of a float or QAT model's variables.

  Args:
    model: the model (float, or ``qat_model``'s).
    variables: unboxed "params", calibrated "quant_stats" (``calibrate``), and a BatchNorm
      model's "batch_stats" (kept as they are).
    act: the activation scheme the statistics were taken with.
    seq_len: T of the dummy input that traces the int8 params' shapes.
  Returns:
    (int8_model(model, act), its variables): params whose kernels are qwix ``WithAux(QArray)``
    (int8 ``qvalue``, float32 ``scale`` per output channel) with each quantised activation's
    float32 ``*_scale`` (and int8 ``*_zero_point`` when asymmetric); "batch_stats" as given.
  """
  int8 = int8_model(model, act)
  abstract = jax.eval_shape(lambda r: init_variables(int8, r, seq_len), jax.random.key(0))
  local = lambda tree: jax.tree.map(lambda a: jnp.asarray(jax.device_get(a)), tree)  # noqa: E731
  params = qwix.quantize_params(
    local(variables["params"]), abstract["params"], local(variables[COLLECTION])
  )
  out = {"params": nn.unbox(params)}
  if "batch_stats" in variables:
    out["batch_stats"] = variables["batch_stats"]
  return int8, jax.device_get(out)


def tensor_name(path: tuple) -> str:
  """'params/block_0/attn/query/kernel/array/qvalue': a flat tensor name of a tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def save(directory: str, variables: dict, section: dict, act: str) -> str:
  """Writes ``quantize``'s variables as DIRECTORY/model.safetensors + int8.json.

  Args:
    directory: local or remote (``gs://``); created if missing; existing files of the same
      names are replaced.
    variables: ``quantize``'s second result.
    section: the model's config section keys (``api.shape_keys``) to rebuild it from.
    act: the activation scheme.
  Returns:
    The path of the safetensors file.
  """
  from safetensors.numpy import save

  paths.makedirs(directory)
  tensors = {
    tensor_name(p): np.ascontiguousarray(np.asarray(a))
    for p, a in jax.tree_util.tree_flatten_with_path(variables)[0]
  }
  path = paths.join(directory, TENSORS_FILE)
  # As bytes through ``paths`` (int8 models are small): the directory may be gs://.
  paths.write_bytes(path, save(tensors))
  meta = {"format": "jaxdistill-int8", "qwix": qwix.__version__, "act": act}
  meta["section"], meta["bytes"] = dict(section), int(sum(t.nbytes for t in tensors.values()))
  paths.write_text(paths.join(directory, CONFIG_FILE), json.dumps(meta, indent=2, sort_keys=True))
  return path
