"""The key/value cache of a decoder: an explicit pytree, sized in buckets, sharded by logical names.

A cache is ``{"layers": ((k_BxSxGxK, v_BxSxGxK) per block), "lengths": int32 [B]}``: S slots
(its capacity), G key/value heads of width K, and per row the number of tokens cached so far.
Rows hold different numbers of tokens (prompts of different lengths, speculative rows that
accepted different counts): row b's tokens are slots 0 .. lengths[b] - 1, and the model writes
new tokens at lengths[b] (``models.layers.write_cache``) and attends only to slots before them
(``models.layers.cache_mask``), so stale slots past a row's length are never read.

Attention reads every slot of the cache it is given, so the decode loop keeps the capacity close
to the tokens so far: capacities are buckets (powers of two, ``bucket``), and ``grow`` moves a
cache into the next bucket when it is full. Decode cost therefore grows with the tokens so far
(at most twice them), not with the longest generation a request allows, and only one program
is compiled per bucket.

The cache's axes carry the activations' logical names (batch over ``data``/``fsdp``, kv heads
over ``tensor``), so it shards through the same rules table as the model.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import ACT_HEADS
from jaxdistill.models.transformer_config import TransformerConfig

# Logical names of a cache tensor's axes [B, S, G, K] (those of the model's q/k/v activations).
CACHE_AXES = ACT_HEADS
MIN_BUCKET = 64


def bucket(needed: int, limit: int, minimum: int = MIN_BUCKET) -> int:
  """The capacity that holds ``needed`` slots: the next power of two >= minimum, at most limit.

  Args:
    needed: slots required (>= 1).
    limit: the most slots a cache may have (the model's max_len).
    minimum: the smallest bucket.
  Returns:
    min(limit, max(minimum, 2 ** ceil(log2(needed)))).
  """
  return min(limit, max(minimum, 1 << max(0, math.ceil(math.log2(max(needed, 1))))))


def cache_shapes(config: TransformerConfig, batch: int, capacity: int, dtype: Any) -> dict:
  """The cache as ``jax.ShapeDtypeStruct``s (see the module docstring)."""
  kv = jax.ShapeDtypeStruct((batch, capacity, config.kv_heads, config.head_dim), dtype)
  return {
    "layers": tuple((kv, kv) for _ in range(config.num_layers)),
    "lengths": jax.ShapeDtypeStruct((batch,), jnp.int32),
  }


def init(config: TransformerConfig, batch: int, capacity: int, dtype: Any = None) -> dict:
  """An empty cache (zeros, lengths 0) of ``batch`` rows and ``capacity`` slots.

  Args:
    config: the decoder's config (G = kv_heads, K = head_dim, one (k, v) per layer).
    batch: B.
    capacity: S.
    dtype: the cache's dtype (default: the model's compute dtype).
  """
  shapes = cache_shapes(config, batch, capacity, dtype or config.dtype)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def constrain(cache: dict) -> dict:
  """``cache`` with its logical sharding (a no-op outside a rules context)."""
  layers = tuple(
    tuple(nn.with_logical_constraint(x, CACHE_AXES) for x in kv) for kv in cache["layers"]
  )
  return {"layers": layers, "lengths": cache["lengths"]}


def grow(cache: dict, capacity: int) -> dict:
  """``cache`` moved into ``capacity`` >= its own slots (new slots are zeros)."""

  def pad(x_BxSxGxK):
    extra = capacity - x_BxSxGxK.shape[1]
    return jnp.pad(x_BxSxGxK, ((0, 0), (0, extra), (0, 0), (0, 0)))

  return constrain({"layers": jax.tree.map(pad, cache["layers"]), "lengths": cache["lengths"]})


def capacity_of(cache: dict) -> int:
  """S, the cache's slots."""
  return cache["layers"][0][0].shape[1]


def nbytes(cache: dict) -> int:
  """Bytes of the cache's key/value tensors."""
  return sum(x.size * x.dtype.itemsize for kv in cache["layers"] for x in kv)
