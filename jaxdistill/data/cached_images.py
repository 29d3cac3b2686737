"""Precomputed class logits of an image classifier: the on-disk format, its checks, and reads.

An image model's ``jaxdistill precompute`` (jaxdistill/precompute/images.py) stores the
teacher's FULL class logits of every training example, by example index, for the
un-augmented image. A cache directory holds::

  manifest.json          format version, kind "image_logits", teacher identity, dataset
                         identity (source, name, split, example count, image shape, a hash
                         of the first PROBE examples, the normalisation), num_classes, dtype,
                         rows_per_shard, rows (= examples) and per shard its record count
                         and sha256
  settings.json          the manifest without rows and shards (written first; a rerun with
                         other settings is refused)
  shard-00000.logits     examples [0, R) of the training split, R = rows_per_shard: raw
                         [records, C] logits in ``precompute.logprob_dtype`` (bf16 / f16 / f32,
                         the machine's little-endian byte order), row i = example s R + i
  shard-00000.json       that shard's record count and sha256 (a shard counts as finished only
                         when both exist, as for the language-model cache)

The logits are stored raw (before any temperature), so a student may train from them at any
``distill.temperature`` and schedule. Whole logits cost C x 4 bytes an example at f32 (CIFAR-10:
2 MB in all; ImageNet-1k at f16: 2.6 GB); there is no top-k variant for many classes.

Training (``teacher.source='cache'`` with an image student) reads the whole cache into host
memory once (``TeacherLogits``) and the image pipeline gathers ``teacher_logits`` [B, C]
float32 by the example indices its batches already read (``images.TrainBatch``), so the
iterator state, shuffling and resume are those of the online pipeline.
"""

import hashlib
from typing import Any, Sequence

import numpy as np

from jaxdistill import paths
from jaxdistill.data import cached, image_sources
from jaxdistill.errors import ConfigError, JaxdistillError

KIND = cached.IMAGE_KIND
FORMAT_VERSION = 1
SUFFIX = ".logits"
PROBE = 64  # examples whose pixels and labels the dataset identity hashes


def shard_path(directory: str, index: int) -> str:
  return paths.join(directory, f"shard-{index:05d}{SUFFIX}")


def logits_dtype(name: str) -> np.dtype:
  """``precompute.logprob_dtype`` (bf16 / f16 / f32) -> the stored numpy dtype."""
  return np.dtype(cached.LOGPROB_DTYPES[name])


def data_identity(cfg: Any, examples: Sequence[dict], info: image_sources.ImageInfo) -> dict:
  """What the stored logits are tied to: the training split's source, name, split, example
  count, image shape and a sha256 of its first PROBE examples (pixels and labels)."""
  d = cfg.data
  names = {"tfds": d.tfds_name, "digits": "builtin_digits", "synthetic": "synthetic"}
  images, labels = image_sources.gather(examples, np.arange(min(PROBE, len(examples))))
  digest = hashlib.sha256(np.ascontiguousarray(images, np.uint8).tobytes())
  digest.update(np.asarray(labels, "<i4").tobytes())
  return {
    "source": d.source,
    "name": names.get(d.source, d.source),
    "split": d.train_split if d.source == "tfds" else "train",
    "num_examples": len(examples),
    "image_shape": [int(n) for n in info.shape],
    "probe_sha256": digest.hexdigest(),
  }


def read_manifest(directory: str) -> dict:
  """The manifest of an image cache.

  Raises:
    ConfigError (teacher.path): no manifest, another format version, or a language model's
      cache.
  """
  manifest = cached.read_manifest(directory, version=None)
  if manifest.get("kind") != KIND:
    raise ConfigError(
      "teacher.path",
      f"{directory!r} holds a language model's token targets, not class logits; precompute "
      "a cache with this image model's config (`jaxdistill precompute`)",
    )
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ConfigError(
      "teacher.path",
      f"{directory!r} has image-cache format version {manifest.get('format_version')!r}; this "
      f"jaxdistill reads {FORMAT_VERSION}: precompute the cache again",
    )
  return manifest


