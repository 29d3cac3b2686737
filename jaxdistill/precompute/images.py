"""``jaxdistill precompute`` for an image classifier: the teacher's whole class logits of every
training example, stored by example index (``precompute.run`` dispatches here when
``student.arch`` is not "transformer").

  jaxdistill precompute --config configs/cnn_digits.py --output DIR [--verify]

One ordered pass over the TRAINING split (examples 0 .. N - 1) WITHOUT augmentation: the stored
logits are the teacher's on the un-augmented images, normalised as the training pipeline
normalises them (``images.ordered_batch``), which is what a student trained from the cache
sees (augmentation with a cache is refused: ``validate_vision``). The teacher runs in
inference mode (a BatchNorm teacher by its stored statistics). The logits are stored raw,
before any temperature, in ``precompute.logprob_dtype`` (f32 is exact; bf16 / f16 halve the
size); ``precompute.targets`` / ``k`` / ``samples`` are a language model's and do not apply.
The format is ``data/cached_images.py``'s: shard s holds examples [s R, (s + 1) R),
R = ``precompute.rows_per_shard``.

As for a language model's cache (``precompute.py``): process p computes the shards s with
s % process_count == p on a mesh over its own devices and writes them itself; a shard is
written as ``.partial``, its sidecar is written, then it is renamed, so a rerun skips finished
shards and redoes the rest; a shard's batches are always rows [s R + i B, s R + (i + 1) B) of
data.batch_size B (the last one padded), so a resumed cache is byte-identical to an
uninterrupted one. Process 0 writes ``manifest.json`` once every shard exists; a rerun with
other settings (teacher, data, dtype, shard size) is refused.

Shape legend: B rows per batch, C classes, R rows per shard, N training examples.
"""

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import models, paths, progress
from jaxdistill.config import validate
from jaxdistill.data import cache_writer, cached, cached_images, image_sources, images
from jaxdistill.data.corpora import cache_dir
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import distributed, precision
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import loop
from jaxdistill.train import teacher as teacher_lib


def check_config(cfg: Any) -> None:
  """What an image model's precompute needs beyond ``validate.validate``."""
  if cfg.teacher.source not in ("random", "pretrain", "workdir"):
    raise ConfigError(
      "teacher.source",
      f"precompute needs a teacher model (random, pretrain or workdir), not {cfg.teacher.source!r}",
    )
  if cfg.teachers:  # raw class logits of one model; an ensemble's would need a mixing rule
    raise ConfigError(
      "teachers",
      "an image cache stores one teacher's raw class logits; precompute with one teacher "
      "(teachers=()) or distil from the ensemble online",
    )
  p = cfg.precompute
  if p.temperature != 0:
    raise ConfigError(
      "precompute.temperature",
      "must be 0 for an image model: its cache stores raw class logits and the temperature "
      "applies when a student trains from them (distill.temperature)",
    )
  if p.rows != 0:
    raise ConfigError(
      "precompute.rows",
      "must be 0 for an image model: its cache holds every training example (a student's "
      "batches read the logits by example index)",
    )


def settings(cfg: Any, teacher_identity: dict, data_identity: dict) -> dict:
  """The manifest without its rows and shards: everything the content depends on."""
  d, p = cfg.data, cfg.precompute
  return {
    "format_version": cached_images.FORMAT_VERSION,
    "kind": cached_images.KIND,
    "teacher": teacher_identity,
    "dataset": dict(data_identity, image_mean=d.image_mean, image_std=d.image_std),
    "num_classes": cfg.teacher.num_classes,
    "logits_dtype": p.logprob_dtype,
    "dtype": str(cached_images.logits_dtype(p.logprob_dtype)),
    "rows_per_shard": p.rows_per_shard,
  }


@dataclasses.dataclass
class Teacher:
  """The jitted forward on this process's mesh: fn(variables, {"inputs"}) -> logits [B, C]
  float32."""

  fn: Any
  variables: Any
  mesh: jax.sharding.Mesh
  identity: dict


def build_teacher(cfg: Any, output: str, devices=None) -> Teacher:
  """Loads the teacher (a pretrain teacher trains into OUTPUT/teacher first) onto a mesh over
  this process's devices and jits its inference-mode forward."""
  mesh = sharding_lib.make_mesh(cfg.mesh, devices or jax.local_devices())
  validate.check_mesh(cfg, dict(mesh.shape))
  policy = precision.parse_policy(cfg.teacher.policy, "teacher.policy")
  model = models.build(cfg.teacher, policy, "teacher")
  loop.pretrain_teacher(cfg, output, devices=list(mesh.devices.flat))
  variables, shardings, path = teacher_lib.load(cfg, model, mesh, output)

  def logits_fn(variables, batch):
    return models.apply(model, variables, batch)["logits"].astype(jnp.float32)

  rows = sharding_lib.batch_sharding(mesh)
  fn = jax.jit(logits_fn, in_shardings=(shardings, rows), out_shardings=rows)
  return Teacher(fn, variables, mesh, teacher_lib.identity(cfg, variables, path))


