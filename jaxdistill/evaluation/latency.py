"""Latency and size of trained models: compiled forward passes timed warm and interleaved, the
compiled program's memory, and the params and bytes the model holds.

  measure(fns, repeats, warmup)       median / quartiles / p90 / min seconds of no-argument
                                      calls, timed round-robin (call i of every fn in round i),
                                      so that a shared machine's drifting speed hits every
                                      model alike
  compiled_memory(jitted, *args)      XLA's memory analysis of the compiled program (bytes)
  size(variables)                     params and bytes (per dtype) of a model's variables
  example_batch(model, B, T)          a valid dummy batch for ``models.apply``
  model_latency(entries, batch_fn)    all of it for several models at several batch sizes: the
                                      "latency" block of ``jaxdistill eval``'s JSON
  generation_latency(entries, sizes)  a decoder's time to first token and decode tokens/s
                                      (``generate.timing``): each model's "generate" block
  samplers(entries), time_generation(samplers, sizes)   the same in two steps, so a caller
                                      can reuse the warm samplers (the quickstart's samples)

Where it runs: without a mesh, each model's variables and the batch are put on this
process's first device (``jax.local_devices()[0]``; a model sharded over several devices is
gathered onto it) and the forward is compiled for that one device: latency at batch 1 cannot
use a data-parallel mesh anyway, and one device is how a small student is served. With a mesh
the variables stay as given and a batch is split over its data axes when its size divides them
(else replicated).
"""

import contextlib
import copy
import statistics
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from jaxdistill import models
from jaxdistill.generate import sampler as sampler_lib
from jaxdistill.generate import timing
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib


