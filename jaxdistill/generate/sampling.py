"""How the next token is chosen from a model's logits: greedy, temperature, top-k, top-p, min-p.

Pure functions of arrays, traced inside the jitted decode loop:

  SamplingParams          the knobs (frozen, hashable: a static argument of the jitted loop)
  row_keys(seed, rows, step)   the PRNG key of each row at one step
  process(logits, params, seen)  logits -> the sampling distribution's logits (-inf = excluded)
  choose(logits, params, keys, seen)  the chosen tokens and their log-probabilities

Reproducibility: the key of row r at step t is ``fold_in(fold_in(key(seed), r), t)``, where r
is the row's index among all the prompts of a request (not its slot in a batch) and t counts
its generated tokens. So a row's tokens do not depend on the batch size, the mesh or which
other rows share its batch.

Order of the transforms (Hugging Face's and vLLM's): repetition penalty, temperature, then
top-k, top-p and min-p masks on the tempered distribution. ``temperature == 0`` is greedy (the
argmax of the penalised logits; the masks cannot change it).
"""

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """The sampling knobs.

  Attributes:
    temperature: 0 = greedy; > 0 divides the logits.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (nucleus; 1 = all).
    min_p: drop tokens whose probability is below min_p times the most likely one's (0 = none).
    repetition_penalty: > 1 makes tokens already in the row (prompt or generated) less likely
      (CTRL's rule: a positive logit is divided by it, a negative one multiplied); 1 = off.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    checks = (
      ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
      ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0 (0 = all)"),
      ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
      ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
      ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
    )
    for name, ok, want in checks:
      if not ok:
        raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def row_keys(seed: int, rows_B: jax.Array, step_B: jax.Array) -> jax.Array:
  """The PRNG key of row ``rows_B[b]`` at its step ``step_B[b]``.

  Args:
    seed: the request's seed.
    rows_B: int32 [B], each row's index in the request.
    step_B: int32 [B] (or a scalar), the index of the token being chosen.
  Returns:
    [B] typed PRNG keys.
  """
  base = jax.random.key(seed)
  step_B = jnp.broadcast_to(step_B, rows_B.shape)
  return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(base, r), t))(rows_B, step_B)


def penalize(logits_BxV: jax.Array, seen_BxV: jax.Array, penalty: float) -> jax.Array:
  """CTRL's repetition penalty on the tokens a row has seen (see ``SamplingParams``)."""
  penalized_BxV = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
  return jnp.where(seen_BxV, penalized_BxV, logits_BxV)


def process(
  logits_BxV: jax.Array, params: SamplingParams, seen_BxV: jax.Array | None = None
) -> jax.Array:
  """The logits of the distribution tokens are drawn from: excluded tokens are -inf.

  Args:
    logits_BxV: the model's next-token logits (any float dtype; computed in float32).
    params: the knobs; with ``greedy`` only the repetition penalty applies.
    seen_BxV: bool, tokens already in each row (needed when repetition_penalty != 1).
  Returns:
    float32 [B, V]; its softmax is the sampling distribution (for greedy: its argmax is the
    choice).
  """
  x_BxV = logits_BxV.astype(jnp.float32)
  if params.repetition_penalty != 1:
    x_BxV = penalize(x_BxV, seen_BxV, params.repetition_penalty)
  if params.greedy:
    return x_BxV
  x_BxV = x_BxV / params.temperature
  vocab = x_BxV.shape[-1]
  if 0 < params.top_k < vocab:
    kth_Bx1 = jax.lax.top_k(x_BxV, params.top_k)[0][:, -1:]
    x_BxV = jnp.where(x_BxV >= kth_Bx1, x_BxV, _NEG_INF)
  if params.top_p < 1:
    x_BxV = _top_p(x_BxV, params.top_p)
  if params.min_p > 0:
    logp_BxV = jax.nn.log_softmax(x_BxV, axis=-1)
    floor_Bx1 = jnp.max(logp_BxV, axis=-1, keepdims=True) + jnp.log(params.min_p)
    x_BxV = jnp.where(logp_BxV >= floor_Bx1, x_BxV, _NEG_INF)
  return x_BxV


def _top_p(x_BxV: jax.Array, top_p: float) -> jax.Array:
  """Keeps the most likely tokens until their probability reaches ``top_p`` (ties kept)."""
  sorted_BxV = jnp.sort(x_BxV, axis=-1)[:, ::-1]
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  # Mass strictly before each sorted token: a token is kept while that mass is < top_p, so
  # the most likely token always stays.
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_BxV = before_BxV < top_p
  cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(x_BxV >= cutoff_Bx1, x_BxV, _NEG_INF)


def choose(
  logits_BxV: jax.Array,
  params: SamplingParams,
  keys_B: jax.Array,
  seen_BxV: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The next token of every row and its log-probability under the model.

  Args:
    logits_BxV: the model's next-token logits.
    params: the knobs.
    keys_B: each row's key (``row_keys``); unused when greedy.
    seen_BxV: as ``process``.
  Returns:
    (tokens_B int32, logprobs_B float32): the log-probability is the model's own
    (log-softmax of the raw logits, temperature 1, no masks): what a distillation loss or a
    teacher-vs-student comparison needs, whatever the sampling knobs.
  """
  x_BxV = process(logits_BxV, params, seen_BxV)
  if params.greedy:
    tokens_B = jnp.argmax(x_BxV, axis=-1).astype(jnp.int32)
  else:
    tokens_B = jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  return tokens_B, jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
