"""The jitted programs of speculative decoding: a draft proposes k tokens, the target checks them.

  SpecDecoder(target, draft, params, k, stop_tokens, max_new_tokens, logprobs)
    .prefill(t_vars, d_vars, capacity, tokens_BxP, lengths_B, rows_B, seed) -> SpecState
    .decode(t_vars, d_vars, state, seed)                                    -> SpecState

``prefill`` is the target's own (``decode.Decoder.prefill``: its cache, its first token) plus
the draft's cache of the prompts. ``decode`` runs rounds in one ``lax.while_loop`` until every
row is done or a running row's next round would not fit the caches (the host then grows them,
``cache.grow``, and calls again). A round:

  1. the draft proposes d_1 .. d_k autoregressively (one 2-token forward, then k - 1 one-token
     forwards in a ``lax.scan``);
  2. the target runs ONE forward of [last, d_1 .. d_k] over its cache: its distributions p_0 ..
     p_k at the k + 1 positions;
  3. each row accepts a prefix of n drafts and appends one token of its own:
     greedy: d_j is accepted while it is the target's argmax; the target's argmax follows (so
     the output is the target's own greedy decoding);
     sampling: d_j is accepted with probability min(1, p(d_j) / q(d_j)); the first rejection
     draws from normalize(max(0, p - q)), and after k acceptances a bonus token is drawn from
     p_k. p and q are the distributions after ``sampling.process`` (temperature, top-k, top-p,
     min-p, repetition penalty), so every token follows the target's sampling distribution.
  4. stop tokens, ``max_new_tokens`` and the context end cut the n + 1 tokens as in ``decode``.

Rows accept different counts: each cache's per-row ``lengths`` is set to what the row kept, and
slots past it (rejected drafts) are never read and are overwritten next round. Invariant at a
round's start: the target's cache holds positions 0 .. L - 1 (L = its lengths), ``last_B`` is
the token at L, ``prev_B`` the one at L - 1; the draft's cache is valid through L - 2 and the
round feeds it [prev, last] (rewriting slot L - 1, which it may lack after a full acceptance).

Keys: row r's draws for its t-th generated token come from ``sampling.row_keys(seed, r, t)``
folded with a purpose (draft, accept, residual), so they depend on neither the batch nor k's
rounds. Positions fed past a model's last position (drafts beyond the context end, never kept)
are clipped to it, so learned position embeddings stay defined.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.generate import cache as cache_lib
from jaxdistill.generate import decode as decode_lib
from jaxdistill.generate import sampling

RUNNING, STOP, LENGTH = decode_lib.RUNNING, decode_lib.STOP, decode_lib.LENGTH
CONTEXT = decode_lib.CONTEXT
_DRAFT, _ACCEPT, _RESIDUAL = 1, 2, 3  # purposes folded into a row's key at a step


class SpecState(NamedTuple):
  """What the rounds carry (arrays only).

  Attributes:
    base: the target's ``decode.DecodeState`` (its cache, the outputs, reasons, rows, seen).
    draft_cache: the draft's key/value cache.
    prev_B: int32, the token before ``base.last_B``.
    proposed_B: int32, draft tokens proposed to the row (k per round it ran).
    accepted_B: int32, of those, accepted by the target.
    forwards_B: int32, target forwards while the row ran (the prefill counts one).
  """

  base: decode_lib.DecodeState
  draft_cache: dict
  prev_B: jax.Array
  proposed_B: jax.Array
  accepted_B: jax.Array
  forwards_B: jax.Array


class SpecDecoder:
  """The prefill and round-loop programs of a (target, draft) pair with fixed options.

  Args:
    target: the decoder whose output is produced.
    draft: the decoder that proposes tokens (same vocabulary).
    params: the sampling knobs (both models' distributions go through them).
    k: draft tokens per round.
    stop_tokens, max_new_tokens, logprobs: as ``decode.Decoder`` (logprobs are the target's).
  """

  def __init__(self, target, draft, params, k, stop_tokens, max_new_tokens, logprobs=False):
    self.base = decode_lib.Decoder(target, params, stop_tokens, max_new_tokens, logprobs)
    self.target, self.draft, self.params, self.k = target, draft, params, k
    self.stop_tokens = self.base.stop_tokens
    self.max_new_tokens, self.logprobs = max_new_tokens, logprobs
    self.max_len = target.config.max_len
    self.prefill = jax.jit(self._prefill, static_argnums=(2,))
    self.decode = jax.jit(self._decode, donate_argnums=(2,))

  def _prefill(self, t_vars, d_vars, capacity, tokens_BxP, lengths_B, rows_B, seed) -> SpecState:
    base = self.base.prefill(t_vars, capacity, tokens_BxP, lengths_B, rows_B, seed)
    b = tokens_BxP.shape[0]
    cfg = self.draft.config
    empty = cache_lib.constrain(cache_lib.init(cfg, b, capacity, cfg.dtype))
    out = self.draft.apply(d_vars, tokens_BxP, cache=empty, return_logits=False)
    prev_B = jnp.take_along_axis(tokens_BxP, (lengths_B - 1)[:, None], axis=1)[:, 0]
    zeros_B = jnp.zeros((b,), jnp.int32)
    return SpecState(
      base=base,
      draft_cache=cache_lib.constrain(dict(out["cache"], lengths=lengths_B - 1)),
      prev_B=prev_B,
      proposed_B=zeros_B,
      accepted_B=zeros_B,
      forwards_B=jnp.ones((b,), jnp.int32),
    )

  def _decode(self, t_vars, d_vars, state: SpecState, seed) -> SpecState:
    """Rounds until every row is done or a running row's next round would not fit."""

    def cond(st):
      base = st.base
      running_B = base.reason_B == RUNNING
      fits_B = base.cache["lengths"] + self.k + 1 <= cache_lib.capacity_of(base.cache)
      return jnp.any(running_B) & jnp.all(fits_B | ~running_B)

    return jax.lax.while_loop(cond, lambda st: self._round(t_vars, d_vars, st, seed), state)

  # --- one round ----------------------------------------------------------------------------

  def _keys(self, seed, rows_B, step_B, purpose):
    keys_B = sampling.row_keys(seed, rows_B, step_B)
    return jax.vmap(lambda key: jax.random.fold_in(key, purpose))(keys_B)

  def _seen(self, seen_BxV):
    return seen_BxV if self.params.repetition_penalty != 1 else None

  def _choose_draft(self, logits_BxV, seen_BxV, rows_B, step_B, seed):
    x_BxV = sampling.process(logits_BxV, self.params, self._seen(seen_BxV))
    if self.params.greedy:
      return jnp.argmax(x_BxV, axis=-1).astype(jnp.int32), x_BxV
    keys_B = self._keys(seed, rows_B, step_B, _DRAFT)
    return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32), x_BxV

  def _propose(self, d_vars, st: SpecState, seed):
    """(drafts_BxK, their processed logits q_BxKxV, the draft's cache after them)."""
    base, k = st.base, self.k
    lengths_B = base.cache["lengths"]
    cache = dict(st.draft_cache, lengths=lengths_B - 1)
    feed_Bx2 = jnp.stack([st.prev_B, base.last_B], axis=1)
    out = self.draft.apply(
      d_vars, feed_Bx2, cache=cache, positions_BxT=_positions(self.draft, lengths_B - 1, 2)
    )
    tok_B, x_BxV = self._choose_draft(
      out["logits"][:, -1], base.seen_BxV, base.rows_B, base.num_B, seed
    )

    def step(carry, j):
      cache, tok_B, seen_BxV = carry
      seen_BxV = _mark(seen_BxV, tok_B)
      pos_BxT = _positions(self.draft, lengths_B + j, 1)
      out = self.draft.apply(d_vars, tok_B[:, None], cache=cache, positions_BxT=pos_BxT)
      new_B, x_BxV = self._choose_draft(
        out["logits"][:, 0], seen_BxV, base.rows_B, base.num_B + j, seed
      )
      return (cache_lib.constrain(out["cache"]), new_B, seen_BxV), (new_B, x_BxV)

    carry = (cache_lib.constrain(out["cache"]), tok_B, base.seen_BxV)
    (cache, _, _), (toks_KxB, xs_KxBxV) = jax.lax.scan(step, carry, jnp.arange(1, k))
    drafts_BxK = jnp.concatenate([tok_B[:, None], toks_KxB.T], axis=1)
    q_BxKxV = jnp.concatenate([x_BxV[:, None], xs_KxBxV.transpose(1, 0, 2)], axis=1)
    return drafts_BxK, q_BxKxV, cache

  def _process_window(self, logits_BxTxV, seen_BxV, drafts_BxK):
    """``sampling.process`` of the target's k + 1 positions (each with the drafts before it
    seen, for the repetition penalty)."""
    b, t, v = logits_BxTxV.shape
    seen = None
    if self.params.repetition_penalty != 1:
      hot_BxKxV = jax.nn.one_hot(drafts_BxK, v, dtype=jnp.int32)
      before_BxKxV = jnp.cumsum(hot_BxKxV, axis=1) > 0
      seen_BxTxV = jnp.concatenate([seen_BxV[:, None], seen_BxV[:, None] | before_BxKxV], 1)
      seen = seen_BxTxV.reshape(b * t, v)
    x = sampling.process(logits_BxTxV.reshape(b * t, v), self.params, seen)
    return x.reshape(b, t, v)

  def _accept(self, p_BxTxV, q_BxKxV, drafts_BxK, base, seed):
    """(n_B accepted drafts, the target's own next token after them)."""
    k = self.k
    if self.params.greedy:
      best_BxT = jnp.argmax(p_BxTxV, axis=-1).astype(jnp.int32)
      n_B = jnp.sum(jnp.cumprod(drafts_BxK == best_BxT[:, :k], axis=1), axis=1)
      return n_B, jnp.take_along_axis(best_BxT, n_B[:, None], axis=1)[:, 0]
    pt_BxTxV, pd_BxKxV = jax.nn.softmax(p_BxTxV, axis=-1), jax.nn.softmax(q_BxKxV, axis=-1)
    at = lambda probs: jnp.take_along_axis(probs, drafts_BxK[..., None], axis=-1)[..., 0]
    steps_BxK = base.num_B[:, None] + jnp.arange(k)
    keys_BxK = jax.vmap(lambda s: self._keys(seed, base.rows_B, s, _ACCEPT), 1, 1)(steps_BxK)
    u_BxK = jax.vmap(jax.vmap(jax.random.uniform))(keys_BxK)
    ok_BxK = u_BxK * at(pd_BxKxV) < at(pt_BxTxV[:, :k])
    n_B = jnp.sum(jnp.cumprod(ok_BxK, axis=1), axis=1)
    # Past the last draft q is 0, so the residual there is p_k itself: the bonus token.
    pd_BxTxV = jnp.concatenate([pd_BxKxV, jnp.zeros_like(pd_BxKxV[:, :1])], axis=1)
    row = lambda x: jnp.take_along_axis(x, n_B[:, None, None], axis=1)[:, 0]
    residual_BxV, pt_BxV = row(jnp.maximum(pt_BxTxV - pd_BxTxV, 0.0)), row(pt_BxTxV)
    # p == q leaves no residual, and then no rejection either; float noise falls back to p.
    some_Bx1 = jnp.sum(residual_BxV, axis=-1, keepdims=True) > 0
    logits_BxV = jnp.log(jnp.where(some_Bx1, residual_BxV, pt_BxV))
    keys_B = self._keys(seed, base.rows_B, base.num_B + n_B, _RESIDUAL)
    return n_B, jax.vmap(jax.random.categorical)(keys_B, logits_BxV).astype(jnp.int32)

  def _cut(self, window_BxT, n_B, lengths_B, num_B):
    """(m_B tokens of the window kept, the row's reason after them): the first of the n + 1
    tokens that stops the row (stop token > max_new_tokens > context, as ``decode``) ends it."""
    j_1xT = jnp.arange(self.k + 1)[None]
    stop_BxT = jnp.isin(window_BxT, jnp.asarray(self.stop_tokens or (-1,), jnp.int32))
    why_BxT = jnp.where(lengths_B[:, None] + 1 + j_1xT >= self.max_len - 1, CONTEXT, RUNNING)
    why_BxT = jnp.where(num_B[:, None] + 1 + j_1xT >= self.max_new_tokens, LENGTH, why_BxT)
    why_BxT = jnp.where(stop_BxT, STOP, why_BxT)
    why_BxT = jnp.where(j_1xT <= n_B[:, None], why_BxT, RUNNING)
    ended_BxT = why_BxT != RUNNING
    first_B = jnp.argmax(ended_BxT, axis=1)
    ended_B = jnp.any(ended_BxT, axis=1)
    m_B = jnp.where(ended_B, first_B + 1, n_B + 1)
    why_B = jnp.take_along_axis(why_BxT, first_B[:, None], axis=1)[:, 0]
    return m_B, jnp.where(ended_B, why_B, RUNNING)

  def _round(self, t_vars, d_vars, st: SpecState, seed) -> SpecState:
    base, k = st.base, self.k
    running_B = base.reason_B == RUNNING
    lengths_B = base.cache["lengths"]
    drafts_BxK, q_BxKxV, draft_cache = self._propose(d_vars, st, seed)
    feed_BxT = jnp.concatenate([base.last_B[:, None], drafts_BxK], axis=1)
    pos_BxT = _positions(self.target, lengths_B, k + 1)
    out = self.target.apply(t_vars, feed_BxT, cache=base.cache, positions_BxT=pos_BxT)
    p_BxTxV = self._process_window(out["logits"], base.seen_BxV, drafts_BxK)
    n_B, next_B = self._accept(p_BxTxV, q_BxKxV, drafts_BxK, base, seed)
    j_1xT = jnp.arange(k + 1)[None]
    drafts_BxT = jnp.concatenate([drafts_BxK, drafts_BxK[:, :1]], axis=1)
    window_BxT = jnp.where(j_1xT < n_B[:, None], drafts_BxT, next_B[:, None])
    m_B, why_B = self._cut(window_BxT, n_B, lengths_B, base.num_B)
    m_B = jnp.where(running_B, m_B, 0)
    kept_BxT = j_1xT < m_B[:, None]
    slot_BxT = jnp.where(kept_BxT, base.num_B[:, None] + j_1xT, self.max_new_tokens)
    rows_Bx1 = jnp.arange(feed_BxT.shape[0])[:, None]
    logprobs_BxN = base.logprobs_BxN
    if self.logprobs:
      logp_BxTxV = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
      logp_BxT = jnp.take_along_axis(logp_BxTxV, window_BxT[..., None], axis=-1)[..., 0]
      logprobs_BxN = logprobs_BxN.at[rows_Bx1, slot_BxT].set(logp_BxT, mode="drop")
    at = lambda x_BxT, i_B: jnp.take_along_axis(x_BxT, jnp.maximum(i_B, 0)[:, None], 1)[:, 0]
    # The token before the new last one: the window's, or the old last one when m == 1.
    prev_B = jnp.where(m_B >= 2, at(window_BxT, m_B - 2), base.last_B)
    seen_BxV = base.seen_BxV
    if seen_BxV.shape[1]:
      hot_BxTxV = jax.nn.one_hot(window_BxT, seen_BxV.shape[1], dtype=jnp.bool_)
      seen_BxV = seen_BxV | jnp.any(hot_BxTxV & kept_BxT[..., None], axis=1)
    new_lengths_B = lengths_B + m_B
    new = base._replace(
      cache=cache_lib.constrain(dict(out["cache"], lengths=new_lengths_B)),
      last_B=jnp.where(running_B, at(window_BxT, m_B - 1), base.last_B),
      tokens_BxN=base.tokens_BxN.at[rows_Bx1, slot_BxT].set(window_BxT, mode="drop"),
      logprobs_BxN=logprobs_BxN,
      num_B=base.num_B + m_B,
      reason_B=jnp.where(running_B, why_B, base.reason_B),
      seen_BxV=seen_BxV,
    )
    ran_B = running_B.astype(jnp.int32)
    return SpecState(
      base=new,
      draft_cache=cache_lib.constrain(dict(draft_cache, lengths=new_lengths_B - 1)),
      prev_B=jnp.where(running_B, prev_B, st.prev_B),
      proposed_B=st.proposed_B + k * ran_B,
      accepted_B=st.accepted_B + n_B * ran_B,
      forwards_B=st.forwards_B + ran_B,
    )


def _positions(model: nn.Module, start_B: jax.Array, length: int) -> jax.Array:
  """start_B[b] + t, clipped to the model's last position (see the module docstring)."""
  pos_BxT = start_B[:, None] + jnp.arange(length, dtype=jnp.int32)[None]
  return jnp.minimum(pos_BxT, model.config.max_len - 1)


def _mark(seen_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  """``seen_BxV`` with each row's token set (nothing to set in the [B, 0] of no penalty)."""
  if not seen_BxV.shape[1]:
    return seen_BxV
  return seen_BxV.at[jnp.arange(tokens_B.shape[0]), tokens_B].set(True)
