"""Distillation and task losses: logit divergences, MiniLM relations, hidden states.

Shape legend: B batch, T sequence length (queries and keys), V vocabulary,
H attention heads, K head dim, D hidden width (Ds student, Dt teacher).

Conventions shared by every loss here:

* Each loss returns ``(loss, metrics)``: ``loss`` is a float32 scalar, the sum over
  valid tokens of a per-token loss divided by ``denom``; ``metrics`` is a dict of
  float32 scalars named ``distill/...`` or ``task/...``.
* ``denom`` is the caller's GLOBAL count of valid tokens (over devices and
  gradient-accumulation micro-batches); no loss takes its own mean, so summed
  micro-batch losses give the exact global mean. ``denom`` = 0 gives loss 0 with
  zero gradients, not NaN.
* ``mask_BxT`` is bool or float (1 valid, 0 padding); other non-zero float values
  act as per-token weights. Padded inputs are replaced by zeros with ``jnp.where``
  BEFORE any math, so garbage/inf/NaN there changes neither loss nor gradients.
* All math is float32 whatever the input dtype; teacher inputs get stop_gradient.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32
LossAndMetrics = tuple[jax.Array, dict[str, jax.Array]]

# Stand-in for -inf when masking relation scores: exp() of it underflows to exactly
# 0 after max-subtraction, yet differences of two masked scores stay finite.
_MASK_VALUE = -1e9
# Smallest positive normal f32, floor for the student's attention probabilities.
_TINY = float(jnp.finfo(F32).tiny)
# Floor for squared norms in cosine similarity (eps = 1e-8 on the norm).
_COS_EPS_SQ = 1e-16


# --- Reduction helpers ---


def _valid(mask_BxT: jax.Array) -> jax.Array:
  """Bool validity of each token."""
  return jnp.asarray(mask_BxT) != 0


def _masked_total(per_token_BxT: jax.Array, mask_BxT: jax.Array, denom) -> jax.Array:
  """sum(mask * per_token) / denom, with padded entries selected out (not multiplied).

  `jnp.where` rather than multiplication so a NaN/inf per-token value in a padded
  position cannot leak (0 * inf = NaN).
  """
  weight_BxT = jnp.asarray(mask_BxT).astype(F32)
  per_token_BxT = per_token_BxT.astype(F32)
  kept_BxT = jnp.where(weight_BxT != 0, per_token_BxT * weight_BxT, 0.0)
  denom = jnp.asarray(denom, F32)
  # Double-where: an all-padded global batch gives 0 and zero gradients, not 0/0.
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  return jnp.sum(kept_BxT) / safe_denom


def _zero_padded(x_BxTx: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Cast to f32 and replace padded tokens (the mask's leading axes, e.g. B, T) by zeros.

  Sanitising the INPUT (not just the output) keeps inf/NaN garbage out of the
  backward pass too: the cotangent reaching a padded position is exactly 0.
  """
  valid_BxT = _valid(mask_BxT)
  valid = valid_BxT.reshape(valid_BxT.shape + (1,) * (x_BxTx.ndim - valid_BxT.ndim))
  return jnp.where(valid, x_BxTx.astype(F32), 0.0)


def _check_same_shape(what: str, student_shape, teacher_shape) -> None:
  if tuple(student_shape) != tuple(teacher_shape):
    raise ValueError(
      f"{what}: student and teacher shapes (incl. head counts) must match, got "
      f"{tuple(student_shape)} and {tuple(teacher_shape)}"
    )


def _kl_from_logprobs(logp_xV: jax.Array, logq_xV: jax.Array) -> jax.Array:
  """KL(p||q) = sum_v p_v (log p_v - log q_v), with 0 * log 0 = 0.

  Where p_v == 0 (e.g. a -inf logit) the difference is selected to 0 before the
  product, so -inf - x never produces NaN in value or gradient.
  """
  p_xV = jnp.exp(logp_xV)
  diff_xV = jnp.where(p_xV > 0, logp_xV - logq_xV, 0.0)
  return jnp.sum(p_xV * diff_xV, axis=-1)


# --- Per-token logit divergences: [..., V] -> [...] ---


