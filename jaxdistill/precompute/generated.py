"""``jaxdistill precompute --generate``: the teacher writes a training set (sequence-level KD).

  jaxdistill precompute --generate --config configs/seq_kd.py:teacher_data --output DIR
  jaxdistill precompute --verify --output DIR

The recipe of DeepSeek-R1's distilled models: prompts go to the teacher, which writes
``precompute.generate.samples`` completions each (``generate.Sampler``: KV-cache decoding,
sampling keys from (seed, global prompt index, sample, step)); filters keep the good ones, and
a student trains on them (``data.source=task`` with ``data.task_train_files`` =
``DIR/shard-*.arrayrecord``; the prompt carries no loss).

Prompts (``precompute.generate.prompts_from``, ``generate_prompts.py``): a file, the first
``precompute.generate.prompts`` training problems of ``data.task``, or the first
``prompt_tokens`` tokens of training rows of a corpus (``data``: the teacher continues real
text; such records also hold "prompt_ids", "completion_ids" (the end-of-text last only when
the teacher wrote it) and "finished", and the training source reads the ids, not the texts).
Filters, in order, each dropped sample counted under its reason in the manifest:

  unfinished       (``require_stop``) the completion hit max_new_tokens or the context
                   before its end-of-text
  length           fewer than ``min_tokens`` or more than ``max_tokens`` (0 = no bound) tokens
  duplicate        the same completion as a kept sample of the same prompt
  near_duplicate   (``dedup=near``) character 4-gram Jaccard similarity >= NEAR to one
  verifier         ``verifier`` ("module:function", called with (prompt, completion), returns
                   keep or not; ``jaxdistill.data.tasks:check`` checks an arithmetic answer)

Top-k teacher targets (``precompute.generate.topk`` K > 0, ``--topk K``): each kept record
also holds the teacher's top-k at every target of its completion, as the training row
(``task_data.encode_row``) lays it out: "topk_ids" [C, K], "topk_logp" [C, K] (log-probs at
``precompute.temperature``, or ``distill.temperature`` if 0, descending) and "topk_tail" [C]
(the mass outside the top k), the floats stored binary in ``precompute.logprob_dtype``
(``task_data.pack_floats``: bf16 by default, as the logit cache; base64 inside the JSON
record), C = the completion's tokens + end-of-text (cut
at ``data.seq_len``), computed by one teacher forward over the whole row (``sparse.
teacher_targets``, the cache's function). A run with ``teacher.source='cache'`` and
``teacher.path`` = the set trains the sparse head on them (``task_data``); the prompt carries
no loss.

Output: ArrayRecord shards of JSON records {"prompt", "completion", "prompt_index",
"sample", "tokens"}, ``prompts_per_shard`` prompts a shard; each shard is written to
``.partial``, its sidecar (records, sha256, drops) written, then renamed, so a process killed
at any point leaves only whole shards and a rerun redoes the rest with the same rows (the
content depends only on the config and the teacher). Process p writes the shards s with s %
P == p; process 0 writes ``manifest.json`` (kind "generated", the settings, the teacher's
identity, rows and drop counts) once all exist.
"""

import importlib
import json
import math
import time
from typing import Any, Callable

import jax
import numpy as np
from array_record.python import array_record_module

from jaxdistill import paths
from jaxdistill.data import cache_writer, cached
from jaxdistill.data import text as text_data
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.generate.sampler import Sampler
from jaxdistill.generate.sampling import SamplingParams
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.precompute import generate_prompts

KIND = "generated"
VERSION = 1
NEAR = 0.9
REASONS = ("unfinished", "length", "duplicate", "near_duplicate", "verifier")


