"""Precomputed teacher targets on disk: the record format, the manifest, and training reads.

A cache directory (written by ``jaxdistill precompute``, jaxdistill/precompute/text.py) holds::

  manifest.json                   format version, teacher / tokenizer / dataset identity,
                                  layout (seq_len, packing, k, samples, dtypes), per shard
                                  its record count and sha256
  settings.json                   the manifest without shards (written first; a rerun with
                                  other settings is refused)
  shard-00000.arrayrecord         rows [0, R) of the training split, R = rows_per_shard
  shard-00000.json                that shard's record count and sha256 (written before the
                                  shard's rename from ``.partial``: a shard counts as finished
                                  only when both exist)

Record i of the cache (shards in order) is packed row i of the training split in document
order, with the targets of its T tokens, so training joins nothing: each record is the whole
example. Record bytes, in this order (T tokens, K = k, M = this record's sampled width):

  inputs, targets [T] ids      segment_ids, positions [T] pos dtype
  topk: ids [T, K] ids, log-probs [T, K] logprob dtype, tail mass [T] float32
  sampled: M as uint16, ids [T, M] ids, counts [T, M] count dtype

ids are uint16 when the vocabulary fits in 16 bits (else int32), pos uint16 (T <= 65536), counts
uint8 (n <= 255, else uint16). Per token of TARGET data that is 4K + 4 bytes for top-k with a
16-bit float (the row's own ids, segments and positions add 8 bytes per token).

Training (``teacher.source='cache'``, ``teacher.path=DIR``) reads the records through grain::

  MapDataset.source(ArrayRecordDataSource(shards))[process_index::process_count]
    .shuffle(seed).repeat().map(decode).batch(B / process_count)

so the iterator state is grain's and a checkpoint resumes the stream exactly.

Shape legend: T sequence length, K top-k, M sampled width (padded to n on read).
"""

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any

import grain
import ml_dtypes
import numpy as np

from jaxdistill import paths
from jaxdistill.errors import ConfigError, JaxdistillError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
LOGPROB_DTYPES = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}
TARGET_KINDS = ("topk", "sampled", "both")
# The manifest "kind" of an image classifier's cache of whole class logits (cached_images.py);
# a language model's cache has no "kind".
IMAGE_KIND = "image_logits"
# Per-record ArrayRecord options: one record per chunk for random access (zstd by default).
WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass(frozen=True)
class Layout:
  """What each record holds; stored in the manifest, it decides the byte layout."""

  seq_len: int
  vocab_size: int
  k: int  # 0 = no top-k targets
  samples: int  # 0 = no sampled targets
  logprob_dtype: str  # a LOGPROB_DTYPES key

  @property
  def id_dtype(self):
    return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.int32)

  @property
  def pos_dtype(self):
    return np.dtype(np.uint16 if self.seq_len <= 1 << 16 else np.int32)

  @property
  def count_dtype(self):
    return np.dtype(np.uint8 if self.samples <= 255 else np.uint16)

  @property
  def lp_dtype(self):
    return np.dtype(LOGPROB_DTYPES[self.logprob_dtype])

  def dtypes(self) -> dict[str, str]:
    names = ("id_dtype", "pos_dtype", "count_dtype", "lp_dtype")
    return {n: str(getattr(self, n)) for n in names} | {"tail": "float32"}


def layout_of(cfg: Any) -> Layout:
  """The layout the ``precompute`` section asks for."""
  p = cfg.precompute
  return Layout(
    seq_len=cfg.data.seq_len,
    vocab_size=cfg.teacher.vocab_size,
    k=p.k if p.targets in ("topk", "both") else 0,
    samples=p.samples if p.targets in ("sampled", "both") else 0,
    logprob_dtype=p.logprob_dtype,
  )


