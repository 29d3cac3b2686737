"""Input data. ``make_iterator(cfg)`` is the one entry point the loop uses.

Every iterator yields this process's rows of the global batch as a dict of
numpy [B_local, T] arrays (``inputs``, ``targets``, ``weights``,
``segment_ids``, ``positions``) and has ``get_state()`` / ``set_state()``
returning / taking a JSON-able dict, so checkpoints resume the stream exactly.

``data.source`` picks the documents: ``synthetic`` (a learnable token stream,
no tokenizer) or a text source (``stdlib``, the built-in corpus; ``tfds``;
``array_record``; ``text``) tokenised and packed by the grain pipeline
(``pipeline.py``). With ``teacher.source='cache'`` the training split is the
precomputed cache's rows with their teacher targets (``cached.py``).

An image model (``student.arch`` cnn / resnet / wrn) reads labelled images instead
(``images.py``): ``digits`` (the built-in 5,000 MNIST digits), ``tfds`` (an image dataset
by name) or ``synthetic`` (class-conditional images), as numpy batches ``inputs``
[B_local, H, W, C] float32, ``targets`` / ``weights`` [B_local] (and ``mix_targets`` /
``mix_lambda`` with mixup or cutmix; ``teacher_logits`` [B_local, C] from a cache of class
logits, ``cached_images.py``), with the same iterator interface.

``tasks.py`` holds built-in tasks whose answers can be checked (multi-digit addition with a
worked solution, its held-out split and exact-match checker): the verifier and accuracy of
generated answers. ``data.source=task`` trains on them (``task_data.py``): one prompt +
completion a row, loss on the completion only, from the reference solutions or from
(teacher-written) pair files.

``continual.py`` (``continual.domains`` > 0): the training split as a drifting stream, domain
after domain, cut into windows with held-out rows each; read once, resumable mid-window.
"""

from typing import Any

import jax

from jaxdistill.data.sources import (  # noqa: F401 (re-exported)
  DATA_SOURCES,
  IMAGE_SOURCES,
  TEXT_SOURCES,
)
from jaxdistill.data.synthetic import SyntheticData, SyntheticIterator


def is_image_model(cfg: Any) -> bool:
  """Whether the student classifies images (its data is images, not token rows)."""
  return cfg.student.arch != "transformer"


def check(cfg: Any) -> None:
  """Opens the data and tokenizer once (building the built-in corpus and training a BPE
  into the cache if needed; for an image model, building the built-in digits and checking
  the images' shape and labels against the models), so bad data fails before a run writes
  anything."""
  if is_image_model(cfg):
    from jaxdistill.data import images

    images.check(cfg, jax.process_count())
  elif cfg.data.source in TEXT_SOURCES:
    from jaxdistill.data import text as pipeline

    pipeline.prepare(cfg)
    if cfg.continual.domains:  # the drifting stream: a window and the run must fit in it
      from jaxdistill.data import continual

      continual.check(cfg)
  if cfg.teacher.source == "cache" and not is_image_model(cfg):  # images: checked above
    from jaxdistill.data import cached

    cached.check(cfg)


def save_run_files(cfg: Any, workdir: str) -> None:
  """Writes what a later run needs to read the data the same way: WORKDIR/tokenizer.json."""
  if is_image_model(cfg):  # images need no tokenizer
    return
  if cfg.data.source in TEXT_SOURCES and jax.process_index() == 0:
    from jaxdistill.data import text as pipeline

    pipeline.save_tokenizer(pipeline.prepare(cfg), workdir)


def make_iterator(
  cfg: Any, split: str = "train", process_index: int | None = None, process_count: int | None = None
):
  """The data iterator ``cfg.data`` describes, for this process.

  Args:
    cfg: the full config (``data`` section, ``seed``, ``student.vocab_size``).
    split: "train" (endless, shuffled) or "validation" (for text sources one ordered pass
      over the split, then StopIteration; synthetic token streams are endless). For an
      image model any split but "train" is the evaluation split, one padded pass.
    process_index, process_count: default to this JAX process's.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  d = cfg.data
  if is_image_model(cfg):  # a cache's class logits join the image batches there
    from jaxdistill.data import images

    return images.make_iterator(cfg, split, process_index, process_count)
  if split == "train" and cfg.teacher.source == "cache" and d.source != "task":
    from jaxdistill.data import cached

    return cached.make_iterator(cfg, process_index, process_count)
  pairs = split == "train" and d.task_train_files and d.source in TEXT_SOURCES
  if d.source == "task" or pairs:  # a corpus's training pairs: sequence-level KD (task_data)
    from jaxdistill.data import task_data
    from jaxdistill.data import text as pipeline

    tokenizer = pipeline.prepare(cfg).tokenizer
    return task_data.TaskIterator(cfg, split, tokenizer, process_index, process_count)
  if split == "train" and cfg.continual.domains:  # the drifting stream (data/continual.py)
    from jaxdistill.data import continual

    return continual.ContinualIterator(cfg, process_index, process_count)
  if d.source in TEXT_SOURCES:
    from jaxdistill.data import text as pipeline

    prepared = pipeline.prepare(cfg)
    build = pipeline.train_dataset if split == "train" else pipeline.eval_dataset
    return pipeline.LMIterator(build(cfg, prepared, process_index, process_count), prepared)
  data = SyntheticData(
    cfg.student.vocab_size,
    d.seq_len,
    d.batch_size,
    seed=cfg.seed,
    pad_fraction=d.pad_fraction,
    branching=d.branching,
  )
  return SyntheticIterator(data, process_index, process_count, split)
