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
"""

from typing import Any

import jax

from jaxdistill.data.synthetic import SyntheticData, SyntheticIterator
from jaxdistill.data.sources import DATA_SOURCES, TEXT_SOURCES  # noqa: F401 (re-exported)


def check(cfg: Any) -> None:
  """Opens the data and tokenizer once (building the built-in corpus and training a BPE
  into the cache if needed), so bad data fails before a run writes anything."""
  if cfg.data.source in TEXT_SOURCES:
    from jaxdistill.data import pipeline

    pipeline.prepare(cfg)
  if cfg.teacher.source == "cache":
    from jaxdistill.data import cached

    cached.check(cfg)


def save_run_files(cfg: Any, workdir: str) -> None:
  """Writes what a later run needs to read the data the same way: WORKDIR/tokenizer.json."""
  if cfg.data.source in TEXT_SOURCES and jax.process_index() == 0:
    from jaxdistill.data import pipeline

    pipeline.save_tokenizer(pipeline.prepare(cfg), workdir)


def make_iterator(
  cfg: Any, split: str = "train", process_index: int | None = None, process_count: int | None = None
):
  """The data iterator ``cfg.data`` describes, for this process.

  Args:
    cfg: the full config (``data`` section, ``seed``, ``student.vocab_size``).
    split: "train" (endless, shuffled) or "validation" (for text sources one ordered pass
      over the split, then StopIteration; synthetic streams are endless).
    process_index, process_count: default to this JAX process's.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  d = cfg.data
  if split == "train" and cfg.teacher.source == "cache":
    from jaxdistill.data import cached

    return cached.make_iterator(cfg, process_index, process_count)
  if d.source in TEXT_SOURCES:
    from jaxdistill.data import pipeline

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
