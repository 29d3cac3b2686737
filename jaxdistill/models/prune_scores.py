"""Importance scores for structured pruning, from calibration batches (``prune`` does the surgery).

``score(model, variables, batches, method)`` runs the model's own forward (``api.apply``) with a
Flax method interceptor that reads, without changing, the activation of every prunable unit:

  heads     an attention head's output before the out projection (``attn/out``'s input
            [B, T, H, K]); one score per query head and layer
  mlp       an MLP neuron's hidden activation (``mlp/wo``'s input [B, T, F])
  embed     a residual-stream channel: the outputs of every norm that reads the residual stream
            (each block's attn_norm / mlp_norm, the final norm, an encoder's embedding norm),
            their scores summed (Minitron's choice: what the next layers actually read)
  channels  a SimpleCNN conv stage's output channel after its ReLU ([B, H, W, C], stage s)
  fc        a SimpleCNN's fc unit after its ReLU

Methods. "activation" (Minitron, Muralidharan et al. 2024): the mean |activation| over valid
tokens (a head's over its K values too). "gradient" (Michel et al. 2019): each unit's output is
multiplied by a gate of ones, one per example and unit, and the score is the mean over examples of
|d loss / d gate| = |sum over the unit's outputs of grad * activation|, the loss being the model's
cross-entropy on the batch's targets (so encoders, which have none, take "activation" only).
Multiplying by ones leaves the forward exact; "activation" does not even do that.

Valid tokens: ``segment_ids`` != 0 when the batch has them, else ``weights`` > 0. Scores are
NumPy float64 arrays; higher means more important.
"""

import functools
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.distill import losses
from jaxdistill.models import api, layers
from jaxdistill.models.vision_config import VisionConfig

METHODS = ("activation", "gradient")
# Where a site's unit axis is, and which side of the call (input or output) it reads.
_UNIT_AXIS = {"heads": 2, "mlp": 2, "embed": 2, "channels": 3, "fc": 1}


def _site(module: nn.Module) -> tuple[str, Any] | None:
  """(kind, key) of a prunable unit site at ``module``'s call, or None."""
  path = tuple(module.path)
  if isinstance(module, layers.EinsumDense) and path[-2:] == ("attn", "out"):
    return "heads", int(path[0].removeprefix("block_"))
  if isinstance(module, layers.EinsumDense) and path[-2:] == ("mlp", "wo"):
    return "mlp", int(path[0].removeprefix("block_"))
  if isinstance(module, layers.Norm):
    return "embed", "/".join(path)
  if isinstance(module, nn.Conv) and path and path[-1].startswith("conv_"):
    return "channels", int(path[-1].removeprefix("conv_"))
  if isinstance(module, nn.Dense) and path == ("fc",):
    return "fc", 0
  return None


def _gated(x: jax.Array, gate_BxU: jax.Array | None, axis: int) -> jax.Array:
  """``x`` times a [B, U] gate broadcast over every axis but batch and ``axis``."""
  if gate_BxU is None:
    return x
  shape = [1] * x.ndim
  shape[0], shape[axis] = x.shape[0], x.shape[axis]
  return x * gate_BxU.reshape(shape).astype(x.dtype)


def _forward(model, variables, batch, gates):
  """The model's outputs and {(kind, key): activation} of every site (gated by ``gates``)."""
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    site = _site(context.module) if context.method_name == "__call__" else None
    if site is None:
      return next_fun(*args, **kwargs)
    axis, gate = _UNIT_AXIS[site[0]], (gates or {}).get(site)
    if site[0] in ("heads", "mlp"):  # the input of the out / down projection
      x = _gated(args[0], gate, axis)
      found[site] = x
      return next_fun(x, *args[1:], **kwargs)
    y = next_fun(*args, **kwargs)
    if site[0] in ("channels", "fc"):  # what the next layer reads: after the ReLU
      found[site] = _gated(jax.nn.relu(y), gate, axis)
      return _gated(y, gate, axis)
    y = _gated(y, gate, axis)
    found[site] = y
    return y

  with nn.intercept_methods(interceptor):
    out = api.apply(model, variables, batch)
  return out, found


def _valid(batch: dict, vision: bool) -> jax.Array:
  """[B, T] (or [B] for images) float mask of the tokens / images the scores average over."""
  if vision:
    return jnp.asarray(batch.get("weights", jnp.ones(batch["inputs"].shape[:1])), jnp.float32)
  if "segment_ids" in batch:
    return (jnp.asarray(batch["segment_ids"]) != 0).astype(jnp.float32)
  return (jnp.asarray(batch["weights"]) > 0).astype(jnp.float32)