def check_config(cfg: Any) -> None:
  """The ``precompute.generate`` keys and the teacher: a decoder that can write.

  Raises:
    ConfigError: naming the key.
  """
  g = cfg.precompute.generate
  for key, low in (("prompts", 1), ("samples", 1), ("max_new_tokens", 1), ("min_tokens", 0)):
    value = g[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ConfigError(f"precompute.generate.{key}", f"must be an int >= {low}, got {value!r}")
  for key in ("max_tokens", "top_k", "topk"):
    if not isinstance(g[key], int) or g[key] < 0:
      raise ConfigError(f"precompute.generate.{key}", f"must be an int >= 0, got {g[key]!r}")
  if g.prompts_per_shard < 1 or g.batch_size < 1:
    raise ConfigError("precompute.generate.prompts_per_shard", "and batch_size must be >= 1")
  if g.dedup not in ("none", "exact", "near"):
    raise ConfigError("precompute.generate.dedup", f"unknown {g.dedup!r}; none, exact or near")
  try:
    SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  except ValueError as e:
    raise ConfigError("precompute.generate", str(e)) from None
  t = cfg.teacher
  if t.source in ("none", "cache") or t.arch != "transformer" or t.encoder or cfg.teachers:
    raise ConfigError(
      "teacher.source",
      "precompute --generate needs one decoder teacher model to write (not "
      f"source={t.source!r}, an encoder, an image model or an ensemble)",
    )
  generate_prompts.check(cfg)
  load_verifier(g.verifier)


def load_verifier(spec: str) -> Callable[[str, str], bool] | None:
  """The callable ``module:function`` names (None for ""), imported now so a typo fails first."""
  if not spec:
    return None
  module, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ConfigError(
      "precompute.generate.verifier",
      f"{spec!r} does not import ({type(e).__name__}: {e}); give 'package.module:function'",
    ) from None
  if not callable(fn):
    raise ConfigError("precompute.generate.verifier", f"{spec!r} is not callable")
  return fn


def prompts_of(cfg: Any) -> list:
  """The prompts: texts, or token-id lists with ``prompts_from=data`` (``generate_prompts``)."""
  return generate_prompts.prompts(cfg)


def _grams(text: str) -> set[str]:
  return {text[i : i + 4] for i in range(max(len(text) - 3, 1))}


def keep_filter(cfg: Any, verifier: Callable | None) -> Callable:
  """``filter(prompt, completions of that prompt) -> (kept completions, drop counts)``."""
  g = cfg.precompute.generate

  def apply(prompt: str, completions: list) -> tuple[list, dict[str, int]]:
    drops = dict.fromkeys(REASONS, 0)
    kept, seen, grams = [], set(), []
    for c in completions:
      n = len(c.token_ids)
      if g.require_stop and c.stop_reason != "stop":
        reason = "unfinished"
      elif n < g.min_tokens or (g.max_tokens and n > g.max_tokens):
        reason = "length"
      elif g.dedup != "none" and c.text in seen:
        reason = "duplicate"
      elif g.dedup == "near" and any(_jaccard(_grams(c.text), other) >= NEAR for other in grams):
        reason = "near_duplicate"
      elif verifier is not None and not verifier(prompt, c.text):
        reason = "verifier"
      else:
        kept.append(c)
        seen.add(c.text)
        grams.append(_grams(c.text))
        continue
      drops[reason] += 1
    return kept, drops

  return apply


def _jaccard(a: set, b: set) -> float:
  return len(a & b) / max(len(a | b), 1)


def topk_temperature(cfg: Any) -> float:
  """The temperature of the stored top-k log-probs (as ``precompute.text.temperature``)."""
  return float(cfg.precompute.temperature or cfg.distill.temperature)


def topk_fn(cfg: Any, model: Any, mesh) -> Callable:
  """``fn(params, batch) -> {"topk_ids", "topk_logp", "tail"}`` [B, T, ...]: the teacher's
  top-k targets of whole rows (one forward, ``sparse.teacher_targets``), jitted."""
  from jaxdistill import models
  from jaxdistill.distill import sparse

  k, tau = cfg.precompute.generate.topk, topk_temperature(cfg)

  def targets(params, batch):
    out = models.apply(model, {"params": params}, batch, return_logits=False)
    b, t = batch["inputs"].shape
    tg = sparse.teacher_targets(
      out["final_hidden"].reshape(b * t, -1), out["head"], temperature=tau, k=k,
      token_chunk=cfg.distill.token_chunk,
    )  # fmt: skip
    return {name: v.reshape(b, t, *v.shape[1:]) for name, v in tg.items()}

  return jax.jit(targets, out_shardings=sharding_lib.batch_sharding(mesh))


def add_topk(cfg: Any, fn: Callable, params: Any, tokenizer: Any, mesh, records: list) -> None:
  """Adds "topk_ids", "topk_logp", "topk_tail" to each record (see the module docstring),
  ``precompute.generate.batch_size`` rows per teacher forward."""
  from jaxdistill.data import task_data

  b, t = cfg.precompute.generate.batch_size, cfg.data.seq_len
  dtype = cfg.precompute.logprob_dtype
  rows = [task_data.encode_row(tokenizer, *task_data.pair_of(r), t) for r in records]
  with sharding_lib.rules_context(mesh):
    for lo in range(0, len(rows), b):
      chunk = rows[lo : lo + b]
      host = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
      host = {
        k: np.concatenate([v, np.zeros((b - len(chunk), t), v.dtype)]) for k, v in host.items()
      }
      out = jax.device_get(fn(params, sharding_lib.shard_batch(host, mesh)))
      for i, row in enumerate(chunk):
        at = np.flatnonzero(row["weights"] > 0)  # the completion's targets
        record = records[lo + i]
        record["topk_ids"] = out["topk_ids"][i, at].astype(int).tolist()
        record["topk_logp"] = task_data.pack_floats(out["topk_logp"][i, at], dtype)
        record["topk_tail"] = task_data.pack_floats(out["tail"][i, at], dtype)


def settings(cfg: Any, identity: dict, num_prompts: int) -> dict:
  """What a rerun must share with the run that started ``output``."""
  g = cfg.precompute.generate.to_dict()
  if g["topk"]:  # the stored rows' layout and the log-probs' temperature
    g.update(topk_temperature=topk_temperature(cfg), seq_len=cfg.data.seq_len)
    g["logprob_dtype"] = cfg.precompute.logprob_dtype
  return {
    "kind": KIND,
    "version": VERSION,
    "generate": g,
    "prompts": num_prompts,
    "seed": cfg.seed,
    "task": cfg.data.task if cfg.data.source == "task" else None,
    # prompts cut from a corpus depend on how its rows are made
    "data": _data_settings(cfg) if generate_prompts.source(cfg) == "data" else None,
    "teacher": identity,
  }


def _data_settings(cfg: Any) -> dict:
  runtime = ("num_threads", "prefetch")  # how fast rows come, not which
  return {k: v for k, v in cfg.data.to_dict().items() if k not in runtime}


def _write_shard(output: str, s: int, records: list[dict], drops: dict) -> None:
  partial = cached.shard_path(output, s) + ".partial"
  writer = array_record_module.ArrayRecordWriter(partial, cached.WRITER_OPTIONS)
  for record in records:
    writer.write(json.dumps(record, sort_keys=True).encode("utf-8"))
  writer.close()
  side = {"index": s, "records": len(records), "sha256": cached.sha256_file(partial)}
  cache_writer.write_json(cached.sidecar_path(output, s), dict(side, drops=drops))
  paths.replace(partial, cached.shard_path(output, s))


def run(cfg: Any, output: str, process: tuple[int, int] | None = None) -> dict:
  """Writes this process's shards into ``output`` (resuming), then (process 0) the manifest.

  Args:
    cfg: the config (``precompute.generate``, a decoder teacher, ``data``).
    output: the directory (created; a rerun resumes it). Local paths only.
    process: (index, count) of this process among the writers (default: JAX's).
  Returns:
    {"complete", "shards", "written" (shards written now), "rows" (kept, all shards when
    complete), "drops", "seconds"}.
  """
  from jaxdistill.precompute import text as precompute_text  # the teacher loading

  check_config(cfg)
  cache_writer.check_output(output)
  g = cfg.precompute.generate
  prompts = prompts_of(cfg)
  keep = keep_filter(cfg, load_verifier(g.verifier))
  tokenizer = text_data.prepare(cfg).tokenizer
  mesh = sharding_lib.make_mesh(cfg.mesh, jax.local_devices())
  teacher_models, params, _, identity = precompute_text._load_teachers(cfg, mesh, output)
  current = settings(cfg, identity, len(prompts))
  cache_writer.start(output, current)
  sampler = Sampler(teacher_models[0], {"params": params[0]}, tokenizer, batch_size=g.batch_size)
  sampling = SamplingParams(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)
  stops = [tok_lib.eos_id(tokenizer)]
  targets = topk_fn(cfg, teacher_models[0], mesh) if g.topk else None
  p, count = process or (jax.process_index(), jax.process_count())
  per, start, written = g.prompts_per_shard, time.perf_counter(), 0
  shards = math.ceil(len(prompts) / per)
  for s in range(p, shards, count):
    if cache_writer.finished(output, s):
      continue
    first = s * per
    chunk = prompts[first : first + per]
    done = sampler.generate(
      chunk, max_new_tokens=g.max_new_tokens, sampling=sampling, seed=cfg.seed,
      stop_tokens=stops, num_samples=g.samples, prompt_offset=first,
    )  # fmt: skip
    records, drops = [], dict.fromkeys(REASONS, 0)
    for i, prompt in enumerate(chunk):
      samples = done[i * g.samples : (i + 1) * g.samples]
      text = prompt if isinstance(prompt, str) else samples[0].prompt
      kept, dropped = keep(text, samples)
      drops = {k: drops[k] + dropped[k] for k in REASONS}
      for c in kept:
        j = samples.index(c)
        records.append(
          {"prompt": text, "completion": c.text, "prompt_index": first + i, "sample": j,
           "tokens": len(c.token_ids)}
        )  # fmt: skip
        if not isinstance(prompt, str):  # ids: what the student must train on, exactly
          records[-1].update(prompt_ids=list(prompt), completion_ids=list(c.token_ids))
          records[-1]["finished"] = c.stop_reason == "stop"
    if g.topk:
      add_topk(cfg, targets, params[0], tokenizer, mesh, records)
    _write_shard(output, s, records, drops)
    written += 1
  complete = all(cache_writer.finished(output, s) for s in range(shards))
  result = {"complete": complete, "shards": shards, "written": written}
  result["seconds"] = time.perf_counter() - start
  if complete:
    sides = [json.loads(paths.read_text(cached.sidecar_path(output, s))) for s in range(shards)]
    result["rows"] = sum(side["records"] for side in sides)
    result["drops"] = {k: sum(side["drops"][k] for side in sides) for k in REASONS}
    if p == 0:
      entries = [{k: side[k] for k in ("index", "records", "sha256")} for side in sides]
      manifest = dict(current, rows=result["rows"], drops=result["drops"], shards=entries)
      manifest["samples_written"] = len(prompts) * g.samples
      cache_writer.write_json(paths.join(output, cached.MANIFEST), manifest)
  return result


def is_generated(output: str) -> bool:
  """Whether ``output`` holds a generated set's manifest (``--verify`` dispatches on it)."""
  path = paths.join(output, cached.MANIFEST)
  return paths.isfile(path) and json.loads(paths.read_text(path)).get("kind") == KIND


def verify(output: str) -> dict:
  """Every shard against the manifest (sha256 and records).

  Raises:
    JaxdistillError: listing each missing or changed shard.
  """
  manifest = json.loads(paths.read_text(paths.join(output, cached.MANIFEST)))
  problems, total = [], 0
  for entry in manifest["shards"]:
    path = cached.shard_path(output, entry["index"])
    name = paths.path(path).name
    if not paths.isfile(path):
      problems.append(f"{name} is missing")
      continue
    if cached.sha256_file(path) != entry["sha256"]:
      problems.append(f"{name} does not match its sha256 in the manifest")
      continue
    reader = array_record_module.ArrayRecordReader(path)
    records = reader.num_records()
    reader.close()
    total += records
    if records != entry["records"]:
      problems.append(f"{name} has {records} records, the manifest {entry['records']}")
  if problems:
    raise JaxdistillError(f"generated set {output!r} failed verification: " + "; ".join(problems))
  return {"shards": len(manifest["shards"]), "rows": total}
