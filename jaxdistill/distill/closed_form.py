"""Forward KL and hard-label CE in closed form, from statistics of chunks of logits.

The fused head (``fused.py``) never holds a row's logits over the whole vocabulary when it
streams over vocabulary chunks, so it keeps per chunk only a few numbers per row (maxima,
exp-sums, the teacher-weighted logit gap, the target logit: ``chunk_stats``), combines them
into logsumexps, KL and CE (``finish``) and forms the logits' gradient from those (``dz``).
A chunk holding the whole vocabulary is the special case of one chunk. The derivation is in
docs/fused_head.md.

Conventions as ``fused.py``: float32; KL is on logits divided by the temperature tau and
scaled by tau^2; CE is at temperature 1. Shape legend: C rows of one token chunk, U columns of
one vocab chunk, J vocab chunks.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _masked_max(x_CxU: jax.Array, valid_U: jax.Array):
  """Row max over the valid columns (-inf if none) and a finite stand-in to subtract, [C, 1]."""
  m_C = jnp.max(jnp.where(valid_U, x_CxU, -jnp.inf), axis=-1)
  return m_C, jnp.where(jnp.isfinite(m_C), m_C, 0.0)[:, None]


def _combine(m_JxC: jax.Array, s_JxC: jax.Array):
  """Per-chunk (max, exp-sum) -> (rescale factors [J, C], max [C], log exp-sum [C])."""
  m_C = jnp.max(m_JxC, axis=0)
  scale_JxC = jnp.exp(m_JxC - m_C)  # a chunk with no valid column has m = -inf: scale 0
  return scale_JxC, m_C, jnp.log(jnp.sum(s_JxC * scale_JxC, axis=0))


def _row_sums(*terms_CxU: jax.Array) -> tuple[jax.Array, ...]:
  """Row sums of several [C, U] terms in ONE reduction (one pass, no materialised terms)."""
  zeros = tuple(jnp.zeros((), F32) for _ in terms_CxU)
  add = lambda a, b: tuple(x + y for x, y in zip(a, b))
  return jax.lax.reduce(terms_CxU, zeros, add, (1,))


def chunk_stats(zs_CxU, zt_CxU, cols, y_C, tau) -> dict[str, jax.Array]:
  """Per-token statistics [C] of one vocab chunk: maxima and exp-sums of the student at 1
  (and, with a teacher, student and teacher at tau), the teacher-weighted gap, the target.

  ``cols`` = (valid_U, ids_U): padded vocab columns are selected out of every sum. max(z / tau)
  = max(z) / tau (tau > 0 and rounding is monotonic), so z / tau is never stored.
  """
  valid_U, ids_U = cols
  masked = lambda x_CxU: jnp.where(valid_U, x_CxU, 0.0)
  m1, safe1 = _masked_max(zs_CxU, valid_U)
  # The target logit by a masked sum, not a gather: it shards over the vocabulary.
  terms = [masked(jnp.exp(zs_CxU - safe1)), jnp.where(ids_U == y_C[:, None], zs_CxU, 0.0)]
  if zt_CxU is not None:
    mt, safe_t = _masked_max(zt_CxU, valid_U)
    s_CxU, t_CxU = zs_CxU / tau, zt_CxU / tau
    et = masked(jnp.exp(t_CxU - safe_t / tau))
    # sum_v exp(t - mt) (t - s); selected, since padded columns would give 0 * inf.
    terms += [masked(jnp.exp(s_CxU - safe1 / tau)), et, masked(et * (t_CxU - s_CxU))]
  sums = _row_sums(*terms)
  stats = dict(m1=m1, s1=sums[0], tgt=sums[1])
  if zt_CxU is not None:
    stats.update(ms=m1 / tau, mt=mt / tau, ss=sums[2], st=sums[3], gap=sums[4])
  return stats


def finish(has_teacher: bool, stats, tau):
  """Chunk statistics [J, C] -> per-token (divergence, ce, lse_1, lse_t) and (lse_s, lse_t, lse_1).

  KL(p||q) = sum_v p_v (t_v - s_v) - lse_t + lse_s on tempered logits (docs/fused_head.md),
  summed as (E_p[t - s] - (max_t - max_s)) - (log S_t - log S_s): the large maxima cancel
  first, so a small KL keeps its relative precision.
  """
  lse_1 = sum(_combine(stats["m1"], stats["s1"])[1:])
  ce_C = lse_1 - stats["tgt"].sum(0)
  if not has_teacher:
    zero_C = jnp.zeros_like(ce_C)
    return (zero_C, ce_C, lse_1, zero_C), (zero_C, zero_C, lse_1)
  _, m_s, log_s = _combine(stats["ms"], stats["ss"])
  scale_t, m_t, log_t = _combine(stats["mt"], stats["st"])
  gap_C = jnp.sum(stats["gap"] * scale_t, 0) / jnp.sum(stats["st"] * scale_t, 0)
  kl_C = (gap_C - (m_t - m_s)) - (log_t - log_s)
  lse_s, lse_t = m_s + log_s, m_t + log_t
  return (kl_C * tau**2, ce_C, lse_1, lse_t), (lse_s, lse_t, lse_1)


def dz(has_teacher: bool, zs_CxU, zt_CxU, cols, y_C, coef_C, lses, scalars):
  """d loss / d student logits: coef (w_kl tau (q - p) + w_ce (softmax(z) - onehot)); w_kl is a
  scalar or one weight per row [C]."""
  valid_U, ids_U = cols
  lse_s, lse_t, lse_1 = lses
  tau, w_div, w_ce = scalars
  dz_CxU = w_ce * (jnp.exp(zs_CxU - lse_1[:, None]) - (ids_U == y_C[:, None]))
  if has_teacher:
    q_CxU = jnp.exp(zs_CxU / tau - lse_s[:, None])
    p_CxU = jnp.exp(zt_CxU / tau - lse_t[:, None])
    # w_div: a scalar, or [C] (a weight per token: distill.adaptive)
    dz_CxU = dz_CxU + jnp.expand_dims(w_div, -1) * tau * (q_CxU - p_CxU)  # d(tau^2 KL)/dz_s
  return jnp.where(valid_U, coef_C[:, None] * dz_CxU, 0.0)
