"""Fused loss head: KL and CE from hidden states and output heads, one chunk of logits at a time.

The dense path builds the student and teacher logits [N, V] in float32, their softmaxes and the
logits' gradient: several [N, V] buffers, which at a 128k vocabulary dominate memory. Here the
logits only ever exist one chunk at a time, inside a ``jax.custom_vjp``:

* Token chunks (the default): each chunk of rows sees the WHOLE vocabulary, so its softmaxes,
  loss and logit gradient dZ are known at once. The forward pass therefore also forms the
  gradients dH = dZ W^T and dW = H^T dZ (as Liger-Kernel does) and the backward pass only scales
  them by the incoming cotangent: the 4 head matmuls of the dense path (teacher forward, student
  forward, student dH and dW), no recomputation. Forward KL and CE use their closed-form
  gradient; reverse KL and JSD that of autodiff through ``losses.LOGIT_DIVERGENCES``.
* Vocabulary chunks (``vocab_chunk`` > 0, forward KL only), for when even one token chunk of
  full-vocabulary logits is too large: pass 1 streams over vocab chunks keeping per-chunk maxima
  and exp-sums of the student (at tau and at 1) and teacher, the teacher-weighted logit gap and
  the target logit, then combines them into logsumexps and KL = a / s_t - lse_t + lse_s
  (derived in docs/fused_head.md); pass 2 recomputes each chunk's logits to form dZ, dH and
  dW. That is 6 head matmuls (+50% head FLOPs); it composes with token chunks (one pass pair
  per chunk).

Sharding: rows are split per batch shard and vocabulary columns per vocab shard (logical axes
``act_batch`` and ``vocab`` of ``sharding.LOGICAL_RULES``), so every chunk holds rows of every
batch shard and columns of every vocab shard and no device idles or gathers logits. The head's
gradient is accumulated per batch shard and reduced once at the end, not once per chunk.

Conventions as ``losses.py``: every term is sum over valid tokens of weight * per-token loss
divided by the caller's GLOBAL ``denom``; padded rows are zeroed before any math (garbage there
changes nothing); KL is scaled by tau^2; CE is hard-label at temperature 1; all math is float32.
Unlike the dense path, logits are accumulated in float32 even for a bf16 compute dtype (the
dense path rounds them to the model's output dtype first).

Shape legend: N tokens (batch x length, flattened), Ds / Dt student / teacher width, V
vocabulary, S batch shards, C rows of one token chunk (all shards), K token chunks, U columns of
one vocab chunk (all vocab shards), J vocab chunks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdistill.distill import chunking, closed_form, losses
from jaxdistill.parallel import sharding

F32 = jnp.float32
# Kinds the vocab-chunked (streaming) path implements; token chunks take any LOGIT_DIVERGENCES.
STREAMING_KINDS = ("kl",)


class FusedLoss(NamedTuple):
  """Result of ``fused_loss_head``; only ``loss`` carries gradients.

  Attributes:
    loss: scalar kl_weight * divergence + ce_weight * ce (differentiable).
    divergence: scalar logit divergence (``kind``, x tau^2), sum over tokens / denom, each
      token's weighted by ``divergence_weights_N`` when given.
    ce: scalar hard-label cross-entropy, sum over tokens / denom.
    per_token: {"divergence", "ce", "student_lse" (at T=1), "teacher_lse" (at tau)}, each
      [N] float32, 0 on padded tokens ("teacher_lse" is 0 without a teacher).
  """

  loss: jax.Array
  divergence: jax.Array
  ce: jax.Array
  per_token: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call (hashable: a custom_vjp nondiff argument)."""

  kind: str
  beta: float
  token_chunk: int
  vocab_chunk: int
  row_shards: int
  vocab_shards: int
  has_teacher: bool
  hidden_dtype: Any
  head_dtype: Any


def _logits(st: _Static, hs_CxDs, ht_CxDt, w_DsxU, wt_DtxU):
  """Student and teacher logits [C, U] in float32 (the teacher's None without a teacher)."""
  zs_CxU = chunking.constrain(chunking.dot(hs_CxDs, w_DsxU), ("act_batch", "act_vocab"))
  if not st.has_teacher:
    return zs_CxU, None
  return zs_CxU, chunking.constrain(chunking.dot(ht_CxDt, wt_DtxU), ("act_batch", "act_vocab"))


