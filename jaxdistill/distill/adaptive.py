"""Distillation strength per token (``distill.adaptive``): a weight a_t on each token's logit
divergence, computed in the step from the two models' logits.

Every mode scores each token with a raw r_t >= 0, then normalises over the batch's real tokens
(loss weight m_t != 0) so that their m-weighted mean is 1:

  a_t = r_t * sum_u m_u / sum_u m_u r_u      (a_t = 0 on padding; a_t = 1 if every r_t is 0)

and the head multiplies the divergence of token t by ``distill.logit.weight`` x a_t; CE keeps
its own weight (the two weights are independent in this objective). Modes (p the teacher's
softmax at temperature 1, y the label, D the configured divergence at tau, as the KD term):

  teacher_entropy      r_t = exp(-H(p_t)), H(p) = -sum_v p_v log p_v: trust confident tokens
  teacher_correct      r_t = p_t(y_t): trust the teacher where it puts mass on the true token
  student_teacher_gap  r_t = D_t(z_s, z_t): more KD where the student is furthest away

Everything is float32 and stop-gradient: no gradient flows through a_t. The fused head gets
r_t from ``chunk_scores`` (one token chunk of logits at a time, before its own pass), the dense
head from ``scores``. Docs: docs/losses.md, "Distillation strength per token".
"""

import jax
import jax.numpy as jnp

from jaxdistill.distill import chunking, losses
from jaxdistill.parallel import sharding

F32 = jnp.float32
MODES = ("none", "teacher_entropy", "teacher_correct", "student_teacher_gap")
# Modes that read the student's logits as well as the teacher's.
STUDENT_MODES = ("student_teacher_gap",)


def scores(mode: str, zs_xV, zt_xV, targets_x, *, kind: str, temperature, beta=0.5):
  """Raw per-token scores r [...] (float32, >= 0, no gradient) from [..., V] logits.

  Args:
    mode: a ``MODES`` entry other than "none".
    zs_xV: student logits (read by "student_teacher_gap" only; may be None otherwise).
    zt_xV: teacher logits.
    targets_x: int labels [...] (read by "teacher_correct").
    kind, temperature, beta: the logit divergence (``losses.LOGIT_DIVERGENCES``) and its
      settings ("student_teacher_gap").
  """
  zt_xV = jax.lax.stop_gradient(zt_xV).astype(F32)
  if mode == "student_teacher_gap":
    extra = (beta,) if kind == "jsd" else ()
    zs_xV = jax.lax.stop_gradient(zs_xV).astype(F32)
    r = losses.LOGIT_DIVERGENCES[kind](zs_xV, zt_xV, temperature, *extra)
  else:
    logp_xV = jax.nn.log_softmax(zt_xV, axis=-1)
    if mode == "teacher_entropy":
      p_xV = jnp.exp(logp_xV)
      r = jnp.exp(jnp.sum(jnp.where(p_xV > 0, p_xV * logp_xV, 0.0), axis=-1))
    elif mode == "teacher_correct":  # a masked sum, not a gather: it shards over the vocabulary
      ids_V = jnp.arange(zt_xV.shape[-1])
      r = jnp.exp(jnp.sum(jnp.where(ids_V == targets_x[..., None], logp_xV, 0.0), axis=-1))
    else:
      raise ValueError(f"unknown distill.adaptive {mode!r}; valid: {MODES}")
  return jnp.maximum(jax.lax.stop_gradient(r), 0.0)  # rounding can give a KL of -1e-9


def normalise(r_x: jax.Array, weights_x: jax.Array) -> jax.Array:
  """a = r * sum(m) / sum(m r) over real tokens (m = weights != 0): the m-weighted mean of a is
  1; 0 on padding; 1 everywhere real if no real token scores above 0. No gradient."""
  valid = jnp.asarray(weights_x) != 0
  m = jnp.where(valid, jnp.asarray(weights_x, F32), 0.0)
  r = jnp.where(valid & jnp.isfinite(r_x), jnp.asarray(r_x, F32), 0.0)
  total, scored = jnp.sum(m), jnp.sum(m * r)
  a = jnp.where(scored > 0, r * (total / jnp.where(scored > 0, scored, 1.0)), 1.0)
  return jax.lax.stop_gradient(jnp.where(valid, a, 0.0))


def token_weights(mode: str, zs_xV, zt_xV, targets_x, weights_x, **divergence) -> jax.Array:
  """``normalise(scores(...))``: the per-token multipliers a [...] of the divergence."""
  return normalise(scores(mode, zs_xV, zt_xV, targets_x, **divergence), weights_x)


def chunk_scores(
  mode: str, hs_NxDs, ws_DsxV, ht_NxDt, wt_DtxV, targets_N, *, token_chunk: int, **divergence
) -> jax.Array:
  """``scores`` for the fused head: logits hidden @ head one token chunk at a time (each chunk
  sees the whole vocabulary; float32 accumulation), never all [N, V] at once. The student's
  head matmul runs only for "student_teacher_gap"."""
  n = hs_NxDs.shape[0]
  sg = jax.lax.stop_gradient
  logits = lambda h, w: chunking.constrain(chunking.dot(h, sg(w)), ("act_batch", "act_vocab"))

  def one(xs):
    hs, ht, y = xs
    zs = logits(hs, ws_DsxV) if mode in STUDENT_MODES else None
    return scores(mode, zs, logits(ht, wt_DtxV), y, **divergence)

  xs = (sg(hs_NxDs), sg(ht_NxDt), targets_N.astype(jnp.int32))
  shards = sharding.logical_shards("act_batch", n)
  return chunking.map_chunks(one, shards, token_chunk, xs, n)