def _tempered_logprobs(student_logits, teacher_logits, temperature):
  """(tau, log q = log_softmax(student/tau), log p = log_softmax(teacher/tau)) in f32."""
  tau = jnp.asarray(temperature, F32)
  logq_xV = jax.nn.log_softmax(student_logits.astype(F32) / tau, axis=-1)
  logp_xV = jax.nn.log_softmax(teacher_logits.astype(F32) / tau, axis=-1)
  return tau, logq_xV, logp_xV


def forward_kl_per_token(student_logits, teacher_logits, temperature) -> jax.Array:
  """Forward KL(p||q) * tau^2, p = softmax(teacher/tau), q = softmax(student/tau).

  Hinton et al. (2015): the tau^2 factor keeps the gradient scale independent of
  tau; d/d student_logits = tau * (q - p).

  Args:
    student_logits: [..., V] student logits, any float dtype.
    teacher_logits: [..., V] teacher logits, same shape.
    temperature: scalar tau > 0 (Python number or traced array).

  Returns:
    [...] float32 per-token divergence.
  """
  tau, logq_xV, logp_xV = _tempered_logprobs(student_logits, teacher_logits, temperature)
  return _kl_from_logprobs(logp_xV, logq_xV) * tau**2


def reverse_kl_per_token(student_logits, teacher_logits, temperature) -> jax.Array:
  """Reverse (mode-seeking) KL(q||p) * tau^2, q = student, p = teacher distribution.

  Args / Returns: as `forward_kl_per_token` ([..., V] logits -> [...] float32).
  """
  tau, logq_xV, logp_xV = _tempered_logprobs(student_logits, teacher_logits, temperature)
  return _kl_from_logprobs(logq_xV, logp_xV) * tau**2


def jsd_per_token(student_logits, teacher_logits, temperature, beta) -> jax.Array:
  """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024) * tau^2.

  M = beta * p + (1 - beta) * q,  JSD = beta * KL(p||M) + (1 - beta) * KL(q||M),
  with p the teacher and q the student distribution; log M is a logsumexp of
  (log beta + log p, log(1 - beta) + log q) in float32.

  At the ends the divergence is exactly 0: beta = 0 makes M = q (and the KL(p||M)
  term has weight 0), beta = 1 makes M = p. This differs from TRL / Liger-Kernel,
  which special-case beta = 0 / 1 as full forward / reverse KL, so their loss scale
  jumps at the ends; here the loss is continuous in beta. Use kind "kl" or
  "reverse_kl" for those objectives. beta = 0.5 gives the symmetric JSD, bounded
  by log 2 * tau^2.

  Args:
    student_logits, teacher_logits, temperature: as `forward_kl_per_token`.
    beta: scalar mixture weight of the teacher in [0, 1].

  Returns:
    [...] float32 per-token divergence.
  """
  tau, logq_xV, logp_xV = _tempered_logprobs(student_logits, teacher_logits, temperature)
  beta = jnp.asarray(beta, F32)
  # log(0) = -inf at the ends is fine: logsumexp ignores a -inf term exactly.
  logm_xV = jnp.logaddexp(jnp.log(beta) + logp_xV, jnp.log1p(-beta) + logq_xV)
  kl_p = _kl_from_logprobs(logp_xV, logm_xV)
  kl_q = _kl_from_logprobs(logq_xV, logm_xV)
  # Select (not multiply) so a 0-weighted term that is inf cannot make NaN.
  jsd = jnp.where(beta > 0, beta * kl_p, 0.0) + jnp.where(beta < 1, (1 - beta) * kl_q, 0.0)
  return jsd * tau**2


LOGIT_DIVERGENCES: dict[str, Callable[..., jax.Array]] = {
  "kl": forward_kl_per_token,
  "reverse_kl": reverse_kl_per_token,
  "jsd": jsd_per_token,
}


