"""A drifting stream for continual distillation (``continual.domains`` > 0).

The stream, built once per config (memoised) from the training split of a text source:

  documents   in their order: the built-in corpus sorted by file path (a file's code and
              docstrings together), any other source as it lists them (files in order)
  domains     the ordered documents cut into ``continual.domains`` = D contiguous groups of
              about equal token counts, at document boundaries: with the built-in corpus a
              domain is a group of neighbouring modules (``asyncio/*`` before ``email/*``)
  rows        each domain's documents tokenised (+ end-of-text), concatenated and cut into
              rows of T next-token pairs (pack mode: segment ids and positions restart per
              document); the rows of a domain shuffled within it (seed, domain), so a batch
              mixes its files; the stream is domain 0's rows, then domain 1's, ...: N rows
  windows     the stream cut into blocks of R = W * B + E rows (W = ``continual.window_steps``,
              B = ``data.batch_size``, E = ``continual.eval_rows``); block k is window k. E
              rows spread evenly over the block are held out (window k's evaluation rows, never
              trained on); the other W * B rows, in stream order, are the batches of training
              steps k * W .. (k + 1) * W - 1. The stream is read once: floor(N / R) windows.

The drift is the domain order: window k's rows come from the domains at its place in the
stream. ``ContinualIterator`` yields step s's batch; its state is the step (the position in
the stream), so a checkpoint resumes at the same row, mid-window included. ``recent_rows`` is
the sliding window a teacher refresh trains on: the W * B training rows before a step.

Shape legend: N stream rows, T sequence length, B batch rows (global), b this process's rows.
"""

import dataclasses
import json
from typing import Any

import numpy as np

from jaxdistill.errors import ConfigError, JaxdistillError

