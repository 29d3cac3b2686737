"""How fast a decoder generates: time to first token and steady-state decode tokens/s.

  measure(samplers, batch_size, prompt_tokens, new_tokens)   name -> the timings of one batch
  lengths(config, prompt_tokens, new_tokens)                 both clamped to the model's context
  memory_bytes(sampler, batch_size, prompt_tokens, new_tokens)  params + key/value cache bytes

A timed request is one ``Sampler.stream`` call (``chunk=0``: the cache's whole room per decode
call) of ``batch_size`` rows of random ``prompt_tokens``-token prompts, greedy, without stop
tokens, so every row generates ``new_tokens`` (fewer only at the model's last position). Its
first yield comes once the prefill has chosen every row's first token and the host has it:
the time to first token (TTFT: prefill of the prompts + the first token). The rest of the call
is decode: ``rows x (tokens - 1)`` tokens, so decode tokens/s is that over the time from the
first to the last yield. Untimed warm-up requests first compile the prefill, the decode loop
of each cache bucket the request reaches and the cache's growth, so neither number holds a
compile. Samplers are timed round-robin (request i of every sampler in round i), as
``evaluation.latency.measure`` does, so a shared machine's drifting speed hits every model
alike.
"""

import statistics
import time
from typing import Any

import jax
import numpy as np

from jaxdistill.generate import cache as cache_lib
from jaxdistill.generate import sampler as sampler_lib


def lengths(config: Any, prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
  """(prompt, new) tokens that fit a model of ``config.max_len`` positions: the prompt at most
  half the context, the new tokens at most the rest (a test-size model of 32 positions gets
  16 + 16)."""
  prompt = max(1, min(prompt_tokens, config.max_len // 2))
  return prompt, max(1, min(new_tokens, config.max_len - prompt))


def prompts(config: Any, batch_size: int, prompt_tokens: int) -> list[list[int]]:
  """``batch_size`` random prompts of ``prompt_tokens`` ids in [0, vocab_size) (fixed seed)."""
  rng = np.random.default_rng(0)
  return rng.integers(0, config.vocab_size, (batch_size, prompt_tokens)).tolist()


def _request(sampler: sampler_lib.Sampler, rows: list[list[int]], new_tokens: int) -> tuple:
  """(seconds to the first yield, seconds from it to the last, decode tokens) of one request."""
  clock = time.perf_counter
  start = clock()
  first = last = None
  final: list = []
  for final in sampler.stream(rows, max_new_tokens=new_tokens, stop_tokens=(), chunk=0):
    last = clock()
    if first is None:
      first = last
  decoded = sum(len(c.token_ids) - 1 for c in final)
  return first - start, last - first, decoded


def _stats(times: list[float]) -> dict[str, float]:
  return {
    "median_s": statistics.median(times),
    "p25_s": float(np.percentile(times, 25)),
    "p75_s": float(np.percentile(times, 75)),
    "min_s": min(times),
  }


def measure(
  samplers: dict[str, sampler_lib.Sampler],
  batch_size: int,
  prompt_tokens: int = 32,
  new_tokens: int = 32,
  repeats: int = 5,
  warmup: int = 1,
) -> dict[str, dict[str, Any]]:
  """Times generation of several decoders at one batch size (see the module docstring).

  Args:
    samplers: name -> a Sampler (its batch_size None or >= ``batch_size``: one batch).
    batch_size: rows per request.
    prompt_tokens, new_tokens: per row, each clamped to the model by ``lengths``.
    repeats: timed requests per sampler (>= 1).
    warmup: untimed requests per sampler first (>= 1: the first one compiles).
  Returns:
    name -> {"ttft": {"median_s", "p25_s", "p75_s", "min_s"} (the time to first token),
    "decode_step": the same for one decode step of the whole batch (the time from first to
    last token over the steps), "ttft_s" (its median), "decode_tokens_per_s" (rows x decode
    tokens / median decode time: the batch's throughput), "decode_tokens" (a request's tokens
    after the first, over its rows: rows x (new_tokens - 1)), "prompt_tokens", "new_tokens",
    "repeats"}.
  """
  if repeats < 1 or warmup < 1:
    raise ValueError(f"repeats and warmup must be >= 1, got {repeats}, {warmup}")
  shapes = {name: lengths(s.config, prompt_tokens, new_tokens) for name, s in samplers.items()}
  rows = {name: prompts(s.config, batch_size, shapes[name][0]) for name, s in samplers.items()}
  for name, s in samplers.items():
    for _ in range(warmup):
      _request(s, rows[name], shapes[name][1])
  ttft = {name: [] for name in samplers}
  step, decoded = {name: [] for name in samplers}, {}
  for _ in range(repeats):
    for name, s in samplers.items():
      first, rest, decoded[name] = _request(s, rows[name], shapes[name][1])
      ttft[name].append(first)
      step[name].append(rest * batch_size / max(decoded[name], 1))
  out = {}
  for name in samplers:
    decode = _stats(step[name])
    out[name] = {
      "ttft": _stats(ttft[name]),
      "decode_step": decode,
      "ttft_s": statistics.median(ttft[name]),
      "decode_tokens_per_s": batch_size / decode["median_s"] if decoded[name] else None,
      "decode_tokens": decoded[name],
      "prompt_tokens": shapes[name][0],
      "new_tokens": shapes[name][1],
      "repeats": repeats,
    }
  return out


def memory_bytes(
  sampler: sampler_lib.Sampler, batch_size: int, prompt_tokens: int, new_tokens: int
) -> dict[str, int]:
  """Bytes a request holds on its device: the variables as the sampler serves them (float
  params cast to the compute dtype), and the key/value cache in the bucket that holds the
  prompt and the new tokens (``generate.cache``). Counted from shapes, not measured: the
  program's activations and the decode state's token buffers are not in it.

  Returns:
    {"params_bytes", "cache_bytes", "total_bytes"}.
  """
  config = sampler.config
  prompt, new = lengths(config, prompt_tokens, new_tokens)
  width = cache_lib.bucket(prompt, config.max_len, sampler_lib.MIN_PROMPT_BUCKET)
  capacity = cache_lib.bucket(max(width, prompt + new - 1, prompt + 1), config.max_len)
  shapes = cache_lib.cache_shapes(config, batch_size, capacity, config.dtype)
  count = lambda tree: sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in tree)
  params = count(jax.tree.leaves(sampler.variables))
  cache = count(x for kv in shapes["layers"] for x in kv)
  return {"params_bytes": params, "cache_bytes": cache, "total_bytes": params + cache}
