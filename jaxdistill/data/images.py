"""The grain input pipeline for image classifiers: labelled images -> [B, H, W, C] batches.

``data.batch_size`` is the GLOBAL batch B; each of the P processes gets B / P rows. The
training split is ONE endless stream of examples, a new order every epoch (a numpy
permutation per (seed, epoch)); global batch b is the stream's positions [b B, (b + 1) B)
and process p holds its rows [p B / P, (p + 1) B / P)::

  MapDataset.range(endless)            global batch indices b
    .map(TrainBatch)                   read this process's rows of batch b, augment them
                                       (augment.py: crop / flip / mixup / cutmix, drawn per
                                       (seed, b) for all B rows), read mixing partners; with
                                       a cache (teacher.source='cache') gather the stored
                                       class logits of the same example indices
    .map(Finalize)                     (x / 255 - mean) / std and the batch contract
    .to_iter_dataset(read threads)     + thread prefetch

So the union of the processes' rows IS the one-process batch, whatever the process count
(augmentation and mixing partners included); every example is seen once per epoch. Work is
vectorised per batch, not per example (grain's per-element shuffle and random_map cost tens
of microseconds an example, more than a small CNN's step can spare).

The evaluation split (any split but "train": digits' test split, tfds' ``data.eval_split``)
is one ordered pass in global batches, the last padded with rows of weight 0 (inputs 0,
label 0), each process taking its rows; then StopIteration.

Batches (numpy, this process's B rows):
  inputs [B, H, W, C] float32 normalised; targets [B] int32; weights [B] float32;
  training with data.mixup or data.cutmix > 0 also: mix_targets [B] int32 (the partner's
  label) and mix_lambda [B] float32 (the share of ``targets``); training from a cache
  (``cached_images.py``; no augmentation) also: teacher_logits [B, C] float32, the teacher's
  stored logits of each row's (un-augmented) example.

The iterator state is ``{"version", "pipeline": "images", "grain": {"next_index": b}}``
(grain's state over the batch indices): JSON-able; after ``set_state`` the next batches are
identical.
"""

import dataclasses
import functools
import math
import sys
from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from jaxdistill.data import augment, cached_images, image_sources
from jaxdistill.data.corpora import cache_dir
from jaxdistill.data.text import GrainIterator
from jaxdistill.errors import ConfigError, JaxdistillError

# Bump when a change to the stages changes what a saved grain state means (see LMIterator).
STATE_VERSION = 1
PIPELINE = "images"
SHUFFLE_STREAM = 5  # separates the epoch orders from other uses of the seed


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, SHUFFLE_STREAM, epoch]).permutation(n)


def shuffled(seed: int, n: int, positions_R: np.ndarray) -> np.ndarray:
  """Stream positions -> example indices: epoch q // n visits the n examples in its own
  random order."""
  epochs_R, within_R = np.divmod(positions_R, n)
  out_R = np.empty_like(positions_R)
  for epoch in np.unique(epochs_R):
    here = epochs_R == epoch
    out_R[here] = _epoch_order(seed, n, int(epoch))[within_R[here]]
  return out_R


