"""Input data. ``make_iterator(cfg)`` is the one entry point the loop uses.

Every iterator yields this process's rows of the global batch as a dict of
numpy [B_local, T] arrays (``inputs``, ``targets``, ``weights``,
``segment_ids``, ``positions``) and has ``get_state()`` / ``set_state()``
returning / taking a JSON-able dict, so checkpoints resume the stream exactly.
"""

from typing import Any

import jax

from jaxdistill.data.synthetic import SyntheticData, SyntheticIterator


def make_iterator(
  cfg: Any, split: str = "train", process_index: int | None = None, process_count: int | None = None
):
  """The data iterator ``cfg.data`` describes, for this process.

  Args:
    cfg: the full config (``data`` section, ``seed``, ``student.vocab_size``).
    split: "train" or "validation".
    process_index, process_count: default to this JAX process's.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  d = cfg.data
  data = SyntheticData(
    cfg.student.vocab_size,
    d.seq_len,
    d.batch_size,
    seed=cfg.seed,
    pad_fraction=d.pad_fraction,
    branching=d.branching,
  )
  return SyntheticIterator(data, process_index, process_count, split)
