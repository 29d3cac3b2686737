"""The jitted generation programs of a decoder: prefill a batch of prompts, then decode in a loop.

  Decoder(model, params, stop_tokens, max_new_tokens, logprobs)
    .prefill(variables, capacity, tokens_BxP, lengths_B, rows_B, seed) -> DecodeState
    .decode(variables, state, steps, seed)                           -> DecodeState

``prefill`` runs the right-padded prompts through the model in one call (row b's prompt is
tokens_BxP[b, :lengths_B[b]]; what follows is padding, which no real token can see: attention is
causal and each row's first new token is read at its own last prompt position), fills the cache
and chooses every row's first token. ``decode`` then runs up to ``steps`` single-token steps in
one ``lax.while_loop`` (no host round-trip per token), stopping early once every row is done.
A row is done when it chose a stop token ("stop"), has ``max_new_tokens`` tokens ("length"), or
its last token sits at the model's last position ("context"); a done row's cache and outputs
no longer change.

State invariant: a row's cache holds its positions 0 .. lengths - 1; ``last_B`` is the token
chosen for position ``lengths`` (fed at the next step). The caller keeps ``lengths < capacity``
for running rows by sizing each ``decode`` call (``cache.grow`` between calls).
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.generate import cache as cache_lib
from jaxdistill.generate import sampling

RUNNING, STOP, LENGTH, CONTEXT = 0, 1, 2, 3
REASONS = {STOP: "stop", LENGTH: "length", CONTEXT: "context"}


class DecodeState(NamedTuple):
  """Everything the decode loop carries (arrays only: it is a pytree).

  Attributes:
    cache: the key/value cache (``generate.cache``).
    last_B: int32, the latest chosen token of each row (not yet in the cache).
    tokens_BxN: int32, the chosen tokens (N = max_new_tokens; 0 past ``num_B``).
    logprobs_BxN: float32, their log-probabilities under the model (0 when not requested).
    num_B: int32, tokens chosen so far.
    reason_B: int32, RUNNING or why the row stopped (STOP, LENGTH, CONTEXT).
    rows_B: int32, each row's index in the request (its sampling keys derive from it).
    seen_BxV: bool, tokens each row has seen (repetition penalty only; else [B, 0]).
  """

  cache: dict
  last_B: jax.Array
  tokens_BxN: jax.Array
  logprobs_BxN: jax.Array
  num_B: jax.Array
  reason_B: jax.Array
  rows_B: jax.Array
  seen_BxV: jax.Array


class Decoder:
  """The prefill and decode programs of one model with fixed sampling options.

  Args:
    model: a decoder (``transformer.Transformer``, or its int8 / FP8 variants).
    params: the sampling knobs (static: one program per setting).
    stop_tokens: token ids that end a row (the stop token is kept as its last token).
    max_new_tokens: N, the most tokens a row gets.
    logprobs: whether to compute the chosen tokens' log-probabilities.
    cache_dtype: the cache's dtype (default: the model's compute dtype).
  """

  def __init__(
    self,
    model: nn.Module,
    params: sampling.SamplingParams,
    stop_tokens: tuple[int, ...],
    max_new_tokens: int,
    logprobs: bool = False,
    cache_dtype: Any = None,
  ):
    self.model, self.params = model, params
    self.cache_dtype = cache_dtype or model.config.dtype
    self.stop_tokens = tuple(int(t) for t in stop_tokens)
    self.max_new_tokens = max_new_tokens
    self.logprobs = logprobs
    self.max_len = model.config.max_len
    self.prefill = jax.jit(self._prefill, static_argnums=(1,))
    self.decode = jax.jit(self._decode, donate_argnums=(1,))

  def _choose(self, logits_BxV, state_rows_B, step_B, seen_BxV, seed):
    keys_B = None if self.params.greedy else sampling.row_keys(seed, state_rows_B, step_B)
    seen = seen_BxV if self.params.repetition_penalty != 1 else None
    tokens_B, logp_B = sampling.choose(logits_BxV, self.params, keys_B, seen)
    return tokens_B, logp_B if self.logprobs else jnp.zeros_like(logp_B)

  def _finish(self, tokens_B, position_B, num_B, reason_B):
    """The reasons after choosing ``tokens_B`` (the num_B-th token, at ``position_B``)."""
    stop_B = jnp.isin(tokens_B, jnp.asarray(self.stop_tokens or (-1,), jnp.int32))
    new_B = jnp.where(position_B >= self.max_len - 1, CONTEXT, RUNNING)
    new_B = jnp.where(num_B >= self.max_new_tokens, LENGTH, new_B)
    new_B = jnp.where(stop_B, STOP, new_B)
    return jnp.where(reason_B == RUNNING, new_B, reason_B)

  def _prefill(self, variables, capacity, tokens_BxP, lengths_B, rows_B, seed) -> DecodeState:
    """See the module docstring; the cache starts with ``capacity`` (static) slots."""
    b = tokens_BxP.shape[0]
    cfg = self.model.config
    # The prompt runs through the model's plain causal forward (no cache to read yet: padding
    # past a row's length is never seen by its real tokens); its keys/values fill the cache.
    out = self.model.apply(
      variables, tokens_BxP, return_logits=False, qkv_layers=tuple(range(cfg.num_layers))
    )
    cache = cache_lib.from_keys_values(
      [out["qkv"][i][1:] for i in range(cfg.num_layers)], capacity, self.cache_dtype, cfg
    )
    # Each row's next-token logits come from its own last prompt position.
    last_BxD = jnp.take_along_axis(out["final_hidden"], (lengths_B - 1)[:, None, None], axis=1)
    logits_BxV = jnp.einsum("bd,dv->bv", last_BxD[:, 0], out["head"])
    vocab = logits_BxV.shape[-1]
    if self.params.repetition_penalty != 1:
      in_prompt_BxP = jnp.arange(tokens_BxP.shape[1])[None, :] < lengths_B[:, None]
      seen_BxV = jax.vmap(lambda t, m: jnp.zeros((vocab,), bool).at[t].max(m))(
        tokens_BxP, in_prompt_BxP
      )
    else:
      seen_BxV = jnp.zeros((b, 0), bool)
    tokens_B, logp_B = self._choose(logits_BxV, rows_B, jnp.zeros_like(rows_B), seen_BxV, seed)
    n = self.max_new_tokens
    num_B = jnp.ones((b,), jnp.int32)
    state = DecodeState(
      cache=cache_lib.constrain(dict(cache, lengths=lengths_B)),
      last_B=tokens_B,
      tokens_BxN=jnp.zeros((b, n), jnp.int32).at[:, 0].set(tokens_B),
      logprobs_BxN=jnp.zeros((b, n), jnp.float32).at[:, 0].set(logp_B),
      num_B=num_B,
      reason_B=self._finish(tokens_B, lengths_B, num_B, jnp.zeros((b,), jnp.int32)),
      rows_B=rows_B,
      seen_BxV=_see(seen_BxV, tokens_B),
    )
    return state

  def _step(self, variables, state: DecodeState, seed) -> DecodeState:
    """One token for every running row."""
    running_B = state.reason_B == RUNNING
    out = self.model.apply(variables, state.last_B[:, None], cache=state.cache)
    tokens_B, logp_B = self._choose(
      out["logits"][:, 0], state.rows_B, state.num_B, state.seen_BxV, seed
    )
    lengths_B = jnp.where(running_B, out["cache"]["lengths"], state.cache["lengths"])
    # A finished row writes nowhere (index N is out of bounds and dropped).
    slot_B = jnp.where(running_B, state.num_B, self.max_new_tokens)
    rows = jnp.arange(tokens_B.shape[0])
    num_B = state.num_B + running_B.astype(jnp.int32)
    return DecodeState(
      cache=cache_lib.constrain(dict(out["cache"], lengths=lengths_B)),
      last_B=jnp.where(running_B, tokens_B, state.last_B),
      tokens_BxN=state.tokens_BxN.at[rows, slot_B].set(tokens_B, mode="drop"),
      logprobs_BxN=state.logprobs_BxN.at[rows, slot_B].set(logp_B, mode="drop"),
      num_B=num_B,
      reason_B=jnp.where(
        running_B, self._finish(tokens_B, lengths_B, num_B, state.reason_B), state.reason_B
      ),
      rows_B=state.rows_B,
      seen_BxV=jnp.where(running_B[:, None], _see(state.seen_BxV, tokens_B), state.seen_BxV),
    )

  def _decode(self, variables, state: DecodeState, steps, seed) -> DecodeState:
    """Up to ``steps`` (a traced int) decode steps; stops early when every row is done."""

    def cond(carry):
      i, s = carry
      return (i < steps) & jnp.any(s.reason_B == RUNNING)

    def body(carry):
      i, s = carry
      return i + 1, self._step(variables, s, seed)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def _see(seen_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  """``seen_BxV`` with each row's token marked (a no-op for the empty [B, 0] array)."""
  if seen_BxV.shape[1] == 0:
    return seen_BxV
  return seen_BxV.at[jnp.arange(tokens_B.shape[0]), tokens_B].set(True)


def room(state: DecodeState) -> int:
  """How many more steps fit the cache: capacity - the longest running row's length."""
  lengths = jax.device_get(state.cache["lengths"])
  running = jax.device_get(state.reason_B) == RUNNING
  longest = int(lengths[running].max()) if running.any() else 0
  return cache_lib.capacity_of(state.cache) - longest


def to_host(state: DecodeState) -> dict[str, Any]:
  """The outputs as NumPy: tokens_BxN, logprobs_BxN, num_B, reason_B."""
  keys = ("tokens_BxN", "logprobs_BxN", "num_B", "reason_B")
  return dict(zip(keys, jax.device_get([getattr(state, k) for k in keys])))
