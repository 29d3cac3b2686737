"""Classification metrics as weighted SUMS, so they add up over batches, hosts and devices.

Shape legend: B batch, C classes, M calibration bins.

Every function takes per-example ``weights_B`` (1 = real example, 0 = padding row of a last
eval batch) and returns a sum over examples of ``weight * value``; the caller adds the sums
of all batches (and devices) and divides by the summed weights at the end. Padding rows are
selected out with ``jnp.where`` (not multiplied), so garbage logits there cannot make NaN.
All math is float32 whatever the logits' dtype.

Ties between logits are broken towards the LOWER class index everywhere (as ``jnp.argmax``
and ``jax.lax.top_k`` do), so a model with constant logits is not counted as always right.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _valid(weights_B) -> jax.Array:
  return jnp.asarray(weights_B) != 0


def _clean_logits(logits_BxC, weights_B) -> jax.Array:
  """f32 logits with padding rows replaced by zeros before any math."""
  return jnp.where(_valid(weights_B)[:, None], jnp.asarray(logits_BxC).astype(F32), 0.0)


def _weighted_sum(values_B, weights_B) -> jax.Array:
  w_B = jnp.asarray(weights_B).astype(F32)
  return jnp.sum(jnp.where(w_B != 0, values_B.astype(F32) * w_B, 0.0))


def topk_correct(logits_BxC, labels_B, weights_B, k: int) -> jax.Array:
  """Weighted number of examples whose label is among the k highest logits.

  The label's rank is the number of classes with a larger logit plus the number with an
  EQUAL logit and a lower index; the example counts when rank < k (k = 1 is argmax accuracy).

  Args:
    logits_BxC: [B, C] logits, any float dtype.
    labels_B: [B] integer labels in [0, C) (padding rows may hold anything, e.g. -1).
    weights_B: [B] per-example weights.
    k: how many top classes count (k >= C counts every real example).

  Returns:
    float32 scalar, sum of the weights of the correct examples.
  """
  if k < 1:
    raise ValueError(f"topk_correct: k must be >= 1, got {k}")
  logits_BxC = _clean_logits(logits_BxC, weights_B)
  labels_B = jnp.where(_valid(weights_B), jnp.asarray(labels_B), 0).astype(jnp.int32)
  label_logit_Bx1 = jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=-1)
  classes_1xC = jnp.arange(logits_BxC.shape[-1])[None, :]
  ahead_BxC = (logits_BxC > label_logit_Bx1) | (
    (logits_BxC == label_logit_Bx1) & (classes_1xC < labels_B[:, None])
  )
  # A NaN label logit compares false with everything; count it as wrong, not as rank 0.
  correct_B = (jnp.sum(ahead_BxC, axis=-1) < k) & ~jnp.isnan(label_logit_Bx1[:, 0])
  return _weighted_sum(correct_B, weights_B)


def agreement(student_logits_BxC, teacher_logits_BxC, weights_B) -> jax.Array:
  """Weighted number of examples where the student's top-1 class equals the teacher's.

  Args:
    student_logits_BxC: [B, C] student logits.
    teacher_logits_BxC: [B, C] teacher logits.
    weights_B: [B] per-example weights.

  Returns:
    float32 scalar sum of the weights of agreeing examples.
  """
  s = jnp.argmax(_clean_logits(student_logits_BxC, weights_B), axis=-1)
  t = jnp.argmax(_clean_logits(teacher_logits_BxC, weights_B), axis=-1)
  return _weighted_sum(s == t, weights_B)


def kl_sum(teacher_logits_BxC, student_logits_BxC, weights_B, temperature=1.0) -> jax.Array:
  """Weighted sum over examples of KL(teacher || student) at a temperature, in nats.

  p = softmax(teacher / tau), q = softmax(student / tau), KL = sum_c p_c (log p_c - log q_c)
  with 0 log 0 = 0. A metric, so no tau^2 factor (the training loss has one).

  Args:
    teacher_logits_BxC: [B, C] teacher logits.
    student_logits_BxC: [B, C] student logits.
    weights_B: [B] per-example weights.
    temperature: scalar tau > 0.

  Returns:
    float32 scalar, sum_b w_b KL_b.
  """
  # Only a concrete Python number can be checked; a traced temperature passes through.
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"kl_sum: temperature must be > 0, got {temperature!r}")
  tau = jnp.asarray(temperature, F32)
  logp_BxC = jax.nn.log_softmax(_clean_logits(teacher_logits_BxC, weights_B) / tau, axis=-1)
  logq_BxC = jax.nn.log_softmax(_clean_logits(student_logits_BxC, weights_B) / tau, axis=-1)
  p_BxC = jnp.exp(logp_BxC)
  # Where p is 0 (a -inf teacher logit) the log difference is selected to 0: no -inf * 0.
  kl_B = jnp.sum(p_BxC * jnp.where(p_BxC > 0, logp_BxC - logq_BxC, 0.0), axis=-1)
  return _weighted_sum(kl_B, weights_B)


class CalibrationBins(NamedTuple):
  """Per-bin weighted sums for expected calibration error; add two of them entry by entry.

  A pytree, so ``jax.tree.map(jnp.add, a, b)`` (or a psum) accumulates batches and devices.
  """

  count: jax.Array  # [M] sum of weights of the examples in each bin
  confidence_sum: jax.Array  # [M] sum of weight * confidence
  correct_sum: jax.Array  # [M] sum of weight * (top-1 == reference)


def calibration_bins(logits_BxC, reference_B, weights_B, num_bins: int = 15) -> CalibrationBins:
  """Bin the examples by confidence for ECE (Guo et al. 2017: equal-width bins).

  Confidence is the top softmax probability (temperature 1); an example is correct when its
  top-1 class equals ``reference_B``. Bin m (0-based) of M covers the half-open interval
  (m/M, (m+1)/M], closed on the right as in Guo et al.'s code: a confidence of exactly 0.5
  with M = 10 falls in bin 4, (0.4, 0.5]; 1.0 falls in the last bin. (A confidence of 0,
  impossible for a softmax, would go to bin 0.)

  Args:
    logits_BxC: [B, C] logits.
    reference_B: [B] integer classes to be correct against: the labels, or the teacher's
      top-1 (``argmax`` of its logits) for calibration against the teacher.
    weights_B: [B] per-example weights.
    num_bins: M >= 1.

  Returns:
    CalibrationBins of three [M] float32 arrays.
  """
  if num_bins < 1:
    raise ValueError(f"calibration_bins: num_bins must be >= 1, got {num_bins}")
  logits_BxC = _clean_logits(logits_BxC, weights_B)
  # max softmax = exp(max - logsumexp): no [B, C] probability array needed.
  confidence_B = jnp.exp(jnp.max(logits_BxC, axis=-1) - jax.nn.logsumexp(logits_BxC, axis=-1))
  correct_B = (jnp.argmax(logits_BxC, axis=-1) == jnp.asarray(reference_B)).astype(F32)
  bin_B = jnp.clip(jnp.ceil(confidence_B * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  w_B = jnp.asarray(weights_B).astype(F32)
  valid_B = w_B != 0

  def per_bin(values_B):
    kept_B = jnp.where(valid_B, values_B * w_B, 0.0)
    return jax.ops.segment_sum(kept_B, bin_B, num_segments=num_bins)

  return CalibrationBins(
    count=per_bin(jnp.ones_like(w_B)),
    confidence_sum=per_bin(confidence_B),
    correct_sum=per_bin(correct_B),
  )


def ece(bins: CalibrationBins) -> jax.Array:
  """Expected calibration error from (accumulated) bins.

  ECE = sum_m (n_m / N) |acc_m - conf_m| = sum_m |correct_sum_m - confidence_sum_m| / N,
  N the total count; empty bins add 0, and N = 0 gives 0.

  Args:
    bins: CalibrationBins (or any (count, confidence_sum, correct_sum) triple) of [M] arrays.

  Returns:
    float32 scalar in [0, 1].
  """
  count_M, confidence_M, correct_M = (jnp.asarray(b, F32) for b in bins)
  total = jnp.sum(count_M)
  gap = jnp.sum(jnp.abs(correct_M - confidence_M))
  return jnp.where(total > 0, gap / jnp.where(total > 0, total, 1.0), 0.0)
