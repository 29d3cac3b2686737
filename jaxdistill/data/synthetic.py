"""A learnable synthetic token stream for smoke runs and tests.

Tokens follow a fixed random sparse Markov chain: each token has ``branching``
possible successors with Zipf-like probabilities, so a model can learn the
chain (the loss falls well below log V) but never predict it perfectly. Batch
``i`` is a pure function of (seed, i), so any step's batch can be rebuilt and
a resumed run sees exactly the batches an uninterrupted one would.

Rows are optionally padded at the end (weights 0, segment id 0) so every code
path that must ignore padding is exercised.

Batch arrays, all int32 / float32 of shape [B, T]:
  inputs, targets (inputs shifted left by one), weights (1 valid, 0 padding),
  segment_ids (1 valid, 0 padding), positions (0..T-1).
"""

import numpy as np


class SyntheticData:
  """Deterministic batches from a random sparse Markov chain.

  Args:
    vocab_size: V.
    seq_len: T.
    batch_size: global batch size B.
    seed: picks the chain and the stream.
    pad_fraction: share of rows cut short at a random length in [T/2, T).
    branching: successors per token.
  """

  def __init__(
    self,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    pad_fraction: float = 0.25,
    branching: int = 4,
  ):
    self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
    self.seed, self.pad_fraction = seed, pad_fraction
    rng = np.random.default_rng([seed, 0])
    self.next_VxC = rng.integers(0, vocab_size, size=(vocab_size, branching))
    probs_C = 1.0 / np.arange(1, branching + 1)
    self.cum_C = np.cumsum(probs_C / probs_C.sum())

  def global_batch(self, index: int, split: str = "train") -> dict[str, np.ndarray]:
    """The ``index``-th global batch of ``split`` ("train" or "validation")."""
    stream = {"train": 1, "validation": 2}[split]
    rng = np.random.default_rng([self.seed, stream, index])
    B, T = self.batch_size, self.seq_len
    seq_BxT1 = np.empty((B, T + 1), np.int64)
    seq_BxT1[:, 0] = rng.integers(0, self.vocab_size, size=B)
    u_BxT = rng.random((B, T))
    for t in range(T):
      choice_B = (u_BxT[:, t, None] > self.cum_C[None, :-1]).sum(axis=1)
      seq_BxT1[:, t + 1] = self.next_VxC[seq_BxT1[:, t], choice_B]
    lengths_B = np.full(B, T)
    cut_B = rng.random(B) < self.pad_fraction
    lengths_B[cut_B] = rng.integers(T // 2, T, size=int(cut_B.sum()))
    valid_BxT = np.arange(T)[None, :] < lengths_B[:, None]
    return {
      "inputs": np.where(valid_BxT, seq_BxT1[:, :-1], 0).astype(np.int32),
      "targets": np.where(valid_BxT, seq_BxT1[:, 1:], 0).astype(np.int32),
      "weights": valid_BxT.astype(np.float32),
      "segment_ids": valid_BxT.astype(np.int32),
      "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
    }

  def local_batch(
    self, index: int, process_index: int, process_count: int, split: str = "train"
  ) -> dict[str, np.ndarray]:
    """This process's contiguous rows of the ``index``-th global batch."""
    rows = self.batch_size // process_count
    lo = process_index * rows
    return {k: v[lo : lo + rows] for k, v in self.global_batch(index, split).items()}


class SyntheticIterator:
  """Iterates this process's rows of consecutive global batches.

  Has the interface every jaxdistill data iterator has: ``next()`` gives a
  dict of numpy [B_local, T] arrays; ``get_state()`` / ``set_state()`` give
  and take a JSON-able dict so a checkpoint can resume the stream exactly.
  """

  def __init__(
    self, data: SyntheticData, process_index: int, process_count: int, split: str = "train"
  ):
    self.data, self.split = data, split
    self.process_index, self.process_count = process_index, process_count
    self.index = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.data.local_batch(self.index, self.process_index, self.process_count, self.split)
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])