def _activation_sums(model, variables, batch) -> tuple[dict, jax.Array]:
  """({site: sum over valid tokens of |activation| per unit [U]}, number of valid tokens)."""
  vision = api.is_vision(model)
  _, found = _forward(model, variables, batch, None)
  valid = _valid(batch, vision)
  sums = {}
  for site, x in found.items():
    a = jnp.abs(x.astype(jnp.float32))
    if site[0] == "heads":
      a = jnp.mean(a, axis=-1)  # [B, T, H]: mean over the head's K values
    if site[0] == "channels":
      a = jnp.mean(a, axis=(1, 2))  # [B, C]: mean over the map
    w = valid.reshape(valid.shape + (1,) * (a.ndim - valid.ndim))
    sums[site] = jnp.sum(a * w, axis=tuple(range(a.ndim - 1)))
  return sums, jnp.sum(valid)


def _gradient_sums(model, variables, batch) -> tuple[dict, jax.Array]:
  """({site: sum over examples of |d loss / d gate| per unit [U]}, number of examples)."""
  vision = api.is_vision(model)
  _, found = jax.eval_shape(lambda v: _forward(model, v, batch, None), variables)
  b = batch["inputs"].shape[0]
  gates = {s: jnp.ones((b, x.shape[_UNIT_AXIS[s[0]]]), jnp.float32) for s, x in found.items()}
  valid = _valid(batch, vision)

  def loss(gates):
    out, _ = _forward(model, variables, batch, gates)
    logits = out["logits"].astype(jnp.float32)
    if vision:
      logits, targets, valid_bt = logits[:, None], batch["targets"][:, None], valid[:, None]
    else:
      targets, valid_bt = batch["targets"], valid * jnp.asarray(batch["weights"], jnp.float32)
    return losses.cross_entropy(logits, targets, valid_bt, jnp.maximum(jnp.sum(valid_bt), 1.0))[0]

  grads = jax.grad(loss)(gates)
  example = valid if vision else (jnp.sum(valid, axis=1) > 0).astype(jnp.float32)
  sums = {s: jnp.sum(jnp.abs(g) * example[:, None], axis=0) for s, g in grads.items()}
  return sums, jnp.sum(example)


def score(
  model: nn.Module, variables: dict, batches: Iterable[dict], method: str = "activation"
) -> dict[str, Any]:
  """Importance scores of every prunable unit of ``model`` over ``batches``.

  Args:
    model: a transformer (decoder or encoder) or a ``SimpleCNN`` (``api.build``).
    variables: its variables ({"params": ...}), unboxed, on one device (or replicated).
    batches: calibration batches (dicts of NumPy / JAX arrays: "inputs", and "targets",
      "weights", "segment_ids" as the training batches have them).
    method: "activation" or "gradient" (see the module docstring).
  Returns:
    Transformers: {"heads": [L, H], "mlp": [L, F], "embed": [D]}; a SimpleCNN: {"channels":
    {s: [C_s]}, "fc": [cnn_fc]}; float64 NumPy, higher = more important.
  Raises:
    ValueError: an unknown method, "gradient" for an encoder, no batches, a ResNet / WRN.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  cfg = model.config
  if isinstance(cfg, VisionConfig) and cfg.arch != "cnn":
    raise ValueError(f"pruning scores support arch 'cnn' among image models, not {cfg.arch!r}")
  if method == "gradient" and getattr(cfg, "encoder", False):
    raise ValueError("method='gradient' needs a loss on the model's logits; an encoder has none")
  sums_fn = _gradient_sums if method == "gradient" else _activation_sums
  fn = jax.jit(functools.partial(sums_fn, model))
  totals, count = None, 0.0
  for batch in batches:
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    sums, n = jax.device_get(fn(variables, batch))
    totals = sums if totals is None else {s: totals[s] + sums[s] for s in totals}
    count += float(n)
  if totals is None:
    raise ValueError("pruning scores need at least one calibration batch")
  means = {s: np.asarray(v, np.float64) / max(count, 1.0) for s, v in totals.items()}
  return _collect(means, cfg)


def _collect(means: dict, cfg: Any) -> dict[str, Any]:
  """Per-site means -> the per-kind score arrays ``score`` returns."""
  if isinstance(cfg, VisionConfig):
    return {
      "channels": {s: means[("channels", s)] for s in range(1, len(cfg.cnn_channels) + 1)},
      "fc": means[("fc", 0)],
    }
  embed = sum(v for (kind, _), v in means.items() if kind == "embed")
  return {
    "heads": np.stack([means[("heads", i)] for i in range(cfg.num_layers)]),
    "mlp": np.stack([means[("mlp", i)] for i in range(cfg.num_layers)]),
    "embed": np.asarray(embed, np.float64),
  }
