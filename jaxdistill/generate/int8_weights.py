"""Weight-only int8 decoding: int8 kernels with per-output-channel scales, dequantised per matmul.

  model8, variables8 = int8_weights.quantize(model, variables)
  Sampler(model8, variables8, tokenizer).generate(...)   # or decode.Decoder(model8, ...)

Every ``EinsumDense`` kernel of the blocks (attention q/k/v/out, the MLP) is stored as int8
(``round(w / scale)``, scale = max |w| over the contracted axes / 127, one per output channel)
in ``params`` under its own name, its scales in the ``int8_scale`` collection; activations stay
in the compute dtype. The matmul reads the int8 kernel, converts it and scales the output
(``(x @ w_int8) * scale``; equal to ``x @ (w_int8 * scale)`` because the scale only depends on
the output channel). Embeddings, norms and the vocabulary head stay float. What it buys depends
on whether the backend fuses the conversion into the matmul: ``benchmarks/decode.py`` measures
it against float (see BENCHMARKS.md, "Decode").
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models import layers, scan

SCALES = "int8_scale"


def _free_axes(equation: str) -> tuple[tuple[int, ...], bool]:
  """The kernel's contracted axes, and whether its free axes end the output in order."""
  inputs, out = equation.split("->")
  x_spec, k_spec = inputs.split(",")
  contracted = tuple(i for i, a in enumerate(k_spec) if a not in out)
  free = "".join(a for a in k_spec if a in out)
  return contracted, out.endswith(free)


def _interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (
    not isinstance(module, layers.EinsumDense)
    or context.method_name != "__call__"
    or not module.has_variable(SCALES, "kernel")
  ):
    return next_fun(*args, **kwargs)
  (x,) = args
  dtype = module.config.dtype
  kernel = module.get_variable("params", "kernel")
  scale = module.get_variable(SCALES, "kernel").astype(dtype)
  y = jnp.einsum(module.equation, x.astype(dtype), kernel.astype(dtype)) * scale
  if module.bias_dims:
    y = y + module.get_variable("params", "bias").astype(y.dtype)
  return y


class Int8Weights(nn.Module):
  """``model`` whose block kernels are read as int8 (variables from ``quantize``)."""

  model: nn.Module

  @property
  def config(self):
    return self.model.config

  def __call__(self, *args, **kwargs):
    with nn.intercept_methods(_interceptor):
      return self.model(*args, **kwargs)


def _equations(model: nn.Module, params: Any) -> dict[tuple[str, ...], str]:
  """The path (in ``params``) of every EinsumDense kernel ``model`` calls, with its equation."""
  found = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, layers.EinsumDense) and context.method_name == "__call__":
      found[tuple(m.scope.path)] = m.equation
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 2), jnp.int32)), params)
  return found


def quantize(model: nn.Module, variables: dict) -> tuple[nn.Module, dict]:
  """(``Int8Weights(model)``, its variables) from a float decoder's ``variables``.

  Only kernels whose output ends with their free axes in order (every block projection) are
  quantised; the vocabulary head (read as a plain array) stays float. A ``scan_layers`` model
  is quantised as its unrolled twin (``models.scan``: per-block scales need no stacking).
  """
  if model.config.scan_layers:
    model = model.clone(config=dataclasses.replace(model.config, scan_layers=False))
    variables = scan.unstack_blocks(variables)
  params = nn.unbox(variables["params"])
  equations = _equations(model, params)
  flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  new_params, scales = {}, {}

  def put(tree, path, value):
    for p in path[:-1]:
      tree = tree.setdefault(p, {})
    tree[path[-1]] = value

  for key_path, leaf in flat.items():
    path = tuple(k.key for k in key_path)
    eq = equations.get(path[:-1]) if path[-1] == "kernel" else None
    contracted, ok = _free_axes(eq) if eq else ((), False)
    if ok:
      amax = jnp.max(jnp.abs(leaf.astype(jnp.float32)), axis=contracted)
      scale = jnp.where(amax > 0, amax / 127.0, 1.0)
      expand = jnp.expand_dims(scale, contracted)
      put(new_params, path, jnp.clip(jnp.round(leaf / expand), -127, 127).astype(jnp.int8))
      put(scales, path, scale)
    else:
      put(new_params, path, leaf)
  wrapped = {"model": new_params}
  return Int8Weights(model), {"params": wrapped, SCALES: {"model": scales}}
