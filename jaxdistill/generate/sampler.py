"""The Python API of generation: ``Sampler(model, variables, tokenizer).generate(prompts, ...)``.

    sampler = generate.Sampler(model, variables, tokenizer)
    for c in sampler.generate(["def add(a, b):"], max_new_tokens=32):
      print(c.text, c.stop_reason)
    for partial in sampler.stream(prompts, max_new_tokens=256, chunk=16):
      ...  # every 16 tokens: the completions so far

A request's prompts (each repeated ``num_samples`` times) run in batches of ``batch_size`` rows:
one prefill, then decode calls that each run many tokens in one jitted loop
(``decode.Decoder``). Between calls the host only reads how far the rows got, grows the
key/value cache into the next bucket when it is full (``cache.grow``) and, when streaming, hands
out the tokens so far. Row r of a request (prompt r // num_samples, sample r % num_samples)
draws from keys derived from (seed, r, t) whatever the batch it lands in.

With a ``mesh`` the variables must already sit in their shardings; batches are split over the
data axes (rows are padded to a multiple of them) and the cache's kv heads over ``tensor``.
Float params stored wider than the compute dtype (an fp32-stored bf16 model) are cast once, so
no step re-reads the wide copy.
"""

import contextlib
import dataclasses
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.generate import cache as cache_lib
from jaxdistill.generate import decode as decode_lib
from jaxdistill.generate.sampling import SamplingParams
from jaxdistill.parallel import sharding as sharding_lib

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass
class Completion:
  """One generated sequence.

  Attributes:
    index: the row's index in the request (prompt * num_samples + sample).
    prompt: the prompt's text ("" when given as token ids without a tokenizer).
    prompt_ids: its token ids.
    token_ids: the generated ids (a stop token, when one ended the row, is the last).
    text: the generated text without the stop token ("" without a tokenizer).
    logprobs: the model's log-probability of each generated token (None unless requested).
    stop_reason: "stop", "length" (max_new_tokens), "context" (the model's last position),
      or None while the row is still running (``stream``).
  """

  index: int
  prompt: str
  prompt_ids: list[int]
  token_ids: list[int]
  text: str
  logprobs: list[float] | None
  stop_reason: str | None


