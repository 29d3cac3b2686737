"""Sparse teacher targets: top-k and sampled, made from a teacher's head and used in the loss.

Both sides work from final hidden states and output heads one chunk of tokens at a time, so
[tokens x vocab] logits never exist in full (as ``fused.py``):

* ``teacher_targets`` (the teacher, no gradient): per token the top-k log-probs at the generation
  temperature tau with their ids, the tail mass 1 - sum(top-k probs) in float32 (computed as
  -expm1(logsumexp(top-k log-probs)) so it keeps its digits when tiny), and optionally ``n``
  draws from the teacher distribution at tau stored as unique ids + counts (count 0 pads). Each
  token's draws use the key fold_in(fold_in(key(seed), row), position): a pure function of where
  the token is in the dataset, never of the batch it was computed in, so a resumed or re-sharded
  precompute writes the same bytes.
* ``sparse_loss_head`` (the student): full-vocabulary logsumexps at 1 and at tau, the target logit
  and the logits at the stored ids, from one chunk scan whose body is rematerialised in the
  backward pass (only the chunk's [C, V] logits are ever live). The divergences then work on
  [N, k] arrays:

    topk_renorm  KL between teacher and student both renormalised over the k ids (the peers'
                 baseline: biased, the student's mass outside the ids is never penalised)
    topk_tail    KL over k + 1 classes, the last one the tail: teacher's stored tail mass,
                 student's 1 - sum q at the ids as log1p(-s) in float32 with s clamped below 1
    sampled      -sum_v (c_v / n) log q_v: an unbiased estimate of the soft cross-entropy
                 -sum_v p_v log q_v and of its gradient (Anshumann et al., ACL 2025)

Conventions as ``losses.py`` / ``fused.py``: each term is sum over valid tokens of weight x
per-token value over the caller's GLOBAL ``denom``; divergences are scaled by tau^2; CE is
hard-label at temperature 1; all math is float32.

Shape legend: N tokens, D hidden width, V vocabulary, K stored top-k ids, M stored sampled
ids (a per-token maximum; count 0 pads), C rows of one token chunk.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxdistill.distill import chunking, ensemble
from jaxdistill.parallel import sharding

F32 = jnp.float32
SPARSE_KINDS = ("topk_renorm", "topk_tail", "sampled")
TOPK_KINDS = ("topk_renorm", "topk_tail")
# Student tail mass is clamped to at least this, so log1p(-s) stays finite.
MIN_TAIL = 2.0**-24


class SparseLoss(NamedTuple):
  """Result of ``sparse_loss_head``; only ``loss`` carries gradients (scalars, float32)."""

  loss: jax.Array
  divergence: jax.Array
  ce: jax.Array


# --- teacher side -----------------------------------------------------------------------


def unique_counts(draws_NxS: jax.Array) -> tuple[jax.Array, jax.Array]:
  """n draws per token -> (unique ids [N, S] ascending then 0-padded, counts [N, S] int32)."""
  sorted_NxS = jnp.sort(draws_NxS, axis=1)
  first_NxS = jnp.concatenate(
    [jnp.ones_like(sorted_NxS[:, :1], bool), sorted_NxS[:, 1:] != sorted_NxS[:, :-1]], axis=1
  )
  counts_NxS = jnp.sum(sorted_NxS[:, :, None] == sorted_NxS[:, None, :], axis=2)
  counts_NxS = jnp.where(first_NxS, counts_NxS, 0).astype(jnp.int32)
  # First occurrences to the front, in ascending id order (a stable sort on "not first").
  order_NxS = jnp.argsort(~first_NxS, axis=1, stable=True)
  ids_NxS = jnp.take_along_axis(sorted_NxS, order_NxS, axis=1)
  counts_NxS = jnp.take_along_axis(counts_NxS, order_NxS, axis=1)
  return jnp.where(counts_NxS > 0, ids_NxS, 0), counts_NxS


def _targets_of_chunk(z_CxV, row_C, pos_C, k: int, samples: int, seed: int):
  """Targets of one token chunk from its teacher logits at tau, z_CxV = logits / tau."""
  lse_C = jax.nn.logsumexp(z_CxV, axis=-1)
  out = {}
  if k:
    top_CxK, ids_CxK = jax.lax.top_k(z_CxV, k)
    logp_CxK = top_CxK - lse_C[:, None]
    out.update(
      topk_ids=ids_CxK.astype(jnp.int32),
      topk_logp=logp_CxK,
      tail=jnp.maximum(-jnp.expm1(jax.nn.logsumexp(logp_CxK, axis=-1)), 0.0),
    )
  if samples:
    base, v = jax.random.key(seed), z_CxV.shape[1]

    def draw(row, pos, p_V):
      # Inverse CDF: n uniforms per token, not the n x V Gumbel draws of categorical().
      key = jax.random.fold_in(jax.random.fold_in(base, row), pos)
      cdf_V = jnp.cumsum(p_V)
      u_S = jax.random.uniform(key, (samples,)) * cdf_V[-1]
      return jnp.minimum(jnp.searchsorted(cdf_V, u_S, side="right"), v - 1)

    p_CxV = jnp.exp(z_CxV - lse_C[:, None])
    ids, counts = unique_counts(jax.vmap(draw)(row_C, pos_C, p_CxV))
    out.update(sample_ids=ids.astype(jnp.int32), sample_counts=counts)
  return out


def teacher_targets(
  hidden_NxD: jax.Array | tuple[jax.Array, ...],
  head_DxV: jax.Array | tuple[jax.Array, ...],
  row_N: jax.Array | None = None,
  pos_N: jax.Array | None = None,
  *,
  temperature: float,
  k: int,
  samples: int = 0,
  seed: int = 0,
  token_chunk: int = 256,
  mix: tuple[str, tuple[float, ...]] | None = None,
) -> dict[str, jax.Array]:
  """The teacher's sparse targets, one chunk of logits at a time.

  Args:
    hidden_NxD, head_DxV: the teacher's final hidden states and output head; for an
      ensemble, tuples of each teacher's ([N, D_k] and [D_k, V]).
    mix: an ensemble's (how, weights) (``ensemble.mix_logits``): each token chunk's
      teachers' logits are combined before its targets are taken. None: one teacher.
    row_N, pos_N: int32 dataset row and position of each token (they key the sampling);
      only needed with samples > 0 (top-k targets of an online teacher pass None).
    temperature: generation temperature tau (static or traced).
    k: top-k size (0 = none); samples: draws per token n (0 = none); seed: sampling seed.
    token_chunk: rows per chunk per batch shard (0 = one chunk).

  Returns:
    A dict with (k > 0) ``topk_ids`` [N, K] int32, ``topk_logp`` [N, K] f32 (log-probs at tau,
    descending), ``tail`` [N] f32; (samples > 0) ``sample_ids`` [N, S] int32 and
    ``sample_counts`` [N, S] int32 (unique ids first, count 0 pads; S = n).
  """
  one = not isinstance(hidden_NxD, tuple)
  hiddens = tuple(jax.lax.stop_gradient(h) for h in ((hidden_NxD,) if one else hidden_NxD))
  heads = tuple(
    chunking.constrain(jax.lax.stop_gradient(w), (None, "vocab"))
    for w in ((head_DxV,) if one else head_DxV)
  )
  n, tau, m = hiddens[0].shape[0], jnp.asarray(temperature, F32), len(hiddens)

  def scaled_logits(hs_C):  # [C, V] logits / tau of the teacher or the ensemble
    zs = [chunking.dot(h, w) for h, w in zip(hs_C, heads)]
    return zs[0] / tau if mix is None else ensemble.mix_logits(zs, mix[1], tau, mix[0]) / tau

  shards = sharding.logical_shards("act_batch", n)
  if row_N is None or pos_N is None:
    if samples:
      raise ValueError("samples > 0 needs row_N and pos_N (they key each token's draws)")
    fn = lambda x: _targets_of_chunk(scaled_logits(x), None, None, k, 0, seed)
    return chunking.map_chunks(fn, shards, token_chunk, hiddens, n)
  fn = lambda x: _targets_of_chunk(scaled_logits(x[:m]), *x[m:], k, samples, seed)
  return chunking.map_chunks(fn, shards, token_chunk, (*hiddens, row_N, pos_N), n)


# --- student side -----------------------------------------------------------------------


def student_logits(hidden_NxD, head_DxV, targets_N, ids_NxK, tau, token_chunk: int = 256):
  """Full logsumexps and gathered logits of the student, differentiable, chunk by chunk.

  Args:
    hidden_NxD, head_DxV: student final hidden states and head.
    targets_N: [N] int labels (for CE).
    ids_NxK: [N, K] int ids whose logits are wanted (stored top-k and/or sampled ids).
    tau: temperature of ``lse_tau``.

  Returns:
    (lse1_N, lse_tau_N, z_target_N, z_ids_NxK): float32; ``z_*`` are raw logits (at T=1).
  """
  n = hidden_NxD.shape[0]
  head_DxV = chunking.constrain(head_DxV, (None, "vocab"))

  @jax.checkpoint  # the backward pass recomputes the chunk's logits instead of storing them
  def chunk(x):
    h_CxD, y_C, ids_CxK = x
    z_CxV = chunking.dot(h_CxD, head_DxV)
    return (
      jax.nn.logsumexp(z_CxV, axis=-1),
      jax.nn.logsumexp(z_CxV / tau, axis=-1),
      jnp.take_along_axis(z_CxV, y_C[:, None], axis=1)[:, 0],
      jnp.take_along_axis(z_CxV, ids_CxK, axis=1),
    )

  # lax.map is a scan: with the checkpointed body only the hidden chunks are saved.
  xs = (hidden_NxD, targets_N.astype(jnp.int32), ids_NxK.astype(jnp.int32))
  return chunking.map_chunks(chunk, sharding.logical_shards("act_batch", n), token_chunk, xs, n)


def divergence_per_token(kind: str, logq_NxK: jax.Array, teacher: dict) -> jax.Array:
  """Per-token sparse divergence (NOT scaled by tau^2) from the student's log-probs at the ids.

  Args:
    kind: one of ``SPARSE_KINDS``.
    logq_NxK: [N, K] student log-probs at tau at the stored ids (``topk_ids`` for the top-k
      kinds, ``sample_ids`` for sampled).
    teacher: ``topk_logp`` [N, K] and ``tail`` [N] (top-k kinds) or ``sample_counts`` [N, M].

  Returns:
    [N] float32.
  """
  logq = logq_NxK.astype(F32)
  if kind == "sampled":
    c_NxM = teacher["sample_counts"].astype(F32)
    n_N = jnp.maximum(jnp.sum(c_NxM, axis=1), 1.0)
    return -jnp.sum(jnp.where(c_NxM > 0, c_NxM * logq, 0.0), axis=1) / n_N
  logp = teacher["topk_logp"].astype(F32)
  if kind == "topk_renorm":
    logp = logp - jax.nn.logsumexp(logp, axis=1, keepdims=True)
    logq = logq - jax.nn.logsumexp(logq, axis=1, keepdims=True)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=1)
  if kind != "topk_tail":
    raise ValueError(f"unknown sparse kind {kind!r}; valid: {SPARSE_KINDS}")
  head = jnp.sum(jnp.exp(logp) * (logp - logq), axis=1)
  p_tail = jnp.clip(teacher["tail"].astype(F32), 0.0, 1.0)
  s = jnp.minimum(jnp.sum(jnp.exp(logq), axis=1), 1.0 - MIN_TAIL)
  logq_tail = jnp.log1p(-s)
  safe = jnp.where(p_tail > 0, p_tail, 1.0)
  return head + jnp.where(p_tail > 0, p_tail * (jnp.log(safe) - logq_tail), 0.0)


def stored_ids(kind: str, teacher: dict) -> jax.Array:
  """The ids a kind's loss reads: [N, K] ``topk_ids`` or [N, M] ``sample_ids``."""
  return teacher["sample_ids"] if kind == "sampled" else teacher["topk_ids"]


