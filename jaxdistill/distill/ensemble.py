"""Several teachers, one logit target: how an ensemble's outputs combine (``distill.ensemble``).

With teachers k = 1..K, weights w_k (normalised to sum to 1: ``normalise``) and temperature
tau, a student distribution q at tau is distilled from

  probs    the mixture p = sum_k w_k softmax(z_k / tau): KL(p || q), the ensemble's averaged
           prediction. As logits (``mix_logits``) it is tau * log p, whose softmax at tau is p
           exactly, so every divergence of ``losses`` and the fused and sparse heads take it
           unchanged.
  logits   the softmax of the averaged logits z = sum_k w_k z_k (a geometric mean of the
           teachers' distributions, renormalised). Linear in the teachers' final hidden
           states, so the fused and sparse heads never form it: ``stacked_head`` concatenates
           w_k h_k and the heads W_k along the width, and [h] @ [W] = sum_k w_k h_k W_k.
  losses   sum_k w_k D(p_k || q): the average of the per-teacher divergences (the head term
           runs once per teacher). By convexity of KL in its first argument,
           KL(sum_k w_k p_k || q) <= sum_k w_k KL(p_k || q): KL to the average is NOT the
           average of the KLs; their gradients in q differ too (the mixture's is that of CE
           against the averaged probabilities, the same as the losses' average for forward
           KL, but not for reverse KL or JSD, and the reported values always differ).

Pure functions of arrays; shapes: [..., V] logits, N tokens, D_k teacher widths.
"""

from typing import Sequence

import jax
import jax.numpy as jnp

KINDS = ("probs", "logits", "losses")
F32 = jnp.float32


def normalise(weights: Sequence[float]) -> tuple[float, ...]:
  """Teacher weights as shares summing to 1 (static floats).

  Raises:
    ValueError: a negative weight, or all zero.
  """
  if any(w < 0 for w in weights) or sum(weights) <= 0:
    raise ValueError(f"teacher weights must be >= 0 and not all 0, got {tuple(weights)}")
  total = float(sum(weights))
  return tuple(float(w) / total for w in weights)


def mix_logits(
  logits_list: Sequence[jax.Array], weights: Sequence[float], temperature, how: str
) -> jax.Array:
  """The ensemble's target as one set of logits (float32): its softmax at ``temperature`` is
  the combined distribution.

  Args:
    logits_list: K arrays [..., V], the teachers' logits (any float dtype).
    weights: K shares summing to 1 (``normalise``).
    temperature: tau > 0 (static or traced).
    how: "probs" (tau * log sum_k w_k softmax(z_k / tau)) or "logits" (sum_k w_k z_k).

  Returns:
    [..., V] float32 logits.
  """
  zs = [z.astype(F32) for z in logits_list]
  if how == "logits":
    return sum(w * z for w, z in zip(weights, zs))
  if how != "probs":
    raise ValueError(f"mix_logits combines 'probs' or 'logits', not {how!r}")
  tau = jnp.asarray(temperature, F32)
  # log p = logsumexp_k(log w_k + log_softmax(z_k / tau)); teachers of weight 0 drop out.
  terms = [jnp.log(w) + jax.nn.log_softmax(z / tau, axis=-1) for w, z in zip(weights, zs) if w]
  return tau * jax.nn.logsumexp(jnp.stack(terms), axis=0)


def stacked_head(
  hiddens: Sequence[jax.Array], heads: Sequence[jax.Array], weights: Sequence[float]
) -> tuple[jax.Array, jax.Array]:
  """The "logits" ensemble as ONE teacher of width sum_k D_k: its logits are sum_k w_k z_k.

  Args:
    hiddens: K arrays [N, D_k], the teachers' final hidden states.
    heads: K arrays [D_k, V], their output heads (same V).
    weights: K shares summing to 1.

  Returns:
    (hidden [N, sum D_k], head [sum D_k, V]), in the widest of their dtypes:
    hidden @ head = sum_k w_k hiddens[k] @ heads[k].
  """
  dtype = jnp.result_type(*hiddens, *heads)
  hidden = jnp.concatenate(
    [(w * h.astype(F32)).astype(dtype) for w, h in zip(weights, hiddens)], -1
  )
  return hidden, jnp.concatenate([h.astype(dtype) for h in heads], axis=0)