# --- Token chunks with the whole vocabulary ---


def _autodiff_terms(st: _Static, zs_CxU, zt_CxU, y_C, coef_C, scalars, with_grad: bool):
  """Any LOGIT_DIVERGENCES kind: per-token terms and dZ by autodiff of the dense functions."""
  tau, w_div, w_ce = scalars
  ids_U = jnp.arange(zs_CxU.shape[1])
  extra = (st.beta,) if st.kind == "jsd" else ()

  def weighted(zs_CxU):
    lse_C = jax.nn.logsumexp(zs_CxU, axis=-1)
    ce_C = lse_C - jnp.sum(jnp.where(ids_U == y_C[:, None], zs_CxU, 0.0), axis=-1)
    div_C = losses.LOGIT_DIVERGENCES[st.kind](zs_CxU, zt_CxU, tau, *extra)
    return jnp.sum(coef_C * (w_div * div_C + w_ce * ce_C)), (div_C, ce_C, lse_C)

  lse_t_C = jax.nn.logsumexp(zt_CxU / tau, axis=-1)
  if not with_grad:
    return (*weighted(zs_CxU)[1], lse_t_C), None
  (_, terms), dz_CxU = jax.value_and_grad(weighted, has_aux=True)(zs_CxU)
  return (*terms, lse_t_C), dz_CxU


def _full_vocab_chunk(st: _Static, heads, dw_acc, xs, scalars, with_grad: bool):
  """One token chunk against the whole vocabulary: (dw_acc + its dW, per-token terms, dH).

  Forward KL and CE use the closed form (fewer live [C, V] buffers than autodiff).
  """
  hs_CxDs, ht_CxDt, y_C, coef_C = xs
  zs_CxU, zt_CxU = _logits(st, hs_CxDs, ht_CxDt, *heads)
  if st.has_teacher and st.kind not in STREAMING_KINDS:
    per_token, dz_CxU = _autodiff_terms(st, zs_CxU, zt_CxU, y_C, coef_C, scalars, with_grad)
  else:
    ids_U = jnp.arange(zs_CxU.shape[1])
    cols = (ids_U >= 0, ids_U)
    stats_1xC = {
      k: x[None] for k, x in closed_form.chunk_stats(zs_CxU, zt_CxU, cols, y_C, scalars[0]).items()
    }
    per_token, lses = closed_form.finish(st.has_teacher, stats_1xC, scalars[0])
    if with_grad:
      dz_CxU = closed_form.dz(st.has_teacher, zs_CxU, zt_CxU, cols, y_C, coef_C, lses, scalars)
  if not with_grad:
    return dw_acc, per_token, None
  # dW in column blocks: no [Ds, V] temporary beside the accumulator.
  c, v = dz_CxU.shape
  size = v // st.vocab_shards // chunking.column_blocks(v // st.vocab_shards, c, hs_CxDs.shape[1])
  dz_CxTxV = dz_CxU.reshape((c, st.vocab_shards, -1) if st.vocab_shards > 1 else (c, v))

  def add_block(dw_acc, j):
    dz_CxU = jax.lax.dynamic_slice_in_dim(dz_CxTxV, j * size, size, axis=-1).reshape(c, -1)
    return chunking.add_outer_block(dw_acc, hs_CxDs, dz_CxU, j, size, st.row_shards), None

  count = dz_CxTxV.shape[-1] // size
  dw_acc = jax.lax.scan(add_block, dw_acc, jnp.arange(count))[0]
  return dw_acc, per_token, chunking.dot(dz_CxU, heads[0].T)


# --- Token chunks streamed over vocabulary chunks (forward KL) ---


class _Blocks(NamedTuple):
  """Heads and column ids in ``chunking.vocab_blocks`` layout; J chunks of u columns per shard."""

  student: jax.Array
  teacher: jax.Array | None
  ids: jax.Array
  count: int
  size: int