def sparse_loss_head(
  hidden_NxD: jax.Array,
  head_DxV: jax.Array,
  targets_N: jax.Array,
  weights_N: jax.Array,
  denom,
  teacher: dict[str, Any],
  *,
  kind: str,
  temperature=1.0,
  kl_weight=1.0,
  ce_weight=0.0,
  token_chunk: int = 256,
) -> SparseLoss:
  """Weighted sparse divergence + CE of the student against stored teacher targets.

  Args:
    hidden_NxD, head_DxV: student final hidden states [N, D] and head [D, V].
    targets_N, weights_N: labels and weights [N] (0 = padding).
    denom: GLOBAL valid-token count.
    teacher: flat [N, ...] arrays as ``teacher_targets`` returns (only the kind's keys read).
    kind: one of ``SPARSE_KINDS``.
    temperature: tau, the temperature the targets were generated at.
    kl_weight, ce_weight: weights of the two terms in ``loss``.
    token_chunk: rows per chunk per batch shard (0 = one chunk).

  Returns:
    ``SparseLoss``: weighted loss, divergence (x tau^2) and CE, sums over tokens / denom.
  """
  tau = jnp.asarray(temperature, F32)
  valid_N = weights_N != 0
  ids = jnp.where(valid_N[:, None], stored_ids(kind, teacher), 0)
  y_N = jnp.where(valid_N, targets_N, 0)
  hidden_NxD = jnp.where(valid_N[:, None], hidden_NxD, 0).astype(hidden_NxD.dtype)
  lse1, lse_tau, z_y, z_ids = student_logits(hidden_NxD, head_DxV, y_N, ids, tau, token_chunk)
  per_token = divergence_per_token(kind, z_ids / tau - lse_tau[:, None], teacher) * tau**2
  denom = jnp.asarray(denom, F32)
  coef_N = jnp.where(valid_N, weights_N.astype(F32), 0.0) / jnp.where(denom > 0, denom, 1.0)
  div = jnp.sum(coef_N * jnp.where(valid_N, per_token, 0.0))
  ce = jnp.sum(coef_N * jnp.where(valid_N, lse1 - z_y, 0.0))
  loss = jnp.asarray(kl_weight, F32) * div + jnp.asarray(ce_weight, F32) * ce
  sg = jax.lax.stop_gradient
  return SparseLoss(loss, sg(div), sg(ce))