def measure(
  fns: dict[str, Callable[[], Any]], repeats: int = 30, warmup: int = 3
) -> dict[str, dict[str, Any]]:
  """Times no-argument calls, interleaved: round i runs every fn once, in the dict's order.

  Each call is waited for (``jax.block_until_ready`` on what it returns), so a time is the
  whole call, dispatch to result. ``warmup`` calls of each fn run first, untimed (a first call
  compiles, allocates, warms caches).

  Args:
    fns: name -> a callable running one forward pass (already compiled) and returning arrays.
    repeats: timed calls per fn (>= 1).
    warmup: untimed calls per fn before the first round.
  Returns:
    name -> {"median_s", "p25_s" and "p75_s" (the quartiles: their distance, the interquartile
    range, is the spread the report's Pareto front reads as the timing's noise), "p90_s"
    (percentiles: linear interpolation between order statistics), "min_s", "repeats"}.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  clock = time.perf_counter
  for _ in range(repeats):
    for name, fn in fns.items():
      start = clock()
      jax.block_until_ready(fn())
      times[name].append(clock() - start)
  return {
    name: {
      "median_s": statistics.median(t),
      "p25_s": float(np.percentile(t, 25)),
      "p75_s": float(np.percentile(t, 75)),
      "p90_s": float(np.percentile(t, 90)),
      "min_s": min(t),
      "repeats": len(t),
    }
    for name, t in times.items()
  }


_MEMORY_FIELDS = {
  "temp_bytes": "temp_size_in_bytes",
  "argument_bytes": "argument_size_in_bytes",
  "output_bytes": "output_size_in_bytes",
  "alias_bytes": "alias_size_in_bytes",
  "generated_code_bytes": "generated_code_size_in_bytes",
}


def memory_of(compiled: Any) -> dict[str, int | None]:
  """``compiled_memory`` of an already compiled program (``jax.stages.Compiled``)."""
  stats = compiled.memory_analysis()  # None where a backend has no analysis
  out = {key: getattr(stats, field, None) for key, field in _MEMORY_FIELDS.items()}
  out = {k: int(v) if v is not None else None for k, v in out.items()}
  parts = [out["argument_bytes"], out["output_bytes"], out["temp_bytes"]]
  # An output aliasing (donated into) an argument's buffer is counted in both: subtract it once.
  alias = out["alias_bytes"] or 0
  out["total_bytes"] = sum(parts) - alias if None not in parts else None
  return out


def compiled_memory(jitted: Any, *args: Any) -> dict[str, int | None]:
  """XLA's memory analysis of ``jitted`` compiled for ``args``.

  Args:
    jitted: a ``jax.jit``-wrapped function.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``; nothing runs).
  Returns:
    {"temp_bytes", "argument_bytes", "output_bytes", "alias_bytes", "generated_code_bytes",
    "total_bytes"}: bytes per device; total = arguments + outputs + temporaries - aliased
    outputs (the buffers one call holds at most; code excluded). A field the backend does not
    report (or a backend with no analysis at all) is None, and so is a total that needs it.
  """
  return memory_of(jitted.lower(*args).compile())


def size(variables: Any) -> dict[str, Any]:
  """Params and bytes of a model's variables.

  "params" counts the elements of the "params" collection alone (the trained weights, what
  "a 10M-parameter model" means); "bytes" and "bytes_by_dtype" count every collection, since
  serving needs them all (an image classifier's BatchNorm "batch_stats", an FP8 model's
  scales). A tree without a "params" key is taken as params alone. Arrays, NumPy arrays,
  ``jax.ShapeDtypeStruct`` and boxed (``nn.Partitioned``) leaves are all counted.

  Args:
    variables: {"params": ..., other collections} or a bare param tree.
  Returns:
    {"params": int, "bytes": int, "bytes_by_dtype": {"float32": int, "bfloat16": int, ...}}
    (dtype names sorted; their bytes add up to "bytes").
  """
  variables = nn.unbox(variables)
  is_variables = isinstance(variables, dict) and "params" in variables
  params = variables["params"] if is_variables else variables
  by_dtype: dict[str, int] = {}
  for leaf in jax.tree.leaves(variables):
    dtype = np.dtype(leaf.dtype)
    by_dtype[dtype.name] = by_dtype.get(dtype.name, 0) + _count(leaf) * dtype.itemsize
  return {
    "params": sum(_count(leaf) for leaf in jax.tree.leaves(params)),
    "bytes": sum(by_dtype.values()),
    "bytes_by_dtype": dict(sorted(by_dtype.items())),
  }


def _count(leaf: Any) -> int:
  return int(np.prod(np.shape(leaf), dtype=np.int64))


def _model_config(model: Any) -> Any:
  """The TransformerConfig / VisionConfig of a module, a model config or a config section."""
  if isinstance(model, nn.Module):
    return model.config
  if isinstance(model, (models.TransformerConfig, models.VisionConfig)):
    return model
  policy = precision.parse_policy(model["policy"], "policy")
  return models.build(model, policy, "model").config


def example_batch(model: Any, batch_size: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
  """A valid dummy batch for ``models.apply(model, ...)``, on the host.

  Args:
    model: a module (``models.build``), its TransformerConfig / VisionConfig, or a config
      section (``cfg.student``).
    batch_size: B.
    seq_len: T of a transformer's rows (default: its max_len); an image classifier ignores it.
  Returns:
    A transformer's {"inputs": [B, T] int32 token ids in [0, vocab_size)} (one full document a
    row: no segment ids or positions, as a served request); an image classifier's
    {"inputs": [B, H, W, C] float32}, standard-normal (normalised images). Fixed seed.
  """
  config = _model_config(model)
  rng = np.random.default_rng(0)
  if isinstance(config, models.VisionConfig):
    shape = (batch_size, config.image_size, config.image_size, config.image_channels)
    return {"inputs": rng.standard_normal(shape, dtype=np.float32)}
  seq_len = config.max_len if seq_len is None else seq_len
  if seq_len > config.max_len:
    raise ValueError(f"seq_len {seq_len} exceeds the model's max_len {config.max_len}")
  ids = rng.integers(0, config.vocab_size, (batch_size, seq_len), dtype=np.int32)
  return {"inputs": ids}


def _output(out: dict) -> jax.Array:
  """What a served forward returns: logits, or an encoder's embedding."""
  return out["logits"] if "logits" in out else out["embedding"]


def _place(tree: Any, mesh: jax.sharding.Mesh | None, batch_size: int | None = None) -> Any:
  """Variables (``batch_size`` None) or a batch onto the default device, or onto ``mesh``."""
  if mesh is None:
    return jax.device_put(tree, jax.local_devices()[0])
  if batch_size is None:
    return tree  # variables: already in their shardings
  splits = batch_size % sharding_lib.axis_size(mesh, *sharding_lib.BATCH_AXES) == 0
  where = sharding_lib.batch_sharding(mesh) if splits else sharding_lib.replicated(mesh)
  return jax.device_put(tree, where)


