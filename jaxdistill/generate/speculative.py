"""Speculative decoding: a distilled student drafts tokens that its teacher verifies in bulk.

    spec = generate.SpeculativeSampler(teacher, teacher_vars, student, student_vars, tok, k=4)
    completions, stats = spec.generate(prompts, max_new_tokens=64, speedup=True)
    print(stats.acceptance_rate, stats.tokens_per_forward, stats.speedup)

Each round the draft proposes k tokens and the target scores all of them in one forward
(``spec_decode``); rows keep what the target accepts. The completions are the target's: with
greedy sampling exactly its own greedy decoding, with sampling the same distribution as
``Sampler`` on the target (not the same tokens for a seed: the draws differ). The returned
``SpecStats`` say how well the draft guessed and how many tokens each target forward produced;
``speedup=True`` also times the target alone on the same request (both warm).

``acceptance_rate`` is the evaluation's measure of a student as its teacher's draft.
"""

import dataclasses
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.generate import cache as cache_lib
from jaxdistill.generate import decode as decode_lib
from jaxdistill.generate.sampler import Completion, Sampler
from jaxdistill.generate.sampling import SamplingParams
from jaxdistill.generate.spec_decode import SpecDecoder


@dataclasses.dataclass
class SpecStats:
  """How a speculative request went (sums over its rows).

  Attributes:
    k: draft tokens per round.
    proposed: draft tokens proposed (k per round per running row).
    accepted: of those, accepted by the target.
    tokens: tokens generated.
    target_forwards: target forwards summed over rows (a row's prefill and each round it ran).
    seconds: wall time of the speculative request.
    target_seconds: wall time of the target alone on the same request (``speedup=True``).
  """

  k: int
  proposed: int = 0
  accepted: int = 0
  tokens: int = 0
  target_forwards: int = 0
  seconds: float = 0.0
  target_seconds: float | None = None

  @property
  def acceptance_rate(self) -> float:
    """Accepted draft tokens / proposed ones."""
    return self.accepted / max(self.proposed, 1)

  @property
  def tokens_per_forward(self) -> float:
    """Mean tokens per target forward (the target alone: 1)."""
    return self.tokens / max(self.target_forwards, 1)

  @property
  def speedup(self) -> float | None:
    """The target alone's wall time / the speculative one (None unless timed)."""
    return None if self.target_seconds is None else self.target_seconds / max(self.seconds, 1e-9)

  def as_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(acceptance_rate=self.acceptance_rate, tokens_per_forward=self.tokens_per_forward)
    return dict(out, speedup=self.speedup)