def logit_loss(
  kind: str, student_logits_BxTxV, teacher_logits_BxTxV, mask_BxT, denom, *, temperature, beta=0.5
) -> LossAndMetrics:
  """Masked logit-distillation loss of one of `LOGIT_DIVERGENCES`.

  Args:
    kind: "kl" (forward), "reverse_kl" or "jsd".
    student_logits_BxTxV: [B, T, V] student logits.
    teacher_logits_BxTxV: [B, T, V] teacher logits (gradient stopped). The vocab
      sizes must match: slice both to the shared vocabulary rather than padding
      with zero logits (which would add probability mass).
    mask_BxT: [B, T] validity mask.
    denom: scalar global number of valid tokens.
    temperature: scalar tau > 0.
    beta: JSD mixture weight (ignored by the other kinds).

  Returns:
    (loss, {"distill/<kind>": loss}), loss a float32 scalar.
  """
  if kind not in LOGIT_DIVERGENCES:
    raise ValueError(f"unknown logit loss kind {kind!r}; valid kinds: {sorted(LOGIT_DIVERGENCES)}")
  _check_same_shape("logit_loss", student_logits_BxTxV.shape, teacher_logits_BxTxV.shape)
  # Only a concrete Python number can be checked; traced schedules pass through.
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}")
  student_BxTxV = _zero_padded(student_logits_BxTxV, mask_BxT)
  teacher_BxTxV = _zero_padded(jax.lax.stop_gradient(teacher_logits_BxTxV), mask_BxT)
  extra = (beta,) if kind == "jsd" else ()
  per_token_BxT = LOGIT_DIVERGENCES[kind](student_BxTxV, teacher_BxTxV, temperature, *extra)
  loss = _masked_total(per_token_BxT, mask_BxT, denom)
  return loss, {f"distill/{kind}": loss}


