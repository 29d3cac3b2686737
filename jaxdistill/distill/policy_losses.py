"""Losses on sequences the student wrote itself (on-policy distillation).

When the student samples a continuation and the teacher scores it, the reverse KL
KL(student || teacher) over the sampled tokens has an estimator that needs only two numbers per
token: the student's and the teacher's log-probability of the token the student chose. This is
the form that works when the teacher is far larger than the student or sits elsewhere (a
service returning log-probabilities, not vocabularies).

Shape legend as ``losses``: B batch, T sequence length. Conventions as ``losses`` (``denom`` is
the global count of valid tokens; float32 math; the teacher's input gets stop_gradient).
"""

import jax
import jax.numpy as jnp

from jaxdistill.distill.losses import F32, LossAndMetrics, _masked_total, _zero_padded


def sampled_token_reverse_kl(
  student_logp_BxT: jax.Array, teacher_logp_BxT: jax.Array, mask_BxT: jax.Array, denom
) -> LossAndMetrics:
  """Score-function (REINFORCE) loss of the reverse KL on the student's sampled tokens.

  With x_t ~ q (the student) and r_t = log q(x_t) - log p(x_t) (p the teacher), the reverse
  KL's estimate is mean(r_t) and its gradient is E[r_t * grad log q(x_t)] (the term
  E[grad log q] vanishes). The loss is sum(stop_gradient(r_t) * log q(x_t)) / denom: its value
  is not the KL, its gradient is the KL's. The per-token signal -r_t = log p - log q is the
  "advantage": positive where the teacher likes the student's token more than the student.

  Args:
    student_logp_BxT: log q of each sampled token (differentiable w.r.t. the student).
    teacher_logp_BxT: log p of the same tokens (gradient stopped).
    mask_BxT: generated tokens (1) vs prompt and padding (0).
    denom: scalar global number of valid tokens.
  Returns:
    (loss, {"distill/sampled_reverse_kl": the reverse-KL estimate mean(r_t),
    "distill/sampled_reverse_kl_loss": loss}).
  """
  logq_BxT = _zero_padded(student_logp_BxT, mask_BxT)
  logp_BxT = _zero_padded(jax.lax.stop_gradient(teacher_logp_BxT), mask_BxT)
  r_BxT = jax.lax.stop_gradient(logq_BxT - logp_BxT)
  loss = _masked_total(r_BxT * logq_BxT, mask_BxT, denom)
  estimate = _masked_total(r_BxT, mask_BxT, denom)
  return loss, {
    "distill/sampled_reverse_kl": estimate.astype(F32),
    "distill/sampled_reverse_kl_loss": loss,
  }


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """float32 [B, T] log-softmax of ``logits`` at ``tokens`` (the log-probability of each)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(F32), axis=-1)
  return jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]