def shard_logits(cfg: Any, teacher: Teacher, examples: Sequence[dict], s: int) -> np.ndarray:
  """Shard ``s``'s logits [R_s, C] float32: its examples in batches of data.batch_size, every
  batch dispatched before the first is fetched (the host reads the next while the devices
  compute)."""
  r, b = cfg.precompute.rows_per_shard, cfg.data.batch_size
  lo, hi = s * r, min((s + 1) * r, len(examples))
  pending = []
  for start in range(lo, hi, b):
    indices_R = np.arange(start, min(start + b, hi))
    inputs = images.ordered_batch(cfg, examples, indices_R, b)["inputs"]
    batch = sharding_lib.shard_batch({"inputs": inputs}, teacher.mesh)
    pending.append((len(indices_R), teacher.fn(teacher.variables, batch)))
  return np.concatenate([np.asarray(jax.device_get(out))[:n] for n, out in pending])


def _write_shard(output: str, s: int, logits_RxC: np.ndarray) -> None:
  """The shard as ``.partial``, its sidecar, then the rename that finishes it."""
  final = cached_images.shard_path(output, s)
  cached_images.write_shard(final + ".partial", logits_RxC)
  side = {"index": s, "records": len(logits_RxC), "sha256": cached.sha256_file(final + ".partial")}
  cache_writer.write_json(cached.sidecar_path(output, s), side)
  paths.replace(final + ".partial", final)


def _compute_shards(cfg: Any, teacher: Teacher, examples, output: str, process, bar) -> int:
  """This process's unfinished shards, computed and written: the examples computed."""
  r, n = cfg.precompute.rows_per_shard, len(examples)
  p, count = process
  dtype, computed = cached_images.logits_dtype(cfg.precompute.logprob_dtype), 0
  with sharding_lib.rules_context(teacher.mesh):
    for s in range(p, -(-n // r), count):
      rows = min((s + 1) * r, n) - s * r
      if not cache_writer.finished(output, s, cached_images.shard_path):
        _write_shard(output, s, shard_logits(cfg, teacher, examples, s).astype(dtype))
        computed += rows
      bar.update(rows)
  return computed


def run(
  cfg: Any,
  output: str,
  devices=None,
  teacher: Teacher | None = None,
  process: tuple[int, int] | None = None,
) -> dict:
  """Precomputes this process's shards of class logits into ``output`` (resuming), then the
  manifest.

  Args:
    cfg: a validated config with an image teacher model.
    output: the cache directory (created; a rerun resumes it).
    devices: this process's devices for the teacher's mesh (default: all local ones).
    teacher: a ``build_teacher(cfg, ...)`` result to reuse (tests: already compiled).
    process: (index, count) of this process among the writers (default: JAX's).

  Returns:
    {"complete" (all shards exist; process 0 then wrote the manifest), "rows" (examples),
    "shards", "computed_rows", "images" (computed here), "seconds"} for this process.
  """
  check_config(cfg)
  cache_writer.check_output(output)  # before anything (teacher, settings) is written there
  examples, info = image_sources.open_images(cfg, "train", cache_dir(cfg.cache_dir))
  if len(examples) == 0:
    raise JaxdistillError("the training split has no examples: nothing to precompute")
  image_sources.check_fit(cfg, info, examples)  # bad data fails before the teacher loads
  identity = cached_images.data_identity(cfg, examples, info)
  teacher = teacher or build_teacher(cfg, output, devices)
  current = settings(cfg, teacher.identity, identity)
  cache_writer.start(output, current)
  p, count = process or (jax.process_index(), jax.process_count())
  n, shards = len(examples), -(-len(examples) // cfg.precompute.rows_per_shard)
  show = cfg.log.progress and p == 0
  bar = progress.bar(n, unit="img", show=show)
  start = time.perf_counter()
  computed = _compute_shards(cfg, teacher, examples, output, (p, count), bar)
  bar.close()
  seconds = time.perf_counter() - start
  distributed.barrier("jaxdistill:precompute-shards-written")
  # Every shard exists unless a process failed (or, in tests, has not run yet).
  complete = all(cache_writer.finished(output, s, cached_images.shard_path) for s in range(shards))
  if p == 0 and complete:
    cache_writer.write_manifest(output, current, n, shards, cached_images.shard_path)
  return {
    "complete": complete,
    "rows": n,
    "shards": shards,
    "computed_rows": computed,
    "images": computed,
    "seconds": seconds,
  }