def check(cfg: Any, examples: Sequence[dict], info: image_sources.ImageInfo) -> dict:
  """The cache at ``teacher.path`` fits the training split and the student; its manifest.

  Raises:
    ConfigError: naming the key: another data source / dataset / split, another example
      count or image shape or other images (the probe hash), another class count.
  """
  manifest = read_manifest(cfg.teacher.path)
  where = paths.join(cfg.teacher.path, cached.MANIFEST)
  saved, ident = manifest["dataset"], data_identity(cfg, examples, info)
  pairs = [
    ("data.source", saved["source"], ident["source"]),
    ("data.tfds_name", saved["name"], ident["name"]),
    ("data.train_split", saved["split"], ident["split"]),
    ("student.num_classes", manifest["num_classes"], cfg.student.num_classes),
  ]
  for key, stored, configured in pairs:
    if stored != configured:
      raise ConfigError(key, f"the cache ({where}) has {stored!r} but this config {configured!r}")
  for what in ("num_examples", "image_shape", "probe_sha256"):
    if saved[what] != ident[what]:
      raise ConfigError(
        "teacher.path",
        f"the cache ({where}) was made from other training images than data.* give "
        f"({what}: cache {saved[what]!r}, data {ident[what]!r}); precompute it for this data",
      )
  return manifest


def count_records(path: str, manifest: dict) -> int | None:
  """The rows a shard file holds (None: its size is no whole number of rows)."""
  row_bytes = manifest["num_classes"] * logits_dtype(manifest["logits_dtype"]).itemsize
  size = paths.size(path)
  return None if size % row_bytes else size // row_bytes


class TeacherLogits:
  """A cache's logits in host memory: ``gather(indices_R)`` -> float32 [R, C].

  Attributes:
    logits_NxC: every example's stored logits, in the stored dtype.
  """

  def __init__(self, directory: str, manifest: dict):
    c, dtype = manifest["num_classes"], logits_dtype(manifest["logits_dtype"])
    parts = []
    for entry in manifest["shards"]:
      path = shard_path(directory, entry["index"])
      if not paths.isfile(path) or count_records(path, manifest) != entry["records"]:
        raise JaxdistillError(
          f"shard {entry['index']} of the cache {directory!r} is missing or of the wrong size; "
          f"check it with `jaxdistill precompute --output {directory} --verify`"
        )
      if paths.is_remote(path):
        logits = np.frombuffer(paths.read_bytes(path), dtype=dtype)
      else:
        logits = np.fromfile(path, dtype=dtype)
      parts.append(logits.reshape(entry["records"], c))
    self.logits_NxC = np.concatenate(parts)

  def gather(self, indices_R: np.ndarray) -> np.ndarray:
    return self.logits_NxC[indices_R].astype(np.float32)

  def __repr__(self) -> str:  # grain prints transforms in its pipeline description
    return f"TeacherLogits(n={len(self.logits_NxC)}, classes={self.logits_NxC.shape[1]})"


def open_logits(cfg: Any, examples: Sequence[dict], info: image_sources.ImageInfo) -> TeacherLogits:
  """The checked cache at ``teacher.path``, read for training."""
  manifest = check(cfg, examples, info)
  if manifest["rows"] != len(examples):  # check() compared the manifest's dataset entry
    raise JaxdistillError(f"the cache {cfg.teacher.path!r} is inconsistent; precompute it again")
  return TeacherLogits(cfg.teacher.path, manifest)


def write_shard(partial: str, logits_RxC: np.ndarray) -> None:
  """Writes one shard's raw logits to ``partial`` (the caller renames it when finished)."""
  with paths.path(partial).open("wb") as f:
    f.write(np.ascontiguousarray(logits_RxC).tobytes())