def _vocab_chunked(st: _Static, blocks: _Blocks, dw_acc, xs, scalars, with_grad: bool):
  """One token chunk, two passes over the J vocab chunks.

  Pass 1 keeps only per-chunk statistics [J, C]; pass 2 recomputes each chunk's logits to
  form dZ, accumulating dH and adding per-shard partial dW into dw_acc (``_dw_zeros``).
  """
  hs_CxDs, ht_CxDt, y_C, coef_C = xs
  chunk_ids = jnp.arange(blocks.count)

  def logits(j):
    heads = [None if b is None else chunking.vocab_block(b, j, blocks.size) for b in blocks[:2]]
    ids_U = chunking.vocab_block(blocks.ids, j, blocks.size)[0]
    return *_logits(st, hs_CxDs, ht_CxDt, *heads), (ids_U >= 0, ids_U), heads[0]

  def stats(_, j):
    zs_CxU, zt_CxU, cols, _ = logits(j)
    return None, closed_form.chunk_stats(zs_CxU, zt_CxU, cols, y_C, scalars[0])

  per_token, lses = closed_form.finish(
    st.has_teacher, jax.lax.scan(stats, None, chunk_ids)[1], scalars[0]
  )
  if not with_grad:
    return dw_acc, per_token, None

  def grads(carry, j):
    dh_CxDs, dw_acc = carry
    zs_CxU, zt_CxU, cols, w_DsxU = logits(j)
    dz_CxU = closed_form.dz(st.has_teacher, zs_CxU, zt_CxU, cols, y_C, coef_C, lses, scalars)
    dw_acc = chunking.add_outer_block(dw_acc, hs_CxDs, dz_CxU, j, blocks.size, st.row_shards)
    return (dh_CxDs + chunking.dot(dz_CxU, w_DsxU.T), dw_acc), None

  (dh_CxDs, dw_acc), _ = jax.lax.scan(grads, (jnp.zeros(hs_CxDs.shape, F32), dw_acc), chunk_ids)
  return dw_acc, per_token, dh_CxDs


# --- Driver: token-chunk scan, custom_vjp ---


def _make_blocks(st: _Static, heads, v: int) -> _Blocks | None:
  if st.vocab_chunk <= 0:
    return None
  block = lambda w, fill: chunking.vocab_blocks(w, st.vocab_shards, st.vocab_chunk, fill)
  (ws, count, size), (ids, _, _) = block(heads[0], 0), block(jnp.arange(v)[None], -1)
  wt = None if heads[1] is None else block(heads[1], 0)[0]
  return _Blocks(ws, wt, ids, count, size)