@dataclasses.dataclass(frozen=True, eq=False)
class TrainBatch(grain.transforms.Map):
  """Global batch index b -> this process's augmented rows {"image", "label"[, "mix_label",
  "mix_lambda"]}."""

  examples: Sequence[dict]
  batch_size: int  # global
  process_index: int
  process_count: int
  seed: int
  padding: int
  flip: bool
  mixup: float
  cutmix: float
  teacher: cached_images.TeacherLogits | None = None  # a cache's logits (no augmentation)

  def map(self, batch_index: int) -> dict:
    rows = self.batch_size // self.process_count
    lo = self.process_index * rows
    own_R = lo + np.arange(rows)
    d = augment.draws(self.seed, batch_index, self.batch_size, self.mixup, self.cutmix)
    images, labels, indices_R = self._read(batch_index, own_R, d)
    if self.mixup <= 0 and self.cutmix <= 0:
      out = {"image": images, "label": labels}
      if self.teacher is not None:
        out["teacher_logits"] = self.teacher.gather(indices_R)
      return out
    partner_R = d["partner_B"][own_R]
    inside_R = (partner_R >= lo) & (partner_R < lo + rows)  # already read and augmented here
    images2, labels2 = images[(partner_R - lo) % rows], labels[(partner_R - lo) % rows]
    if not inside_R.all():
      outside = ~inside_R
      images2[outside], labels2[outside], _ = self._read(batch_index, partner_R[outside], d)
    mixed, lam_R = augment.mix(
      images, images2, d["cut_B"][own_R], d["lam_B"][own_R], d["centre_Bx2"][own_R]
    )
    return {"image": mixed, "label": labels, "mix_label": labels2, "mix_lambda": lam_R}

  def _read(self, batch_index: int, rows_R: np.ndarray, d: dict):
    """Rows ``rows_R`` of global batch ``batch_index``, cropped and flipped: (images, labels,
    their example indices)."""
    positions_R = batch_index * self.batch_size + rows_R
    indices_R = shuffled(self.seed, len(self.examples), positions_R)
    images, labels = image_sources.gather(self.examples, indices_R)
    if self.padding or self.flip:
      offsets, flips = d["offset_Bx2"][rows_R], d["flip_B"][rows_R]
      images = augment.crop_flip(images, offsets, flips, self.padding, self.flip)
    return images, labels, indices_R


@dataclasses.dataclass(frozen=True, eq=False)
class EvalBatch(grain.transforms.Map):
  """Global batch index b -> this process's rows of it, in order; rows past the split's end
  are zero images with label 0 and weight 0."""

  examples: Sequence[dict]
  batch_size: int
  process_index: int
  process_count: int
  shape: tuple[int, int, int]

  def map(self, batch_index: int) -> dict:
    rows = self.batch_size // self.process_count
    positions_R = batch_index * self.batch_size + self.process_index * rows + np.arange(rows)
    real_R = positions_R < len(self.examples)
    images = np.zeros((rows, *self.shape), np.uint8)
    labels = np.zeros(rows, np.int32)
    if real_R.any():
      images[real_R], labels[real_R] = image_sources.gather(self.examples, positions_R[real_R])
    return {"image": images, "label": labels, "weight": real_R.astype(np.float32)}


def _local_rows(cfg: Any, process_count: int) -> int:
  b = cfg.data.batch_size
  if b % process_count:
    raise ConfigError(
      "data.batch_size", f"the global batch of {b} does not split over {process_count} processes"
    )
  return b // process_count


def _finalize(cfg: Any) -> augment.Finalize:
  c = cfg.student.image_channels
  return augment.Finalize(
    image_sources.parse_stats(cfg.data.image_mean, c, "data.image_mean"),
    image_sources.parse_stats(cfg.data.image_std, c, "data.image_std"),
  )


def _iterable(cfg: Any, batches: grain.MapDataset) -> grain.IterDataset:
  d = cfg.data
  it = batches.to_iter_dataset(grain.ReadOptions(num_threads=d.num_threads, prefetch_buffer_size=8))
  if d.prefetch > 0:
    it = grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch)
  return it


def ordered_batch(cfg: Any, examples: Sequence[dict], indices_R: np.ndarray, rows: int) -> dict:
  """Examples ``indices_R`` as one batch of ``rows`` rows, un-augmented and normalised as for
  training (rows past ``indices_R``: zero images of weight 0): what precompute's teacher reads."""
  images, labels = image_sources.gather(examples, indices_R)
  pad = rows - len(indices_R)
  batch = {
    "image": np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)]),
    "label": np.concatenate([labels, np.zeros(pad, labels.dtype)]),
    "weight": (np.arange(rows) < len(indices_R)).astype(np.float32),
  }
  return _finalize(cfg).map(batch)


