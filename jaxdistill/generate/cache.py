"""The key/value cache of a decoder: an explicit pytree, sized in buckets, sharded by logical names.

A cache is ``{"layers": ((k_BxGxSxK, v_BxGxSxK) per block), "lengths": int32 [B]}``: G key/value
heads, S slots (its capacity) of width K, and per row the number of tokens cached so far.
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
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import CACHE_AXES
from jaxdistill.models.transformer_config import TransformerConfig

# The slot axis of a cache tensor [B, G, S, K]: heads before slots, so attention's einsums are
# batched over (B, G) and read the cache in place (``models.layers.Attention._cached``).
SLOT_AXIS = 2
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
  kv = jax.ShapeDtypeStruct((batch, config.kv_heads, capacity, config.head_dim), dtype)
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


def from_keys_values(
  kv_per_layer: Sequence[tuple[jax.Array, jax.Array]],
  capacity: int,
  dtype: Any,
  config: TransformerConfig,
) -> dict:
  """A cache holding the keys/values of T tokens per row in slots 0 .. T - 1 (lengths 0).

  Args:
    kv_per_layer: per block (k_BxTxHxK, v_BxTxHxK) as the model's ``qkv`` output gives them
      (after RoPE; with grouped-query attention repeated to H heads: every group-th is kept).
    capacity: S >= T.
    dtype: the cache's dtype.
    config: the decoder's config.
  """
  group = config.num_heads // config.kv_heads

  def slots(x_BxTxHxK):
    x_BxGxTxK = x_BxTxHxK[:, :, ::group].transpose(0, 2, 1, 3).astype(dtype)
    extra = capacity - x_BxGxTxK.shape[SLOT_AXIS]
    return jnp.pad(x_BxGxTxK, ((0, 0), (0, 0), (0, extra), (0, 0)))

  layers = tuple((slots(k), slots(v)) for k, v in kv_per_layer)
  lengths = jnp.zeros((layers[0][0].shape[0],), jnp.int32)
  return constrain({"layers": layers, "lengths": lengths})


def constrain(cache: dict) -> dict:
  """``cache`` with its logical sharding (a no-op outside a rules context)."""
  layers = tuple(
    tuple(nn.with_logical_constraint(x, CACHE_AXES) for x in kv) for kv in cache["layers"]
  )
  return {"layers": layers, "lengths": cache["lengths"]}


def grow(cache: dict, capacity: int) -> dict:
  """``cache`` moved into ``capacity`` >= its own slots (new slots are zeros)."""

  def pad(x_BxGxSxK):
    extra = capacity - x_BxGxSxK.shape[SLOT_AXIS]
    return jnp.pad(x_BxGxSxK, ((0, 0), (0, 0), (0, extra), (0, 0)))

  return constrain({"layers": jax.tree.map(pad, cache["layers"]), "lengths": cache["lengths"]})


def capacity_of(cache: dict) -> int:
  """S, the cache's slots."""
  return cache["layers"][0][0].shape[SLOT_AXIS]


def nbytes(cache: dict) -> int:
  """Bytes of the cache's key/value tensors."""
  return sum(x.size * x.dtype.itemsize for kv in cache["layers"] for x in kv)