def encode(layout: Layout, row: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> bytes:
  """One row ([T] arrays) and its targets ([T, ...], as ``sparse.teacher_targets``) -> bytes."""
  parts = [row["inputs"].astype(layout.id_dtype), row["targets"].astype(layout.id_dtype)]
  parts += [row["segment_ids"].astype(layout.pos_dtype), row["positions"].astype(layout.pos_dtype)]
  if layout.k:
    parts += [targets["topk_ids"].astype(layout.id_dtype)]
    parts += [targets["topk_logp"].astype(layout.lp_dtype), targets["tail"].astype(np.float32)]
  if layout.samples:
    counts_TxS = targets["sample_counts"]
    m = max(int((counts_TxS > 0).sum(axis=1).max()), 1)  # unique ids come first in each token
    parts += [np.asarray([m], np.uint16), targets["sample_ids"][:, :m].astype(layout.id_dtype)]
    parts += [counts_TxS[:, :m].astype(layout.count_dtype)]
  return b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


def decode(layout: Layout, record: bytes) -> dict[str, np.ndarray]:
  """Bytes -> the training example: the batch contract's [T] arrays plus ``teacher_*`` ones."""
  t, k, offset = layout.seq_len, layout.k, 0

  def take(dtype, *shape):
    nonlocal offset
    count = int(np.prod(shape))
    out = np.frombuffer(record, dtype, count, offset).reshape(shape)
    offset += count * np.dtype(dtype).itemsize
    return out

  inputs, targets = take(layout.id_dtype, t), take(layout.id_dtype, t)
  segment_ids, positions = take(layout.pos_dtype, t), take(layout.pos_dtype, t)
  out = {
    "inputs": inputs.astype(np.int32),
    "targets": targets.astype(np.int32),
    "weights": (segment_ids > 0).astype(np.float32),
    "segment_ids": segment_ids.astype(np.int32),
    "positions": positions.astype(np.int32),
  }
  if k:
    out["teacher_topk_ids"] = take(layout.id_dtype, t, k).astype(np.int32)
    out["teacher_topk_logp"] = take(layout.lp_dtype, t, k).astype(np.float32)
    out["teacher_tail"] = take(np.float32, t).copy()
  if layout.samples:
    m = int(take(np.uint16, 1)[0])
    pad = [(0, 0), (0, layout.samples - m)]
    out["teacher_sample_ids"] = np.pad(take(layout.id_dtype, t, m).astype(np.int32), pad)
    out["teacher_sample_counts"] = np.pad(take(layout.count_dtype, t, m).astype(np.int32), pad)
  if offset != len(record):
    raise JaxdistillError(f"a cache record has {len(record)} bytes, its layout {offset}")
  return out


def shard_path(directory: str, index: int) -> str:
  return paths.join(directory, f"shard-{index:05d}.arrayrecord")


def sidecar_path(directory: str, index: int) -> str:
  return paths.join(directory, f"shard-{index:05d}.json")


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with paths.path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_manifest(directory: str, version: int | None = FORMAT_VERSION) -> dict:
  """The manifest at ``directory``; its format version must be ``version`` (None: unchecked).

  Raises:
    ConfigError (teacher.path): no manifest, another format version.
  """
  path = paths.join(directory, MANIFEST)
  if not paths.isfile(path):
    raise ConfigError(
      "teacher.path",
      f"{directory!r} holds no {MANIFEST}; point it at the --output of a finished "
      "`jaxdistill precompute` run (an unfinished one: rerun it to complete)",
    )
  manifest = json.loads(paths.read_text(path))
  if version is not None and manifest.get("format_version") != version:
    raise ConfigError(
      "teacher.path",
      f"{path} has format version {manifest.get('format_version')!r}; this jaxdistill reads "
      f"{version}: precompute the cache again",
    )
  return manifest


def data_identity(cfg: Any) -> dict:
  """Tokenizer hash and dataset identity of ``cfg.data`` (prepares a text source)."""
  d = cfg.data
  if d.source == "synthetic":
    spec = dict(seed=cfg.seed, pad_fraction=d.pad_fraction, branching=d.branching)
    spec.update(vocab_size=cfg.student.vocab_size, batch_size=d.batch_size)
    fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return {"tokenizer_hash": "none", "packing": "synthetic", "fingerprint": fingerprint}
  from jaxdistill.data import text as pipeline

  prepared = pipeline.prepare(cfg)
  return {
    "tokenizer_hash": prepared.tokenizer_hash,
    "packing": d.packing,
    "fingerprint": prepared.train_fingerprint,
  }


def check(cfg: Any) -> dict:
  """The cache at ``teacher.path`` fits the config; returns its manifest.

  Raises:
    ConfigError: no manifest, or a tokenizer / seq_len / packing / vocabulary / temperature /
      target-kind mismatch, naming both values.
  """
  manifest = read_manifest(cfg.teacher.path, version=None)
  if manifest.get("kind") == "generated":  # teacher-written rows with top-k targets
    from jaxdistill.data import task_data

    task_data.check_targets(cfg, manifest, paths.join(cfg.teacher.path, MANIFEST))
    return manifest
  if manifest.get("kind") == IMAGE_KIND:
    raise ConfigError(
      "teacher.path",
      f"{cfg.teacher.path!r} holds an image classifier's class logits, not token targets for "
      f"student.arch={cfg.student.arch!r}; precompute a cache with this config",
    )
  manifest = read_manifest(cfg.teacher.path)
  ident, kind = data_identity(cfg), cfg.distill.logit.kind
  where = paths.join(cfg.teacher.path, MANIFEST)
  pairs = [
    ("data.tokenizer", manifest["tokenizer_hash"], ident["tokenizer_hash"]),
    ("data.seq_len", manifest["layout"]["seq_len"], cfg.data.seq_len),
    ("data.packing", manifest["packing"], ident["packing"]),
    ("student.vocab_size", manifest["layout"]["vocab_size"], cfg.student.vocab_size),
    ("distill.temperature", manifest["temperature"], cfg.distill.temperature),
  ]
  for key, cached, configured in pairs:
    if cached != configured:
      raise ConfigError(key, f"the cache ({where}) has {cached!r} but this config {configured!r}")
  if cfg.distill.temperature_schedule != "constant":
    raise ConfigError(
      "distill.temperature_schedule",
      "must be constant with a cache: its targets are stored at one temperature",
    )
  need = "samples" if kind == "sampled" else "k"
  if not manifest["layout"][need]:
    raise ConfigError(
      "distill.logit.kind",
      f"{kind!r} needs {'sampled' if need == 'samples' else 'top-k'} targets, but the cache "
      f"({where}) has precompute.targets={manifest['targets']!r}",
    )
  if manifest["dataset"]["fingerprint"] != ident["fingerprint"]:
    warnings.warn(f"the cache ({where}) was made from other training documents than data.*")
  return manifest


def make_iterator(cfg: Any, process_index: int, process_count: int):
  """This process's endless, shuffled stream of [B_local, T(, ...)] batches from the cache."""
  from jaxdistill.data import text as pipeline

  manifest = check(cfg)
  layout = Layout(**manifest["layout"])
  shards = local_shards(cfg.teacher.path, manifest, cfg.cache_dir)
  ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shards))
  ds = ds[process_index::process_count]
  if len(ds) == 0:
    raise ConfigError("teacher.path", f"the cache has too few rows for {process_count} processes")
  ds = ds.shuffle(seed=cfg.seed).repeat().map(lambda record: decode(layout, record))
  ds = ds.batch(cfg.data.batch_size // process_count, drop_remainder=True)
  options = grain.ReadOptions(num_threads=cfg.data.num_threads, prefetch_buffer_size=16)
  return pipeline.LMIterator(ds.to_iter_dataset(options), None)


def local_shards(directory: str, manifest: dict, cache_dir: str = "") -> list[str]:
  """The shard files of the cache at ``directory`` as local paths, for ArrayRecord's reader
  (it opens files itself, so it cannot read ``gs://``): a remote cache's shards are
  downloaded once into ``CACHE/remote_caches/<manifest sha256>/`` (``cache_dir``: the
  config's ``cache_dir``), keyed by the manifest, which holds every shard's sha256."""
  shards = [shard_path(directory, s["index"]) for s in manifest["shards"]]
  if not paths.is_remote(directory):
    return shards
  from jaxdistill.data import corpora

  key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
  local_dir = os.path.join(corpora.cache_dir(cache_dir), "remote_caches", key)
  return [paths.download(s, local_dir) for s in shards]
