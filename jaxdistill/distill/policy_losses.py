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

# Logit-term kinds (``distill.logit.kind``) that read only the sampled tokens' log-probabilities:
# they need the student's own samples as targets (``distill.on_policy.lmbda`` = 1).
POLICY_KINDS = ("sampled_reverse_kl",)


# ``distill.on_policy.baseline``: what is subtracted from the per-token signal (see below).
BASELINES = ("none", "batch", "sequence")


def sampled_token_reverse_kl(
  student_logp_BxT: jax.Array,
  teacher_logp_BxT: jax.Array,
  mask_BxT: jax.Array,
  denom,
  baseline: str = "none",
  clip: float = 0.0,
) -> LossAndMetrics:
  """Score-function (REINFORCE) loss of the reverse KL on the student's sampled tokens.

  With x_t ~ q (the student) and r_t = log q(x_t) - log p(x_t) (p the teacher), the reverse
  KL's estimate is mean(r_t) and its gradient is E[r_t * grad log q(x_t)] (the term
  E[grad log q] vanishes). The loss is sum(stop_gradient(a_t) * log q(x_t)) / denom with
  a_t = r_t - b: its value is not the KL, its gradient is the KL's. The per-token signal
  -r_t = log p - log q is the "advantage": positive where the teacher likes the student's
  token more than the student.

  Variance reduction: any b that does not depend on x_t leaves the expected gradient
  unchanged (E[b grad log q] = 0) and can shrink its variance a lot, since r_t is mostly a
  large shared offset (every token of a poor student scores badly) that Adam turns into
  full-size steps in random directions. ``baseline``: "none" (b = 0), "batch" (b = the mean
  r over the batch's valid tokens) or "sequence" (b = the mean r over the token's own row);
  both include x_t's own r_t, a bias of order 1/tokens that the variance they remove outweighs.
  ``clip`` > 0 bounds a_t to [-clip, clip] (a token the teacher finds near impossible gives
  an r_t of tens of nats and would dominate the step).

  Args:
    student_logp_BxT: log q of each sampled token (differentiable w.r.t. the student).
    teacher_logp_BxT: log p of the same tokens (gradient stopped).
    mask_BxT: generated tokens (1) vs prompt and padding (0).
    denom: scalar global number of valid tokens.
    baseline: one of BASELINES.
    clip: the bound on |a_t| (0 = none).
  Returns:
    (loss, {"distill/sampled_reverse_kl": the reverse-KL estimate mean(r_t),
    "distill/sampled_reverse_kl_loss": loss, "distill/sampled_reverse_kl_signal_rms": the
    root mean square of a_t (what the baseline and clip shrink)}).
  """
  if baseline not in BASELINES:
    raise ValueError(f"baseline {baseline!r}: one of {BASELINES}")
  logq_BxT = _zero_padded(student_logp_BxT, mask_BxT)
  logp_BxT = _zero_padded(jax.lax.stop_gradient(teacher_logp_BxT), mask_BxT)
  r_BxT = jax.lax.stop_gradient(logq_BxT - logp_BxT)
  m_BxT = mask_BxT.astype(F32)
  if baseline == "batch":
    a_BxT = r_BxT - jnp.sum(r_BxT * m_BxT) / jnp.maximum(jnp.sum(m_BxT), 1.0)
  elif baseline == "sequence":
    rows_B = jnp.sum(r_BxT * m_BxT, axis=1) / jnp.maximum(jnp.sum(m_BxT, axis=1), 1.0)
    a_BxT = r_BxT - rows_B[:, None]
  else:
    a_BxT = r_BxT
  if clip > 0:
    a_BxT = jnp.clip(a_BxT, -clip, clip)
  loss = _masked_total(a_BxT * logq_BxT, mask_BxT, denom)
  estimate = _masked_total(r_BxT, mask_BxT, denom)
  rms = jnp.sqrt(_masked_total(a_BxT * a_BxT, mask_BxT, denom))
  return loss, {
    "distill/sampled_reverse_kl": estimate.astype(F32),
    "distill/sampled_reverse_kl_loss": loss,
    "distill/sampled_reverse_kl_signal_rms": rms.astype(F32),
  }


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
  """float32 [B, T] log-softmax of ``logits`` at ``tokens`` (the log-probability of each)."""
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(F32), axis=-1)
  return jnp.take_along_axis(logp_BxTxV, tokens_BxT[..., None], axis=-1)[..., 0]
