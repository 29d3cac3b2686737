"""On-policy batches: the student writes the continuations its teacher then scores (GKD).

``distill.on_policy`` (Agarwal et al. 2024, "generalized knowledge distillation"): with
probability ``lmbda`` a step replaces its batch's continuations by the student's own samples,
inside the one jitted step, before the usual forwards. The teacher then scores the whole
sampled sequence in its ordinary forward, and the objective's logit term (``jsd`` with
``beta``: 0 forward KL, 1 reverse KL in the limit; ``reverse_kl``; ``kl``; or the
sampled-token ``sampled_reverse_kl`` that reads only the log-probabilities of the sampled
tokens) runs on the generated tokens only. With ``lmbda`` = 0 nothing here runs: the step is
exactly the token-level KD step.

A row of the batch keeps its prompt: ``prompt_tokens`` > 0 takes that many first tokens of each
row (a corpus), 0 takes each row's positions before its first weighted target (a prompt /
completion dataset whose prompt carries no loss). The student decodes up to
``max_new_tokens`` after it (``generate.decode``: a KV-cache prefill and a ``lax.while_loop``,
stopping a row at the data's end-of-text token), and the row becomes::

  inputs   prompt + sampled tokens, then zeros          (T positions)
  targets  inputs shifted left by one                   (the sampled tokens where weighted)
  weights  1 where the target is a sampled token, else 0 (no loss on the prompt)
  segment_ids 1 on the prompt and the sampled tokens, positions 0 .. T-1

Tokens that would fall past the row's T positions are dropped. The keys: the step's seed is
drawn from (``seed``, step), and row r's token t from (that seed, r, t) (``sampling.row_keys``),
with r the row's index in the GLOBAL batch: the samples do not depend on the mesh, and a
resumed run draws the same ones. Whether step s samples at all is drawn from (``seed``, s).

  make(student, cfg, stop_tokens, seed) -> rewrite(student_vars, batch, step) -> (batch, metrics)
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.generate import decode as decode_lib
from jaxdistill.generate import sampling

# Folded into the run's seed: the on-policy coin and sampling seeds are their own streams.
_COIN, _SAMPLE = 0x6B64, 0x5A4D


def prompt_lengths(batch: dict, prompt_tokens: int) -> jax.Array:
  """int32 [B]: each row's prompt length (>= 1).

  Args:
    batch: with ``weights`` [B, T] (the target at position t is token t + 1).
    prompt_tokens: > 0: that many (at most T - 1); 0: the positions up to and including the
      one whose target is the row's first weighted one (a row without any: 1).
  """
  weights_BxT = batch["weights"]
  t = weights_BxT.shape[1]
  if prompt_tokens > 0:
    return jnp.full((weights_BxT.shape[0],), min(prompt_tokens, t - 1), jnp.int32)
  first_B = jnp.argmax(weights_BxT > 0, axis=1).astype(jnp.int32)
  return jnp.where(jnp.any(weights_BxT > 0, axis=1), first_B + 1, 1)


def assemble(batch: dict, lengths_B: jax.Array, tokens_BxN: jax.Array, num_B: jax.Array) -> dict:
  """The on-policy rows (see the module docstring) from the prompts and the sampled tokens.

  Args:
    batch: the original batch (its other keys pass through; dtypes kept).
    lengths_B: int32 prompt lengths.
    tokens_BxN: int32 sampled tokens (valid: the first num_B of each row).
    num_B: int32 sampled tokens per row.
  """
  inputs_BxT = batch["inputs"]
  b, t = inputs_BxT.shape
  n = tokens_BxN.shape[1]
  pos_BxU = jnp.broadcast_to(jnp.arange(t + 1)[None, :], (b, t + 1))  # U = T + 1 positions
  gen_BxU = pos_BxU - lengths_B[:, None]  # index of the sampled token at each position
  is_gen_BxU = (gen_BxU >= 0) & (gen_BxU < num_B[:, None])
  sampled_BxU = jnp.take_along_axis(tokens_BxN, jnp.clip(gen_BxU, 0, n - 1), axis=1)
  prompt_BxU = jnp.pad(inputs_BxT, ((0, 0), (0, 1)))
  seq_BxU = jnp.where(
    pos_BxU < lengths_B[:, None], prompt_BxU, jnp.where(is_gen_BxU, sampled_BxU, 0)
  )
  valid_BxT = pos_BxU[:, :t] < (lengths_B + num_B)[:, None]
  out = dict(batch)
  out["inputs"] = seq_BxU[:, :t].astype(inputs_BxT.dtype)
  out["targets"] = seq_BxU[:, 1:].astype(batch["targets"].dtype)
  out["weights"] = is_gen_BxU[:, 1:].astype(batch["weights"].dtype)
  if "segment_ids" in batch:
    out["segment_ids"] = valid_BxT.astype(batch["segment_ids"].dtype)
  if "positions" in batch:
    out["positions"] = pos_BxU[:, :t].astype(batch["positions"].dtype)
  return out


def make(student: nn.Module, cfg: Any, stop_tokens: tuple[int, ...], seed: int) -> Callable | None:
  """The batch rewrite of ``distill.on_policy``, or None when ``lmbda`` is 0.

  Args:
    student: the student decoder (``transformer.Transformer``).
    cfg: the ``distill.on_policy`` section (lmbda, max_new_tokens, temperature, top_k,
      prompt_tokens).
    stop_tokens: ids that end a sampled continuation (the data's end-of-text; may be empty).
    seed: the run's seed.
  Returns:
    ``rewrite(student_vars, batch, step) -> (batch, metrics)``, traced inside the step:
    ``metrics`` has "on_policy/sampled" (1.0 when this step sampled) and
    "on_policy/new_tokens" (mean sampled tokens per row; 0 when it did not).
  """
  lmbda = float(cfg.lmbda)
  if lmbda == 0:
    return None
  params = sampling.SamplingParams(temperature=float(cfg.temperature), top_k=int(cfg.top_k))
  n = int(cfg.max_new_tokens)
  decoder = decode_lib.Decoder(student, params, stop_tokens, n)
  prompt_tokens = int(cfg.prompt_tokens)

  def sample(student_vars, batch, step):
    b, t = batch["inputs"].shape
    lengths_B = prompt_lengths(batch, prompt_tokens)
    draw = jax.random.fold_in(jax.random.key(seed), _SAMPLE)
    step_seed = jax.random.randint(jax.random.fold_in(draw, step), (), 0, jnp.iinfo(jnp.int32).max)
    rows_B = jnp.arange(b, dtype=jnp.int32)  # global rows: the samples ignore the mesh
    # Prefill writes all T columns; each decode step one more slot of a running row.
    capacity = t + n
    state = decoder._prefill(student_vars, capacity, batch["inputs"], lengths_B, rows_B, step_seed)
    state = decoder._decode(student_vars, state, n - 1, step_seed)
    new = assemble(batch, lengths_B, state.tokens_BxN, jnp.minimum(state.num_B, t + 1 - lengths_B))
    return new, jnp.mean(state.num_B.astype(jnp.float32))

  def rewrite(student_vars, batch, step):
    student_vars = jax.lax.stop_gradient(student_vars)
    if lmbda >= 1:
      new, mean_new = sample(student_vars, batch, step)
      return new, {"on_policy/sampled": jnp.float32(1), "on_policy/new_tokens": mean_new}
    coin = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _COIN), step)
    use = jax.random.uniform(coin) < lmbda
    new, mean_new = jax.lax.cond(
      use,
      lambda bt: sample(student_vars, bt, step),
      lambda bt: (bt, jnp.float32(0)),
      batch,
    )
    return new, {"on_policy/sampled": use.astype(jnp.float32), "on_policy/new_tokens": mean_new}

  return rewrite