class Sampler:
  """Generates from one decoder.

  Args:
    model: a decoder module (``models.build``'s; not an encoder or image classifier).
    variables: its variables ({"params": ...}, unboxed; sharded when ``mesh`` is given).
    tokenizer: a ``tokenizers.Tokenizer`` (for text prompts and completions), or None (prompts
      as token-id lists).
    mesh: the device mesh the variables live on (None: one device).
    rules: the rules table the variables were sharded with (None: the default).
    batch_size: rows per batch (None: the whole request in one batch).
  Raises:
    ValueError: the model is not a decoder.
  """

  def __init__(
    self,
    model: nn.Module,
    variables: dict,
    tokenizer: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    batch_size: int | None = None,
  ):
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "max_len") or getattr(cfg, "encoder", False):
      raise ValueError(
        "generation needs a decoder-only language model (not an encoder or image classifier)"
      )
    self.model, self.config, self.tokenizer = model, cfg, tokenizer
    self.mesh, self.rules, self.batch_size = mesh, rules, batch_size
    self.variables = _cast_params(variables, cfg.dtype)
    self._decoders: dict = {}
    self._grow = jax.jit(cache_lib.grow, static_argnums=(1,))

  # --- the public calls --------------------------------------------------------------------

  def generate(self, prompts: Sequence[str | Sequence[int]], **kwargs) -> list[Completion]:
    """The finished completions of ``prompts`` (arguments as ``stream``, without ``chunk``)."""
    final = None
    for final in self.stream(prompts, chunk=0, **kwargs):
      pass
    return final

  def stream(
    self,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    seed: int = 0,
    stop_tokens: Sequence[int] | None = None,
    num_samples: int = 1,
    logprobs: bool = False,
    chunk: int = 16,
    prompt_offset: int = 0,
  ) -> Iterator[list[Completion]]:
    """Generates, yielding every row's completion so far after each decode call.

    Args:
      prompts: texts (needs the tokenizer) or token-id lists; none may be empty or as long as
        the model's context (max_len).
      max_new_tokens: the most tokens a row gets (>= 1).
      sampling: the knobs (greedy by default).
      seed: the request's seed.
      stop_tokens: ids that end a row (None: the tokenizer's end-of-text token, if any).
      num_samples: completions per prompt.
      logprobs: return each generated token's log-probability.
      chunk: tokens per decode call between yields (0: as many as the cache holds).
      prompt_offset: the prompts are prompts ``prompt_offset ..`` of a larger request: row
        indices (and so the sampling keys) start at ``prompt_offset * num_samples``, so a
        request run in parts (``jaxdistill generate`` resuming its output) draws the same
        tokens as in one call.
    Yields:
      Lists of ``Completion`` in request order (a row's stop_reason is None while it runs);
      the last list is final.
    Raises:
      ValueError: an empty or too long prompt, text prompts without a tokenizer, bad counts.
    """
    if max_new_tokens < 1 or num_samples < 1 or chunk < 0 or prompt_offset < 0:
      raise ValueError("max_new_tokens and num_samples must be >= 1, chunk, prompt_offset >= 0")
    texts, ids = self._encode(prompts)
    stops = self._stop_tokens(stop_tokens)
    first = prompt_offset * num_samples
    rows = [(i, first + i * num_samples + s) for i in range(len(ids)) for s in range(num_samples)]
    per_batch = self.batch_size or len(rows)
    done: list[Completion] = []
    for start in range(0, len(rows), per_batch):
      batch = rows[start : start + per_batch]
      decoder = self._decoder(sampling, stops, max_new_tokens, logprobs)
      for partial in self._run(
        decoder, [ids[i] for i, _ in batch], [r for _, r in batch], seed, chunk, max_new_tokens
      ):
        current = [
          self._completion(r, texts[i], ids[i], partial, j, stops, logprobs)
          for j, (i, r) in enumerate(batch)
        ]
        yield done + current
      done += current

  # --- internals -----------------------------------------------------------------------------

  def _encode(self, prompts) -> tuple[list[str], list[list[int]]]:
    if isinstance(prompts, str):
      raise ValueError("prompts must be a list of prompts, not one string")
    texts, ids = [], []
    for n, p in enumerate(prompts):
      if isinstance(p, str):
        if self.tokenizer is None:
          raise ValueError("text prompts need a tokenizer (or pass token-id lists)")
        texts.append(p)
        ids.append(list(self.tokenizer.encode(p).ids))
      else:
        texts.append(self.tokenizer.decode(list(p)) if self.tokenizer is not None else "")
        ids.append([int(t) for t in p])
      if not ids[-1]:
        raise ValueError(f"prompt {n} is empty (no tokens)")
      if len(ids[-1]) >= self.config.max_len:
        raise ValueError(
          f"prompt {n} has {len(ids[-1])} tokens; the model's context (max_len) is "
          f"{self.config.max_len}: shorten it below that"
        )
      if max(ids[-1]) >= self.config.vocab_size or min(ids[-1]) < 0:
        raise ValueError(f"prompt {n} has token ids outside [0, {self.config.vocab_size})")
    if not ids:
      raise ValueError("no prompts")
    return texts, ids

  def _stop_tokens(self, stop_tokens) -> tuple[int, ...]:
    if stop_tokens is None:
      if self.tokenizer is None:
        return ()
      from jaxdistill.data import tokenizer as tokenizer_lib

      eos = tokenizer_lib.eos_id(self.tokenizer)
      return () if eos is None else (eos,)
    for t in stop_tokens:
      if not 0 <= int(t) < self.config.vocab_size:
        raise ValueError(f"stop token {t} is outside the vocabulary [0, {self.config.vocab_size})")
    return tuple(int(t) for t in stop_tokens)

  def _decoder(self, sampling, stops, max_new_tokens, logprobs) -> decode_lib.Decoder:
    key = (sampling, stops, max_new_tokens, logprobs)
    if key not in self._decoders:
      self._decoders[key] = decode_lib.Decoder(
        self.model, sampling, stops, max_new_tokens, logprobs
      )
    return self._decoders[key]

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding_lib.rules_context(self.mesh, self.rules)

  def _run(self, decoder, ids, rows, seed, chunk, max_new_tokens) -> Iterator[dict]:
    """Prefill + decode calls of one batch; yields the host outputs after each call."""
    b = len(ids)
    pad_rows = _round_up(b, self._batch_multiple()) - b
    ids, rows = ids + [ids[0]] * pad_rows, rows + [rows[0]] * pad_rows
    lengths = np.array([len(p) for p in ids], np.int32)
    limit = self.config.max_len
    width = cache_lib.bucket(int(lengths.max()), limit, MIN_PROMPT_BUCKET)
    tokens = np.zeros((len(ids), width), np.int32)
    for i, p in enumerate(ids):
      tokens[i, : len(p)] = p
    capacity = cache_lib.bucket(max(width, int(lengths.max()) + 1), limit)
    seed_arr = jnp.int32(seed)
    with self._context():
      args = self._put(tokens, lengths, np.array(rows, np.int32))
      state = decoder.prefill(self.variables, capacity, *args, seed_arr)
      generated = 1
      while True:
        host = decode_lib.to_host(state)
        yield {k: v[:b] for k, v in host.items()}
        if (host["reason_B"] != decode_lib.RUNNING).all() or generated >= max_new_tokens:
          return
        room = decode_lib.room(state)
        if room < 1:
          state = state._replace(
            cache=self._grow(
              state.cache, cache_lib.bucket(cache_lib.capacity_of(state.cache) + 1, limit)
            )
          )
          room = decode_lib.room(state)
        steps = min(room, max_new_tokens - generated, chunk or max_new_tokens)
        state = decoder.decode(self.variables, state, jnp.int32(steps), seed_arr)
        generated += steps

  def _batch_multiple(self) -> int:
    if self.mesh is None:
      return 1
    return int(np.prod([self.mesh.shape[a] for a in sharding_lib.BATCH_AXES]))

  def _put(self, *arrays):
    if self.mesh is None:
      return tuple(jnp.asarray(a) for a in arrays)
    spec = jax.sharding.PartitionSpec(sharding_lib.BATCH_AXES)
    return tuple(jax.device_put(a, jax.sharding.NamedSharding(self.mesh, spec)) for a in arrays)

  def _completion(self, index, text, prompt_ids, host, j, stops, logprobs) -> Completion:
    n = int(host["num_B"][j])
    tokens = [int(t) for t in host["tokens_BxN"][j, :n]]
    reason = decode_lib.REASONS.get(int(host["reason_B"][j]))
    shown = tokens[:-1] if reason == "stop" and tokens and tokens[-1] in stops else tokens
    return Completion(
      index=index,
      prompt=text,
      prompt_ids=list(prompt_ids),
      token_ids=tokens,
      text=self.tokenizer.decode(shown) if self.tokenizer is not None else "",
      logprobs=[float(x) for x in host["logprobs_BxN"][j, :n]] if logprobs else None,
      stop_reason=reason,
    )


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _cast_params(variables: dict, dtype: Any) -> dict:
  """``variables`` with float params wider than ``dtype`` cast to it (other leaves as they are)."""

  def cast(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
      if jnp.finfo(x.dtype).bits > jnp.finfo(dtype).bits:
        return x.astype(dtype)
    return x

  out = dict(variables)
  if "params" in out:
    out["params"] = jax.tree.map(cast, out["params"])
  return out