STATE_VERSION = 1
KEYS = ("inputs", "targets", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Stream:
  """The packed stream: ``rows`` [N, T] int32 per key of ``KEYS``, ``domain`` [N] (each row's
  domain), ``names`` (each domain's first and last document)."""

  rows: dict[str, np.ndarray]
  domain: np.ndarray
  names: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.domain)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where window k's training and held-out rows sit in a stream of ``num_rows`` rows."""

  num_rows: int
  window_steps: int
  batch_size: int
  eval_rows: int

  @property
  def block(self) -> int:
    """R = W * B + E rows per window."""
    return self.window_steps * self.batch_size + self.eval_rows

  @property
  def num_windows(self) -> int:
    return self.num_rows // self.block

  @property
  def num_steps(self) -> int:
    """Training steps the stream holds (whole windows only)."""
    return self.num_windows * self.window_steps

  def _held(self) -> np.ndarray:
    # E offsets spread evenly over the block (spacing R / E >= 1, so all distinct).
    e, r = self.eval_rows, self.block
    return (np.arange(e) * r + r // 2) // e if e else np.zeros(0, np.int64)

  def eval_indices(self, window: int) -> np.ndarray:
    """[E] stream rows held out of window ``window``."""
    return window * self.block + self._held()

  def train_indices(self, window: int) -> np.ndarray:
    """[W * B] stream rows window ``window`` trains on, in order."""
    offsets = np.setdiff1d(np.arange(self.block), self._held())
    return window * self.block + offsets

  def step_indices(self, step: int) -> np.ndarray:
    """[B] stream rows of training step ``step`` (counting from 0)."""
    if not 0 <= step < self.num_steps:
      raise JaxdistillError(
        f"the continual stream holds {self.num_steps} steps ({self.num_windows} windows of "
        f"{self.window_steps}); step {step + 1} is past its end"
      )
    window, j = divmod(step, self.window_steps)
    b = self.batch_size
    return self.train_indices(window)[j * b : (j + 1) * b]

  def recent_indices(self, step: int) -> np.ndarray:
    """The sliding window before ``step``: the training rows of steps max(0, step - W) ..
    step - 1, in stream order ([0] at step 0)."""
    first = max(0, step - self.window_steps)
    if step == first:
      return np.zeros(0, np.int64)
    return np.concatenate([self.step_indices(s) for s in range(first, step)])


def layout_of(cfg: Any, stream: Stream) -> Layout:
  c = cfg.continual
  return Layout(len(stream), c.window_steps, cfg.data.batch_size, c.eval_rows)


def _key(cfg: Any) -> str:
  return json.dumps(
    {
      "data": cfg.data.to_dict(),
      "cache_dir": cfg.cache_dir,
      "vocab": cfg.student.vocab_size,
      "domains": cfg.continual.domains,
      "seed": cfg.seed,
    },
    sort_keys=True,
  )


_STREAMS: dict[str, Stream] = {}


def stream_of(cfg: Any) -> Stream:
  """The config's stream (built once per process and config: its data keys, seed, domains)."""
  key = _key(cfg)
  if key not in _STREAMS:
    if len(_STREAMS) >= 4:  # a handful of configs per process (tests, benchmarks)
      _STREAMS.pop(next(iter(_STREAMS)))
    _STREAMS[key] = _build(cfg)
  return _STREAMS[key]


def _build(cfg: Any) -> Stream:
  from jaxdistill.data import text as pipeline
  from jaxdistill.data import tokenizer as tok_lib

  prepared = pipeline.prepare(cfg)
  order, names = _document_order(cfg, prepared.train)
  d = cfg.continual.domains
  if d > len(order):
    raise ConfigError(
      "continual.domains", f"{d} domains from {len(order)} training documents: use at most that"
    )
  eos = tok_lib.eos_id(prepared.tokenizer)
  texts = [prepared.train[i] for i in order]
  ids = [np.asarray(e.ids + [eos], np.int32) for e in prepared.tokenizer.encode_batch(texts)]
  lengths = np.array([len(x) - 1 for x in ids], np.int64)  # next-token pairs per document
  # Domain of document i: its token offset's share of the total, so domains hold about
  # equal token counts and a document is never split between two.
  before = np.cumsum(lengths) - lengths
  domain_of_doc = np.minimum(before * d // max(1, lengths.sum()), d - 1)
  rows, domain, labels = {k: [] for k in KEYS}, [], []
  for k in range(d):
    docs = np.flatnonzero(domain_of_doc == k)
    if not len(docs):
      raise ConfigError("continual.domains", f"domain {k} of {d} is empty: use fewer domains")
    packed = _pack([ids[i] for i in docs], cfg.data.seq_len)
    perm = np.random.default_rng([cfg.seed, k]).permutation(len(packed["inputs"]))
    for key in KEYS:
      rows[key].append(packed[key][perm])
    domain.append(np.full(len(perm), k, np.int32))
    labels.append(f"{names[order[docs[0]]]} .. {names[order[docs[-1]]]}")
  return Stream(
    {k: np.concatenate(v) for k, v in rows.items()}, np.concatenate(domain), tuple(labels)
  )


def _document_order(cfg: Any, docs: Any) -> tuple[list[int], list[str]]:
  """(indices of the non-empty documents in stream order, every document's name). The built-in
  corpus is stored in hash order: its records' paths give the order of the files."""
  n = len(docs)
  names = [f"document {i}" for i in range(n)]
  if cfg.data.source == "stdlib":
    inner = getattr(docs, "docs", docs)  # only code / only docstrings: a view of the records
    picked = getattr(docs, "indices", range(n))
    names = [_decoded(inner.records[i]["path"]) for i in picked]
  order = sorted((name, i) for i, name in enumerate(names) if docs[i].strip())
  return [i for _, i in order], names


def _decoded(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _pack(docs: list[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Documents of ids (each ending in end-of-text) -> [rows, T] next-token rows, packed;
  segment ids number the documents within each row from 1, positions restart per document,
  the last row's tail is padding (segment 0)."""
  inputs = np.concatenate([x[:-1] for x in docs])
  targets = np.concatenate([x[1:] for x in docs])
  doc = np.concatenate([np.full(len(x) - 1, i, np.int64) for i, x in enumerate(docs)])
  pos = np.concatenate([np.arange(len(x) - 1) for x in docs])
  n_rows = -(-len(inputs) // seq_len)
  pad = n_rows * seq_len - len(inputs)

  def shaped(a, fill):
    return np.concatenate([a, np.full(pad, fill, a.dtype)]).reshape(n_rows, seq_len)

  doc_RxT = shaped(doc, -1)
  segments = np.where(doc_RxT >= 0, doc_RxT - doc_RxT[:, :1] + 1, 0)
  # A row starting mid-document restarts its positions at 0: each row is its own sequence.
  pos_RxT = shaped(pos, 0)
  first = pos_RxT[:, :1] * (segments == 1)
  return {
    "inputs": shaped(inputs, 0).astype(np.int32),
    "targets": shaped(targets, 0).astype(np.int32),
    "segment_ids": segments.astype(np.int32),
    "positions": np.where(segments > 0, pos_RxT - first, 0).astype(np.int32),
  }


def batch_of(stream: Stream, indices: np.ndarray, rows: int, process: tuple[int, int]) -> dict:
  """Stream rows ``indices`` as a global batch of ``rows`` rows (empty rows after them), and of
  it this process's share: a dict of [b, T] arrays (the batch contract, ``weights`` included).

  Args:
    process: (process_index, process_count); ``rows`` must divide by the count."""
  index, count = process
  local = rows // count
  mine = np.arange(index * local, (index + 1) * local)
  present = mine < len(indices)
  picked = indices[np.minimum(mine, max(0, len(indices) - 1))] if len(indices) else mine * 0
  out = {k: np.where(present[:, None], stream.rows[k][picked], 0) for k in KEYS}
  out["weights"] = (out["segment_ids"] > 0).astype(np.float32)
  return out


def window_batches(cfg: Any, window: int, process: tuple[int, int] = (0, 1)) -> list[dict]:
  """Window ``window``'s held-out rows as this process's rows of global batches of
  ``data.batch_size`` (the last padded with empty rows)."""
  stream = stream_of(cfg)
  held = layout_of(cfg, stream).eval_indices(window)
  b = cfg.data.batch_size
  return [batch_of(stream, held[i : i + b], b, process) for i in range(0, len(held), b)]


def recent_batches(cfg: Any, step: int, num: int, process: tuple[int, int] = (0, 1)) -> list[dict]:
  """``num`` batches drawn from the sliding window before ``step`` (``Layout.recent_indices``):
  its rows in a (seed, step) order, repeated if it holds fewer than ``num`` batches; [] when
  nothing was streamed yet. Deterministic, so a resumed run redraws the same batches."""
  stream = stream_of(cfg)
  recent = layout_of(cfg, stream).recent_indices(step)
  if not len(recent) or num <= 0:
    return []
  b = cfg.data.batch_size
  order = np.random.default_rng([cfg.seed, step]).permutation(len(recent))
  order = np.resize(order, num * b)
  return [batch_of(stream, recent[order[i * b : (i + 1) * b]], b, process) for i in range(num)]


def check(cfg: Any) -> Layout:
  """Builds the stream and checks that a window and the run fit in it; returns its layout.

  Raises:
    ConfigError: a window larger than the stream, or more steps than it holds."""
  layout = layout_of(cfg, stream_of(cfg))
  if layout.block > layout.num_rows:
    raise ConfigError(
      "continual.window_steps",
      f"a window of {layout.window_steps} steps x {layout.batch_size} rows + "
      f"{layout.eval_rows} held-out rows = {layout.block} rows is larger than the stream "
      f"({layout.num_rows} rows of {cfg.data.seq_len} tokens in {cfg.continual.domains} domains)",
    )
  if cfg.optim.steps > layout.num_steps:
    raise ConfigError(
      "optim.steps",
      f"{cfg.optim.steps} steps, but the continual stream holds {layout.num_windows} windows of "
      f"{layout.window_steps} steps = {layout.num_steps} steps",
    )
  return layout


class ContinualIterator:
  """The training iterator over the stream: ``next()`` gives step s's batch (this process's
  [b, T] rows), then s + 1's; ``get_state()`` / ``set_state()`` carry s (JSON)."""

  def __init__(self, cfg: Any, process_index: int = 0, process_count: int = 1):
    self.stream = stream_of(cfg)
    self.layout = layout_of(cfg, self.stream)
    self.process, self.step = (process_index, process_count), 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = self.layout.step_indices(self.step)
    self.step += 1
    return batch_of(self.stream, rows, self.layout.batch_size, self.process)

  @property
  def window(self) -> int:
    """The window the next batch belongs to."""
    return self.step // self.layout.window_steps

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "continual_step": self.step}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION or "continual_step" not in state:
      raise JaxdistillError(
        f"the data iterator state {sorted(state)} is not a continual stream's: was "
        "continual.domains changed since the checkpoint? restore it, or start a new run"
      )
    self.step = int(state["continual_step"])