def train_dataset(
  cfg: Any,
  examples: Sequence[dict],
  process_index: int,
  process_count: int,
  teacher: cached_images.TeacherLogits | None = None,
) -> grain.IterDataset:
  """The endless, shuffled, augmented stream of this process's batches (module docstring);
  ``teacher``: a cache's logits to attach as ``teacher_logits``."""
  d = cfg.data
  _local_rows(cfg, process_count)
  if len(examples) == 0:
    raise ConfigError("data.source", f"the training split of data.source={d.source!r} is empty")
  make = TrainBatch(
    examples,
    d.batch_size,
    process_index,
    process_count,
    cfg.seed,
    d.crop_padding,
    bool(d.flip),
    float(d.mixup),
    float(d.cutmix),
    teacher,
  )
  return _iterable(cfg, grain.MapDataset.range(sys.maxsize).map(make).map(_finalize(cfg)))


def eval_dataset(
  cfg: Any,
  examples: Sequence[dict],
  shape: tuple[int, int, int],
  process_index: int,
  process_count: int,
) -> grain.IterDataset:
  """One ordered pass over ``examples`` as this process's rows of padded global batches."""
  _local_rows(cfg, process_count)
  b = cfg.data.batch_size
  make = EvalBatch(examples, b, process_index, process_count, shape)
  batches = grain.MapDataset.range(math.ceil(len(examples) / b))
  return _iterable(cfg, batches.map(make).map(_finalize(cfg)))


class ImageIterator(GrainIterator):
  """The data-iterator interface over the image pipeline.

  ``next()`` gives a dict of numpy arrays (module docstring); ``get_state()`` /
  ``set_state()`` give and take a JSON-able dict so a checkpoint resumes the stream
  exactly. The evaluation iterator ends after one pass.

  Attributes:
    num_examples: examples in the split (without padding).
    info: the split's image shape and class count.
  """

  def __init__(self, dataset: grain.IterDataset, num_examples: int, info: Any):
    super().__init__(dataset)
    self.num_examples, self.info = num_examples, info

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "pipeline": PIPELINE, "grain": self._it.get_state()}

  def set_state(self, state: dict) -> None:
    if state.get("pipeline") != PIPELINE:
      raise JaxdistillError(
        "the data iterator state was not saved by the image pipeline (was the model "
        "changed from a transformer since the checkpoint?); start a new run"
      )
    if state.get("version") != STATE_VERSION:
      raise JaxdistillError(
        f"the data iterator state was saved by image-pipeline version {state.get('version')}, "
        f"this is version {STATE_VERSION}: the stream cannot continue exactly; resume with the "
        "jaxdistill that saved it, or start a new run from its final_params"
      )
    self._restore(state["grain"])


def make_iterator(cfg: Any, split: str, process_index: int, process_count: int) -> ImageIterator:
  """This process's image iterator: ``split`` "train" (endless) or else the evaluation split
  (one padded pass)."""
  examples, info = image_sources.open_images(cfg, split, cache_dir(cfg.cache_dir))
  if split == "train":
    teacher = None
    if cfg.teacher.source == "cache":
      teacher = cached_images.open_logits(cfg, examples, info)
    dataset = train_dataset(cfg, examples, process_index, process_count, teacher)
  else:
    dataset = eval_dataset(cfg, examples, info.shape, process_index, process_count)
  return ImageIterator(dataset, len(examples), info)


def check(cfg: Any, process_count: int = 1) -> None:
  """Opens the training split (building the built-in digits if needed) and, when
  ``eval.every`` > 0, the evaluation split, and checks them against the models (and a cache
  of teacher logits against the training split).

  Raises:
    ConfigError: naming the key (see ``image_sources.check_keys`` / ``check_fit`` /
      ``cached_images.check``).
  """
  image_sources.check_keys(cfg)
  _local_rows(cfg, process_count)
  splits = ("train", "validation") if cfg.eval.every else ("train",)
  for split in splits:
    examples, info = image_sources.open_images(cfg, split, cache_dir(cfg.cache_dir))
    if len(examples) == 0:
      raise ConfigError("data.source", f"the {split} split of {cfg.data.source!r} is empty")
    image_sources.check_fit(cfg, info, examples)
    if split == "train" and cfg.teacher.source == "cache":
      cached_images.check(cfg, examples, info)