def cross_entropy(logits_BxTxV, targets_BxT, mask_BxT, denom) -> LossAndMetrics:
  """Hard-label cross-entropy at temperature 1: logsumexp(z) - z[target].

  Padded targets may hold any integer (e.g. -1).

  Args:
    logits_BxTxV: [B, T, V] student logits.
    targets_BxT: [B, T] integer labels in [0, V).
    mask_BxT: [B, T] validity mask.
    denom: scalar global number of valid tokens.

  Returns:
    (loss, {"task/ce": loss}).
  """
  logits_BxTxV = _zero_padded(logits_BxTxV, mask_BxT)
  targets_BxT = jnp.where(_valid(mask_BxT), targets_BxT, 0).astype(jnp.int32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  loss = _masked_total(lse_BxT - target_logit_BxT, mask_BxT, denom)
  return loss, {"task/ce": loss}


# --- MiniLM attention / value relations ---


def attention_kl(
  student_probs_BxHxTxT, teacher_probs_BxHxTxT, mask_BxT, denom, keys_BxT=None
) -> LossAndMetrics:
  """MiniLM self-attention distribution transfer: KL(A_T row || A_S row).

  Inputs are probabilities already softmaxed and masked by the models (rows sum
  to 1, padded keys exactly 0). Logs are taken safely: the teacher's 0 * log 0
  counts as 0 and the student's log uses max(a, tiny). Padded query rows and
  padded key columns are selected out, so any mass wrongly placed on padded keys
  is ignored.

  Args:
    student_probs_BxHxTxT: [B, H, T(query), T(key)] student attention.
    teacher_probs_BxHxTxT: [B, H, T, T] teacher attention (gradient stopped).
    mask_BxT: [B, T] validity mask (query rows; and keys unless ``keys_BxT``).
    denom: scalar global number of valid tokens.
    keys_BxT: [B, T] the keys that exist, when they are more than the weighted rows (a
      prompt carries no loss but is attended to): every row's distribution is then whole.

  Returns:
    (loss, {"distill/attention": loss}): KL summed over keys, averaged over heads,
    summed over valid query rows, divided by denom.
  """
  _check_same_shape("attention_kl", student_probs_BxHxTxT.shape, teacher_probs_BxHxTxT.shape)
  valid_BxT = _valid(mask_BxT)
  keys_BxT = valid_BxT if keys_BxT is None else _valid(keys_BxT)
  pair_Bx1xTxT = valid_BxT[:, None, :, None] & keys_BxT[:, None, None, :]
  a_s = jnp.where(pair_Bx1xTxT, student_probs_BxHxTxT.astype(F32), 0.0)
  a_t = jnp.where(pair_Bx1xTxT, jax.lax.stop_gradient(teacher_probs_BxHxTxT).astype(F32), 0.0)
  log_s = jnp.log(jnp.maximum(a_s, _TINY))
  # xlogy(a_t, a_t) - a_t * log_s with an explicit 0 where the teacher is 0.
  log_t = jnp.log(jnp.where(a_t > 0, a_t, 1.0))
  kl_BxHxT = jnp.sum(jnp.where(a_t > 0, a_t * (log_t - log_s), 0.0), axis=-1)
  loss = _masked_total(jnp.mean(kl_BxHxT, axis=1), mask_BxT, denom)
  return loss, {"distill/attention": loss}


def _relation_logprobs(v_BxTxHxK: jax.Array, valid_BxT: jax.Array) -> jax.Array:
  """log softmax(v v^T / sqrt(K)) over keys with padded keys masked: [B, H, T, T]."""
  head_dim = v_BxTxHxK.shape[-1]
  scores_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", v_BxTxHxK, v_BxTxHxK) / math.sqrt(head_dim)
  scores_BxHxTxT = jnp.where(valid_BxT[:, None, None, :], scores_BxHxTxT, _MASK_VALUE)
  return jax.nn.log_softmax(scores_BxHxTxT, axis=-1)


def value_relation(
  student_v_BxTxHxK, teacher_v_BxTxHxK, mask_BxT, denom, keys_BxT=None
) -> LossAndMetrics:
  """MiniLM value-relation transfer: KL(VR_T || VR_S), VR = softmax(v v^T / sqrt(K)).

  Relations are bidirectional, as in MiniLM: NO causal mask is applied, only padded
  keys are masked out (with a large negative score). Head dims K may differ between
  student and teacher (each side scales by its own sqrt(K)); head counts must match.

  Args:
    student_v_BxTxHxK: [B, T, H, Ks] student values.
    teacher_v_BxTxHxK: [B, T, H, Kt] teacher values (gradient stopped).
    mask_BxT: [B, T] validity mask (query rows; and keys unless ``keys_BxT``).
    denom: scalar global number of valid tokens.
    keys_BxT: [B, T] the tokens that exist as keys, as ``attention_kl``'s.

  Returns:
    (loss, {"distill/value_relation": loss}): KL summed over keys, averaged over
    heads, summed over valid query rows, divided by denom.
  """
  # [B, T, H] must match; only the head dim K may differ.
  _check_same_shape("value_relation", student_v_BxTxHxK.shape[:3], teacher_v_BxTxHxK.shape[:3])
  keys = mask_BxT if keys_BxT is None else keys_BxT
  v_s = _zero_padded(student_v_BxTxHxK, keys)
  v_t = _zero_padded(jax.lax.stop_gradient(teacher_v_BxTxHxK), keys)
  logp_t = _relation_logprobs(v_t, _valid(keys))
  logp_s = _relation_logprobs(v_s, _valid(keys))
  kl_BxHxT = _kl_from_logprobs(logp_t, logp_s)
  loss = _masked_total(jnp.mean(kl_BxHxT, axis=1), mask_BxT, denom)
  return loss, {"distill/value_relation": loss}


# --- Hidden states ---

HIDDEN_KINDS = ("mse", "cosine")


def hidden_loss(
  kind: str, student_h_BxTxDs, teacher_h_BxTxDt, mask_BxT, denom, projection=None
) -> LossAndMetrics:
  """Hidden-state matching, optionally through a learned [Ds, Dt] projection.

  Args:
    kind: "mse" -> sum_D (W h_S - h_T)^2 / Dt per token (TinyBERT-style); "cosine"
      -> 1 - cos(W h_S, h_T) per token (DistilBERT-style, scale-invariant; norms
      floored at 1e-8 so zero vectors give finite values and gradients).
    student_h_BxTxDs: [B, T, Ds] student hidden states.
    teacher_h_BxTxDt: [B, T, Dt] teacher hidden states (gradient stopped).
    mask_BxT: [B, T] validity mask.
    denom: scalar global number of valid tokens.
    projection: optional [Ds, Dt] matrix (see `init_projection`), trained with the
      student; without it Ds must equal Dt.

  Returns:
    (loss, {"distill/hidden": loss}).
  """
  if kind not in HIDDEN_KINDS:
    raise ValueError(f"unknown hidden loss kind {kind!r}; valid kinds: {list(HIDDEN_KINDS)}")
  d_student, d_teacher = student_h_BxTxDs.shape[-1], teacher_h_BxTxDt.shape[-1]
  h_s = _zero_padded(student_h_BxTxDs, mask_BxT)
  h_t = _zero_padded(jax.lax.stop_gradient(teacher_h_BxTxDt), mask_BxT)
  if projection is not None:
    if projection.shape[0] != d_student:
      raise ValueError(f"projection has shape {projection.shape} but student width is {d_student}")
    h_s = h_s @ projection.astype(F32)
  if h_s.shape[-1] != d_teacher:
    raise ValueError(
      f"hidden widths differ: student {h_s.shape[-1]} vs teacher "
      f"{d_teacher}; pass projection=init_projection(rng, Ds, Dt)"
    )
  if kind == "mse":
    per_token_BxT = jnp.sum(jnp.square(h_s - h_t), axis=-1) / d_teacher
  else:
    dot_BxT = jnp.sum(h_s * h_t, axis=-1)
    inv_s = jax.lax.rsqrt(jnp.maximum(jnp.sum(h_s * h_s, axis=-1), _COS_EPS_SQ))
    inv_t = jax.lax.rsqrt(jnp.maximum(jnp.sum(h_t * h_t, axis=-1), _COS_EPS_SQ))
    per_token_BxT = 1.0 - dot_BxT * inv_s * inv_t
  loss = _masked_total(per_token_BxT, mask_BxT, denom)
  return loss, {"distill/hidden": loss}


def embedding_cosine(student_e_BxD, teacher_e_BxD, mask_BxT, denom) -> LossAndMetrics:
  """Sentence-embedding similarity: 1 - cos(e_S, e_T) per row, weighted by its valid tokens.

  Weighting each row by its number of valid tokens keeps the convention that every loss is
  a sum over tokens divided by the global token count ``denom`` (so micro-batches add up); a
  row with no valid token contributes 0. Norms are floored at 1e-8.

  Args:
    student_e_BxD: [B, D] student pooled embeddings.
    teacher_e_BxD: [B, D] teacher pooled embeddings (gradient stopped).
    mask_BxT: [B, T] validity mask of the rows' tokens.
    denom: scalar global number of valid tokens.

  Returns:
    (loss, {"distill/embedding": loss}).
  """
  _check_same_shape("embedding_cosine", student_e_BxD.shape, teacher_e_BxD.shape)
  # Rows without a valid token are zeroed BEFORE the math (garbage there must not reach the
  # gradients), as _zero_padded does for tokens.
  row_valid_Bx1 = jnp.any(_valid(mask_BxT), axis=-1)[:, None]
  e_s = jnp.where(row_valid_Bx1, jnp.asarray(student_e_BxD, F32), 0.0)
  e_t = jnp.where(row_valid_Bx1, jax.lax.stop_gradient(jnp.asarray(teacher_e_BxD, F32)), 0.0)
  inv_s = jax.lax.rsqrt(jnp.maximum(jnp.sum(e_s * e_s, axis=-1), _COS_EPS_SQ))
  inv_t = jax.lax.rsqrt(jnp.maximum(jnp.sum(e_t * e_t, axis=-1), _COS_EPS_SQ))
  cos_B = jnp.sum(e_s * e_t, axis=-1) * inv_s * inv_t
  # The row's value on each of its tokens: padded rows (NaN-prone) are selected out.
  per_token_BxT = jnp.broadcast_to((1.0 - cos_B)[:, None], jnp.shape(mask_BxT))
  loss = _masked_total(per_token_BxT, mask_BxT, denom)
  return loss, {"distill/embedding": loss}


def init_projection(rng: jax.Array, d_student: int, d_teacher: int) -> jax.Array:
  """LeCun-normal [Ds, Dt] float32 student-to-teacher width map.

  A plain array: the caller owns it as a trainable param and drops it at export.
  """
  return jax.nn.initializers.lecun_normal()(rng, (d_student, d_teacher), F32)
