"""Chunks of rows that keep every shard busy: the layout the fused and sparse heads share.

A loss head that never builds all [N, V] logits at once walks over chunks of its N rows. Under
a mesh the rows are sharded (logical axis ``act_batch``: shard s holds the contiguous block
s * N/S .. (s + 1) * N/S), so a chunk of consecutive rows would sit on one device while the
others idle. ``split`` instead makes chunk k hold c rows of EACH shard's block, padding every
block on its own, so nothing moves between devices and every device works on every chunk;
``merge`` undoes it. ``map_chunks`` maps a function over the chunks with ``lax.map`` (a scan:
one chunk's intermediates live at a time).

Shape legend: M rows, F trailing feature axes, S row shards, K chunks, C rows of one chunk
(all shards), N tokens, D hidden width, V vocabulary.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

F32 = jnp.float32


def constrain(x: jax.Array, names: tuple) -> jax.Array:
  """``x`` laid out by the logical axis ``names`` (a no-op without active rules)."""
  return nn.with_logical_constraint(x, names)


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b in b's dtype with float32 accumulation and result.

  Args:
    a: [..., D] (e.g. hidden states, or dZ entering in the head's dtype).
    b: [D, U] (e.g. an output head).

  Returns:
    [..., U] float32.
  """
  return jnp.matmul(a.astype(b.dtype), b, preferred_element_type=F32)


def split(x_MxF: jax.Array, shards: int, chunk: int, fill, name: str) -> jax.Array:
  """[M, ...] -> [K, shards * c, ...]: chunk k holds c rows of EACH shard's block.

  Args:
    x_MxF: [M, ...] rows, M divisible by ``shards`` (``sharding.logical_shards`` ensures it).
    shards: row shards S (1 without a mesh).
    chunk: rows per chunk per shard; <= 0 gives one chunk. Chunks are balanced, so the
      padding is under K rows per shard.
    fill: value of the padding rows.
    name: the logical axis the rows are sharded over (e.g. ``act_batch``).

  Returns:
    [K, S * c, ...] with K = ceil((M / S) / chunk) and c = ceil((M / S) / K).
  """
  m, rest = x_MxF.shape[0], x_MxF.shape[1:]
  local = m // shards
  count = 1 if chunk <= 0 else -(-local // chunk)
  size = -(-local // count)  # balanced chunks: padding < count rows per shard
  none = (None,) * len(rest)
  x = constrain(x_MxF.reshape(shards, local, *rest), (name, None) + none)
  x = jnp.pad(x, [(0, 0), (0, count * size - local)] + [(0, 0)] * len(rest), constant_values=fill)
  x = x.reshape(shards, count, size, *rest).swapaxes(0, 1)
  return constrain(x.reshape(count, shards * size, *rest), (None, name) + none)


def merge(x_KxCxF: jax.Array, shards: int, m: int) -> jax.Array:
  """Inverse of ``split``: [K, shards * c, ...] -> [m, ...] without the padding."""
  count, width, rest = x_KxCxF.shape[0], x_KxCxF.shape[1], x_KxCxF.shape[2:]
  x = x_KxCxF.reshape(count, shards, width // shards, *rest).swapaxes(0, 1)
  x = x.reshape(shards, count * (width // shards), *rest)[:, : m // shards]
  return x.reshape(m, *rest)


def map_chunks(fn: Callable, row_shards: int, token_chunk: int, xs: tuple, n: int):
  """Maps ``fn`` over token chunks of the [N, ...] arrays ``xs`` (rows over ``act_batch``).

  Args:
    fn: takes a tuple of [C, ...] chunks (one per array of ``xs``), returns a pytree of
      [C, ...] arrays.
    row_shards: shards of the rows (``sharding.logical_shards("act_batch", n)``).
    token_chunk: rows per chunk per shard (0 = one chunk).
    xs: tuple of [N, ...] arrays.
    n: N.

  Returns:
    ``fn``'s pytree with every leaf [N, ...] (padding rows dropped).
  """
  outs = jax.lax.map(fn, tuple(split(x, row_shards, token_chunk, 0, "act_batch") for x in xs))
  return jax.tree.map(lambda y: merge(y, row_shards, n), outs)