class SpeculativeSampler:
  """Generates from ``target_model`` with ``draft_model`` proposing ``k`` tokens per round.

  Args:
    target_model, target_vars: the decoder whose completions are returned (the teacher).
    draft_model, draft_vars: the decoder that drafts (its distilled student).
    tokenizer: as ``Sampler`` (shared: the models must share the vocabulary).
    k: draft tokens per round (>= 1).
    mesh, rules, batch_size: as ``Sampler``.
  Raises:
    ValueError: a model is no decoder, the vocabularies differ, or k < 1.

  A draft with a shorter context than the target's drafts (badly) past its end at its last
  position: the output stays the target's; only prompts longer than its context are refused.
  """

  def __init__(
    self,
    target_model: nn.Module,
    target_vars: dict,
    draft_model: nn.Module,
    draft_vars: dict,
    tokenizer: Any = None,
    k: int = 4,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    batch_size: int | None = None,
  ):
    if k < 1:
      raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    # The target's Sampler encodes prompts, builds completions and is the speedup's baseline.
    self.target = Sampler(target_model, target_vars, tokenizer, mesh, rules, batch_size)
    self.draft = Sampler(draft_model, draft_vars, tokenizer, mesh, rules, batch_size)
    t_cfg, d_cfg = self.target.config, self.draft.config
    if t_cfg.vocab_size != d_cfg.vocab_size:
      raise ValueError(
        f"the draft's vocabulary ({d_cfg.vocab_size} tokens) is not the target's "
        f"({t_cfg.vocab_size}): speculative decoding needs one shared vocabulary"
      )
    self.k, self.batch_size = k, batch_size
    self._decoders: dict = {}
    self._grow = jax.jit(cache_lib.grow, static_argnums=(1,))

  def generate(
    self,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    num_samples: int = 1,
    logprobs: bool = False,
    speedup: bool = False,
  ) -> tuple[list[Completion], SpecStats]:
    """The target's completions of ``prompts``, drafted by the draft model.

    Args:
      prompts, max_new_tokens, sampling, seed, stop_tokens, num_samples, logprobs: as
        ``Sampler.stream`` (logprobs are the target's).
      speedup: also time the target alone on the same request; both are run once untimed
        first, so compilation is not timed (the request runs four times in all).
    Returns:
      (completions in request order, the request's ``SpecStats``).
    """
    if max_new_tokens < 1 or num_samples < 1:
      raise ValueError("max_new_tokens and num_samples must be >= 1")
    args = (prompts, max_new_tokens, sampling, seed, stop_tokens, num_samples, logprobs)
    if speedup:
      self._generate(*args)  # compile
    start = time.perf_counter()
    completions, stats = self._generate(*args)
    stats.seconds = time.perf_counter() - start
    if speedup:
      same = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, logprobs=logprobs)
      same.update(stop_tokens=stop_tokens, num_samples=num_samples)
      alone = lambda: self.target.generate(prompts, **same)
      alone()
      start = time.perf_counter()
      alone()
      stats.target_seconds = time.perf_counter() - start
    return completions, stats

  # --- internals -----------------------------------------------------------------------------

  def _generate(self, prompts, max_new_tokens, sampling, seed, stop_tokens, num_samples, logprobs):
    sampler = self.target
    texts, ids = sampler._encode(prompts)
    short = self.draft.config.max_len
    for n, p in enumerate(ids):
      if len(p) >= short:
        raise ValueError(f"prompt {n} has {len(p)} tokens; the draft's context is {short}")
    stops = sampler._stop_tokens(stop_tokens)
    rows = [(i, r) for i in range(len(ids)) for r in range(i * num_samples, (i + 1) * num_samples)]
    per_batch = self.batch_size or len(rows)
    decoder = self._decoder(sampling, stops, max_new_tokens, logprobs)
    stats, out = SpecStats(k=self.k), []
    for start in range(0, len(rows), per_batch):
      batch = rows[start : start + per_batch]
      host = self._run(decoder, [ids[i] for i, _ in batch], [r for _, r in batch], seed)
      out += [
        sampler._completion(r, texts[i], ids[i], host, j, stops, logprobs)
        for j, (i, r) in enumerate(batch)
      ]
      stats.proposed += int(host["proposed_B"].sum())
      stats.accepted += int(host["accepted_B"].sum())
      stats.tokens += int(host["num_B"].sum())
      stats.target_forwards += int(host["forwards_B"].sum())
    return out, stats

  def _decoder(self, sampling, stops, max_new_tokens, logprobs) -> SpecDecoder:
    key = (sampling, stops, max_new_tokens, logprobs)
    if key not in self._decoders:
      self._decoders[key] = SpecDecoder(
        self.target.model, self.draft.model, sampling, self.k, stops, max_new_tokens, logprobs
      )
    return self._decoders[key]

  def _run(self, decoder: SpecDecoder, ids, rows, seed) -> dict[str, np.ndarray]:
    """Prefill + round loops of one batch (caches grown between loops); the host outputs."""
    sampler, b = self.target, len(ids)
    pad_rows = -(-b // sampler._batch_multiple()) * sampler._batch_multiple() - b
    ids, rows = ids + [ids[0]] * pad_rows, rows + [rows[0]] * pad_rows
    lengths = np.array([len(p) for p in ids], np.int32)
    limit = self.target.config.max_len + self.k  # rounds write up to k slots past the context
    context = min(self.target.config.max_len, self.draft.config.max_len)
    width = cache_lib.bucket(int(lengths.max()), context, 16)
    tokens = np.zeros((len(ids), width), np.int32)
    for i, p in enumerate(ids):
      tokens[i, : len(p)] = p
    capacity = cache_lib.bucket(max(width, int(lengths.max()) + self.k + 1), limit)
    seed_arr = jnp.int32(seed)
    t_vars, d_vars = self.target.variables, self.draft.variables
    with sampler._context():
      args = sampler._put(tokens, lengths, np.array(rows, np.int32))
      state = decoder.prefill(t_vars, d_vars, capacity, *args, seed_arr)
      while True:
        state = decoder.decode(t_vars, d_vars, state, seed_arr)
        lengths, reasons = jax.device_get((state.base.cache["lengths"], state.base.reason_B))
        running = reasons == decode_lib.RUNNING
        if not running.any():
          break
        need = int(lengths[running].max()) + self.k + 1
        old = cache_lib.capacity_of(state.base.cache)
        capacity = cache_lib.bucket(max(need, old + 1), limit)
        if capacity < need:  # cannot happen: a running row's last token precedes the context end
          raise RuntimeError(f"speculative caches cannot grow past {old} slots")
        base = state.base._replace(cache=self._grow(state.base.cache, capacity))
        state = state._replace(base=base, draft_cache=self._grow(state.draft_cache, capacity))
    host = decode_lib.to_host(state.base)
    stats = ("proposed_B", "accepted_B", "forwards_B")
    host.update(zip(stats, jax.device_get([getattr(state, k) for k in stats])))
    return {k: v[:b] for k, v in host.items()}


def acceptance_rate(
  target_model: nn.Module,
  target_vars: dict,
  draft_model: nn.Module,
  draft_vars: dict,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int = 16,
  k: int = 4,
  temperature: float = 0.0,
  seed: int = 0,
  mesh: jax.sharding.Mesh | None = None,
) -> float:
  """The share of the draft's tokens its target accepts, drafting ``max_new_tokens`` for each
  of ``prompts`` (token-id lists) with no stop token: greedy (temperature 0: how often the
  draft's argmax is the target's) or sampled at ``temperature`` (1: the expected acceptance,
  1 - the total variation distance of the two distributions, averaged over the positions)."""
  spec = SpeculativeSampler(target_model, target_vars, draft_model, draft_vars, k=k, mesh=mesh)
  params = SamplingParams(temperature=temperature)
  _, stats = spec.generate(prompts, max_new_tokens, params, seed, stop_tokens=())
  return stats.acceptance_rate
