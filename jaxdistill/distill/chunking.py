"""Chunks of rows that keep every shard busy: the layout the fused and sparse heads share.

A loss head that never builds all [N, V] logits at once walks over chunks of its N rows. Under
a mesh the rows are sharded (logical axis ``act_batch``: shard s holds the contiguous block
s * N/S .. (s + 1) * N/S), so a chunk of consecutive rows would sit on one device while the
others idle. ``split`` instead makes chunk k hold c rows of EACH shard's block, padding every
block on its own, so nothing moves between devices and every device works on every chunk;
``merge`` undoes it. ``map_chunks`` maps a function over the chunks with ``lax.map`` (a scan:
one chunk's intermediates live at a time).

Columns of an output head [D, V] are sharded over the vocabulary (logical axis ``vocab``) the
same way: ``vocab_blocks`` / ``vocab_block`` give chunk j as u columns of EVERY vocab shard.
The head's gradient h^T dz is accumulated per batch shard (``add_outer_block``), so rows are
summed across devices once at the end, not once per chunk.

Shape legend: M rows, F trailing feature axes, S row shards, K chunks, C rows of one chunk
(all shards), N tokens, D hidden width, V vocabulary, T vocab shards, J vocab chunks, u
columns of one vocab chunk per shard, U = T * u.
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


# --- Vocabulary columns: chunks of every vocab shard, head gradients per batch shard ---


def vocab_blocks(w_DxV: jax.Array, shards: int, chunk: int, fill):
  """[D, V] -> ([D, T, J * u] (or [D, J * u] for T = 1), J, u): shard t's columns, padded.

  A reshape (a copy only when a shard's columns need padding to J * u), so the head is not
  duplicated; chunk j is then a dynamic slice of the unsharded last axis (``vocab_block``).
  """
  d, v = w_DxV.shape
  local = v // shards
  count = -(-local // chunk)
  size = -(-local // count)
  w = constrain(w_DxV.reshape(d, shards, local), (None, "vocab", None))
  if count * size != local:
    w = jnp.pad(w, [(0, 0), (0, 0), (0, count * size - local)], constant_values=fill)
  # XLA:CPU copies a slice loop's operand with a unit axis, so drop it when T = 1.
  return (w[:, 0] if shards == 1 else w), count, size


def vocab_block(w: jax.Array, j, size: int) -> jax.Array:
  """Chunk j of ``vocab_blocks``: [D, U] with U = T * u columns."""
  block = jax.lax.dynamic_slice_in_dim(w, j * size, size, axis=w.ndim - 1)
  return constrain(block.reshape(block.shape[0], -1), (None, "vocab"))


def per_shard_outer(h_CxD: jax.Array, dz_CxU: jax.Array, shards: int) -> jax.Array:
  """[S, D, U] per-batch-shard partial sums of h^T dz: summed over rows only within a shard."""
  c = h_CxD.shape[0] // shards
  h_SxCxD = h_CxD.reshape(shards, c, -1)
  dz_SxCxU = dz_CxU.astype(h_CxD.dtype).reshape(shards, c, -1)
  out = jnp.einsum("scd,scu->sdu", h_SxCxD, dz_SxCxU, preferred_element_type=F32)
  return constrain(out, ("act_batch", None, "vocab"))


def add_outer_block(dw_acc, h_CxD, dz_CxU, j, size: int, shards: int) -> jax.Array:
  """dw_acc[..., j * size : (j + 1) * size] += per-shard h^T dz, in place (a dynamic slice).

  dw_acc is [S, D, (T,) J * size]: each vocab shard's columns last, so the slice is local.
  """
  dw = per_shard_outer(h_CxD, dz_CxU, shards).reshape(dw_acc.shape[:-1] + (size,))
  old = jax.lax.dynamic_slice_in_dim(dw_acc, j * size, size, axis=-1)
  return jax.lax.dynamic_update_slice_in_dim(dw_acc, old + dw, j * size, axis=-1)


def column_blocks(v_local: int, rows: int, width: int) -> int:
  """Blocks to split a shard's V columns into when accumulating h^T dz, so that one block of
  the head's gradient [D, u] is no larger than the chunk's logits [C, V]: the smallest count
  >= D / C that divides V exactly (1 if none does, rather than tiny blocks)."""
  target = max(1, -(-width // max(rows, 1)))
  return next((k for k in range(target, 8 * target + 1) if v_local % k == 0), 1)