def model_latency(
  entries: dict[str, tuple[nn.Module, Any]],
  batch_fn: Callable[[int], dict],
  batch_sizes: Sequence[int] = (1, 32),
  repeats: int = 30,
  warmup: int = 3,
  mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
  """Forward latency of several models at several batch sizes, and compiled memory.

  For each batch size, every model's forward (``models.apply`` -> "logits", or an encoder's
  "embedding") is compiled for that batch, then all are timed together by ``measure``
  (interleaved: student and teacher see the same machine load). Memory is the compiled
  program's at the largest (serving) batch size.

  Args:
    entries: name (e.g. "student", "teacher") -> (module, variables: {"params": ...} unboxed).
    batch_fn: batch size -> a batch for every model (e.g. ``lambda b: example_batch(m, b, T)``).
    batch_sizes: the batch sizes, e.g. (1, 32): one request, and a serving batch.
    repeats, warmup: as ``measure``.
    mesh: None: the default device (see the module docstring); else the mesh the variables
      are on.
  Returns:
    {"batch_sizes": [...], name: {"batch_<B>": measure's dict, "memory": compiled_memory's
    dict}} for every name.
  """
  if not batch_sizes:
    raise ValueError("batch_sizes is empty")
  placed = {name: (module, _place(v, mesh)) for name, (module, v) in entries.items()}
  forward = {
    name: jax.jit(
      lambda variables, batch, module=module: _output(models.apply(module, variables, batch))
    )
    for name, (module, _) in placed.items()
  }
  out: dict[str, Any] = {"batch_sizes": [int(b) for b in batch_sizes]}
  out.update({name: {} for name in entries})
  memory = {}
  for b in batch_sizes:
    batch = _place(batch_fn(b), mesh, b)
    fns = {}
    with sharding_lib.rules_context(mesh) if mesh is not None else contextlib.nullcontext():
      for name, (_, variables) in placed.items():
        compiled = forward[name].lower(variables, batch).compile()
        fns[name] = lambda c=compiled, v=variables, x=batch: c(v, x)
        if b == max(batch_sizes):
          memory[name] = memory_of(compiled)
    for name, stats in measure(fns, repeats, warmup).items():
      out[name][f"batch_{b}"] = stats
  for name in entries:
    out[name]["memory"] = memory[name]
  return out


def generation_latency(
  entries: dict[str, tuple[nn.Module, Any]],
  batch_sizes: Sequence[int] = (1, 32),
  prompt_tokens: int = 32,
  new_tokens: int = 32,
  repeats: int = 5,
  warmup: int = 1,
) -> dict[str, dict[str, Any]]:
  """Generation speed of the decoders among ``entries`` on this process's first device:
  ``time_generation`` of their ``samplers``. Encoders and image classifiers are skipped (they
  do not generate).

  Args:
    entries: name -> (module, variables), as ``model_latency``.
    batch_sizes, prompt_tokens, new_tokens, repeats, warmup: as ``time_generation``.
  Returns:
    name -> ``time_generation``'s block, for every decoder.
  """
  found = samplers(entries)
  return time_generation(found, batch_sizes, prompt_tokens, new_tokens, repeats, warmup)


def samplers(
  entries: dict[str, tuple[nn.Module, Any]], tokenizers: dict[str, Any] | None = None
) -> dict[str, sampler_lib.Sampler]:
  """name -> a ``generate.Sampler`` on this process's first device (one batch per request),
  for the decoders among ``entries`` (name -> (module, variables)); ``tokenizers``: name ->
  its tokenizer, for text prompts.

  Models of one architecture (equal modules: e.g. a KD student and its CE twin) share one
  sampler's compiled programs: each is a shallow copy of the first with its own variables and
  tokenizer, so the second compiles nothing.
  """
  out: dict[str, sampler_lib.Sampler] = {}
  for name, (module, variables) in entries.items():
    tokenizer = (tokenizers or {}).get(name)
    try:
      own = sampler_lib.Sampler(module, _place(variables, None), tokenizer)
    except ValueError:  # not a decoder
      continue
    twin = next((s for s in out.values() if s.model == module), None)
    if twin is not None:
      cast, own = own.variables, copy.copy(twin)
      own.variables, own.tokenizer = cast, tokenizer
    out[name] = own
  return out


def time_generation(
  found: dict[str, sampler_lib.Sampler],
  batch_sizes: Sequence[int] = (1, 32),
  prompt_tokens: int = 32,
  new_tokens: int = 32,
  repeats: int = 5,
  warmup: int = 1,
) -> dict[str, dict[str, Any]]:
  """Time to first token and decode tokens/s of greedy generation (``generate.timing``): at
  the smallest batch size (one request) and the largest (the serving batch), the samplers
  interleaved.

  Args:
    found: name -> Sampler (``samplers``; batch_size None).
    batch_sizes: their smallest and largest are timed.
    prompt_tokens, new_tokens: per row (clamped to each model's context by ``timing.lengths``).
    repeats, warmup: timed and untimed requests per model and batch size.
  Returns:
    name -> {"batch_<B>": ``timing.measure``'s dict for each timed B, "memory":
    ``timing.memory_bytes`` at the largest B}.
  """
  if not batch_sizes:
    raise ValueError("batch_sizes is empty")
  out: dict[str, dict[str, Any]] = {name: {} for name in found}
  if not found:
    return out
  sizes = sorted({min(batch_sizes), max(batch_sizes)})
  for b in sizes:
    stats = timing.measure(found, b, prompt_tokens, new_tokens, repeats, warmup)
    for name, s in stats.items():
      out[name][f"batch_{b}"] = s
  for name, s in found.items():
    out[name]["memory"] = timing.memory_bytes(s, sizes[-1], prompt_tokens, new_tokens)
  return out