def _dw_zeros(st: _Static, ds: int, v: int, blocks: _Blocks | None) -> jax.Array:
  """Per-batch-shard partial head gradients [S, Ds, (T,) V / T (+ padding)]: each vocab
  shard's columns last, like ``chunking.vocab_blocks``; T is left out when 1."""
  t = st.vocab_shards
  cols = (t, v // t) if t > 1 else (v,)
  if blocks is not None:
    cols = blocks.student.shape[1:]
  names = ("act_batch", None) + (("vocab", None) if t > 1 else (None,))
  return chunking.constrain(jnp.zeros((st.row_shards, ds) + cols, F32), names)


def _dw_total(st: _Static, dw_acc: jax.Array, v: int) -> jax.Array:
  """The ONE reduction over batch shards, back to the head's [Ds, V] (padding dropped)."""
  dw = dw_acc.sum(0)
  ds, t = dw.shape[0], st.vocab_shards
  return dw.reshape(ds, t, -1)[:, :, : v // t].reshape(ds, v)


def _run(st: _Static, args, with_grad: bool):
  """Scans over token chunks; returns (loss, divergence, ce, per_token, dH_NxDs, dW_DsxV)."""
  hs_NxDs, ws_DsxV, ht_NxDt, wt_DtxV, y_N, w_N, a_N, denom, tau, w_div, w_ce = args
  n, v = hs_NxDs.shape[0], ws_DsxV.shape[1]
  valid_N = w_N != 0
  denom = jnp.asarray(denom, F32)
  # As losses._masked_total: padded tokens are selected out, and denom 0 gives 0, not NaN.
  coef_N = jnp.where(valid_N, w_N.astype(F32), 0.0) / jnp.where(denom > 0, denom, 1.0)
  zero_rows = lambda h: None if h is None else jnp.where(valid_N[:, None], h, 0).astype(h.dtype)
  hs_NxDs, ht_NxDt = zero_rows(hs_NxDs), zero_rows(ht_NxDt)
  y_N = jnp.where(valid_N, y_N, 0).astype(jnp.int32)
  rows = lambda x: (
    None if x is None else chunking.split(x, st.row_shards, st.token_chunk, 0, "act_batch")
  )
  a_N = jnp.where(valid_N, jnp.asarray(a_N, F32), 0.0)  # the divergence's per-token factor
  xs = (rows(hs_NxDs), rows(ht_NxDt), rows(y_N), rows(coef_N), rows(a_N))
  # The head is gathered over its width once, outside the loop; its vocab stays sharded.
  heads = [
    None if w is None else chunking.constrain(w, (None, "vocab")) for w in (ws_DsxV, wt_DtxV)
  ]
  scalars = (jnp.asarray(tau, F32), jnp.asarray(w_div, F32), jnp.asarray(w_ce, F32))
  blocks = _make_blocks(st, heads, v)

  def body(dw_acc, x):
    *x, a_C = x  # a per-token divergence weight: w_div [C]
    scalars_c = (scalars[0], scalars[1] * a_C, scalars[2])
    if blocks is not None:
      dw_acc, per_token, dh = _vocab_chunked(st, blocks, dw_acc, x, scalars_c, with_grad)
    else:
      dw_acc, per_token, dh = _full_vocab_chunk(st, heads, dw_acc, x, scalars_c, with_grad)
    return dw_acc, (per_token, dh)

  dw0 = _dw_zeros(st, hs_NxDs.shape[1], v, blocks) if with_grad else None
  dw_acc, (per_token, dh) = jax.lax.scan(body, dw0, xs)
  merge = lambda x: chunking.merge(x, st.row_shards, n)
  names = ("divergence", "ce", "student_lse", "teacher_lse")
  per_token = {k: jnp.where(valid_N, merge(x), 0.0) for k, x in zip(names, per_token)}
  div = jnp.sum(coef_N * a_N * per_token["divergence"])
  ce = jnp.sum(coef_N * per_token["ce"])
  loss = scalars[1] * div + scalars[2] * ce
  if not with_grad:
    return loss, div, ce, per_token, None, None
  return loss, div, ce, per_token, merge(dh), _dw_total(st, dw_acc, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head(st, hs, ws, ht, wt, y, w, a, denom, tau, w_div, w_ce):
  args = (hs, ws, ht, wt, y, w, a, denom, tau, w_div, w_ce)
  return _run(st, args, False)[:4]


def _head_fwd(st, hs, ws, ht, wt, y, w, a, denom, tau, w_div, w_ce):
  args = (hs, ws, ht, wt, y, w, a, denom, tau, w_div, w_ce)
  loss, div, ce, per_token, dh, dw = _run(st, args, True)
  return (loss, div, ce, per_token), (dh, dw, div, ce)


def _head_bwd(st, res, cotangents):
  # Only `loss` is differentiable: the wrapper stops the gradient of the other outputs, so
  # their cotangents are zero, and of the teacher, labels, weights, denom and temperature.
  dh, dw, div, ce = res
  g = cotangents[0]
  d_hs, d_ws = (g * dh).astype(st.hidden_dtype), (g * dw).astype(st.head_dtype)
  return d_hs, d_ws, None, None, None, None, None, None, None, g * div, g * ce


_head.defvjp(_head_fwd, _head_bwd)


def fused_loss_head(
  student_hidden_NxDs: jax.Array,
  student_head_DsxV: jax.Array,
  targets_N: jax.Array,
  weights_N: jax.Array,
  denom,
  *,
  teacher_hidden_NxDt: jax.Array | None = None,
  teacher_head_DtxV: jax.Array | None = None,
  kind: str = "kl",
  temperature=1.0,
  beta: float = 0.5,
  kl_weight=1.0,
  ce_weight=1.0,
  token_chunk: int = 256,
  vocab_chunk: int = 0,
  divergence_weights_N: jax.Array | None = None,
) -> FusedLoss:
  """Weighted logit divergence + CE from final hidden states and heads, never all logits.

  Logits are hidden @ head (float32 accumulation). Gradients flow to the student's hidden
  states and head only (through ``loss``); a tied head (embedding.T) gets its gradient back
  through the transpose as usual. Under a mesh with ``sharding.rules_context`` the rows split
  over the ``act_batch`` axes and the vocabulary over ``vocab``'s; memory per device is then
  about token_chunk x V / tensor (or x vocab_chunk) float32 per live logits buffer.

  Args:
    student_hidden_NxDs: [N, Ds] student final hidden states (any float dtype).
    student_head_DsxV: [Ds, V] student output head.
    targets_N: [N] int labels in [0, V) (padded entries may hold anything).
    weights_N: [N] validity mask / per-token weights, as ``losses`` (0 = padding).
    denom: scalar GLOBAL number of valid tokens (0 gives loss 0 and zero gradients).
    teacher_hidden_NxDt: [N, Dt] teacher final hidden states, or None for CE only.
    teacher_head_DtxV: [Dt, V] teacher output head (same V), or None.
    kind: a ``losses.LOGIT_DIVERGENCES`` key; with vocab_chunk > 0 only "kl".
    temperature: scalar tau > 0 of the divergence (may be traced; no gradient).
    beta: JSD mixture weight (static float).
    kl_weight, ce_weight: scalar weights of the two terms in ``loss`` (may be traced).
    token_chunk: rows per chunk per batch shard; 0 = all rows in one chunk.
    vocab_chunk: columns per chunk per vocab shard; 0 = the whole vocabulary per chunk.
    divergence_weights_N: [N] per-token factors of the divergence in ``loss`` (no gradient;
      ``distill.adaptive``, adaptive.py), or None (all 1). CE is not weighted by them.

  Returns:
    ``FusedLoss``: loss, divergence and ce scalars, per-token values [N].
  """
  hs, ws, ht, wt = student_hidden_NxDs, student_head_DsxV, teacher_hidden_NxDt, teacher_head_DtxV
  _check_arguments(kind, hs, ws, ht, wt, token_chunk, vocab_chunk)
  st = _Static(
    kind=kind,
    beta=float(beta),
    token_chunk=int(token_chunk),
    vocab_chunk=int(vocab_chunk),
    row_shards=sharding.logical_shards("act_batch", hs.shape[0]),
    vocab_shards=sharding.logical_shards("vocab", ws.shape[1]),
    has_teacher=ht is not None,
    hidden_dtype=jnp.dtype(hs.dtype),
    head_dtype=jnp.dtype(ws.dtype),
  )
  sg = lambda x: None if x is None else jax.lax.stop_gradient(jnp.asarray(x))
  f32 = lambda x: jnp.asarray(x, F32)
  loss, div, ce, per_token = _head(
    st,
    hs,
    ws,
    sg(ht),
    sg(wt),
    sg(targets_N),
    sg(weights_N),
    sg(f32(1.0 if divergence_weights_N is None else divergence_weights_N)),
    sg(f32(denom)),
    sg(f32(temperature)),
    f32(kl_weight if st.has_teacher else 0.0),
    f32(ce_weight),
  )
  return FusedLoss(loss, sg(div), sg(ce), jax.tree.map(sg, per_token))


def _check_arguments(kind, hs, ws, ht, wt, token_chunk, vocab_chunk) -> None:
  if kind not in losses.LOGIT_DIVERGENCES:
    raise ValueError(f"unknown logit loss kind {kind!r}; valid: {sorted(losses.LOGIT_DIVERGENCES)}")
  if (ht is None) != (wt is None):
    raise ValueError("pass both teacher_hidden_NxDt and teacher_head_DtxV, or neither")
  if vocab_chunk > 0 and ht is not None and kind not in STREAMING_KINDS:
    raise ValueError(f"vocab_chunk > 0 streams only {STREAMING_KINDS}, not {kind!r}; use 0")
  if token_chunk < 0 or vocab_chunk < 0:
    raise ValueError(f"chunk sizes must be >= 0, got {token_chunk=} {vocab_chunk=}")
  if ht is not None and (ht.shape[0] != hs.shape[0] or wt.shape[1] != ws.shape[1]):
    raise ValueError(
      f"teacher hidden/head {ht.shape}/{wt.shape} do not match the student's "
      f"{hs.shape}/{ws.shape} (N, V)"
    )
