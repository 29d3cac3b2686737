"""The grain input pipeline for language modelling: documents -> packed [B, T] batches.

Training split, per process::

  MapDataset.source(documents)[process_index::process_count]  disjoint, covering shards
    .shuffle(seed).repeat()          a new document order every epoch
    (data.interleave = N > 1: N streams of every N-th document, each tokenised and packed
     on its own, one row from each in turn: long documents interleaved before the window)
    .batch(16).map(encode_batch)     ids + <|endoftext|> as (inputs, targets) = (ids[:-1], ids[1:])
    .to_iter_dataset(read threads)   reading and tokenising run ahead (tokenizers' own threads)
    FlatMap                          back to one element per document
    pack: ConcatThenSplit to T       documents concatenated, split at T, with segment ids
          (or pad: one <=T chunk per row, zero-padded)   and positions restarting per piece
    WindowShuffle(shuffle_rows)      rows mixed across documents (a long file gives many rows)
    .batch(B / process_count)        this process's rows of the global batch
    .map(finalize) + thread prefetch inputs targets weights segment_ids positions

The validation split is packed whole, in order, on every process, cut into
global batches (the last one padded with empty rows) of which each process
takes its own rows: every process then sees the same number of batches, which
a multi-process evaluation needs, and one pass covers the split exactly once.

The iterator's state is grain's (``DatasetIterator.get_state``): a small JSON-able
dict of indices; after ``set_state`` the next batches are identical.

Shape legend: B batch rows (this process), T sequence length.
"""

import dataclasses
import functools
import json
import weakref
from typing import Any, Sequence

import grain
import numpy as np
from grain import experimental as grain_exp

from jaxdistill import paths
from jaxdistill.data import sources
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.data.corpora import cache_dir
from jaxdistill.errors import ConfigError, JaxdistillError


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A config's resolved data: documents per split, the tokenizer and their ids."""

  train: Sequence[str]
  train_fingerprint: str
  tokenizer: Any  # tokenizers.Tokenizer
  tokenizer_path: str
  tokenizer_hash: str

  def validation(self, cfg: Any) -> Sequence[str]:
    return _open(cfg, "validation")[0]


@functools.lru_cache(maxsize=8)
def _open_cached(key: str, split: str):
  cfg = json.loads(key)
  return sources.open_source(_Cfg(cfg), split, cache_dir(cfg["cache_dir"]))


class _Cfg(dict):
  """Attribute access over a plain dict (the frozen copy of the config the caches key on)."""

  def __getattr__(self, name):
    value = self[name]
    return _Cfg(value) if isinstance(value, dict) else value


def _key(cfg: Any) -> str:
  return json.dumps({"data": cfg.data.to_dict(), "cache_dir": cfg.cache_dir}, sort_keys=True)


def _open(cfg: Any, split: str):
  return _open_cached(_key(cfg), split)


def prepare(cfg: Any) -> Prepared:
  """Opens the training documents and gets the tokenizer; checks the vocabulary.

  Trains (and caches) a byte-level BPE of ``student.vocab_size`` tokens when
  ``data.tokenizer`` is empty. Results are memoised per config, so calling it
  first to check the data costs nothing later.

  Raises:
    ConfigError: missing or empty data, a bad tokenizer, a vocabulary that does
      not match the models'.
  """
  docs, fp = _open(cfg, "train")
  if cfg.data.tokenizer:
    tok, path = tok_lib.load(cfg.data.tokenizer), cfg.data.tokenizer
  else:
    tok, path = _cached_bpe(_key(cfg), cfg.student.vocab_size)
  tok_lib.check_vocab(tok, cfg, path)
  tok_lib.eos_id(tok)
  return Prepared(docs, fp, tok, path, tok_lib.digest(tok))


@functools.lru_cache(maxsize=8)
def _cached_bpe(key: str, vocab_size: int):
  cfg = _Cfg(json.loads(key))
  docs, fp = _open_cached(key, "train")
  return tok_lib.cached_bpe(
    cache_dir(cfg.cache_dir), fp, vocab_size, lambda: (docs[i] for i in range(len(docs)))
  )


def save_tokenizer(prepared: Prepared, workdir: str) -> str:
  """Copies the run's tokenizer to ``WORKDIR/tokenizer.json`` (once); returns that path."""
  path = paths.join(workdir, "tokenizer.json")
  if not paths.exists(path):
    paths.makedirs(workdir)
    paths.copy(prepared.tokenizer_path, path)  # from the local cache into the workdir
  return path


# Documents are tokenised this many at a time with ``encode_batch``, which runs in the
# tokenizers library's own threads (``encode`` holds the GIL: reader threads don't help).
TOKENIZE_BATCH = 16


@dataclasses.dataclass(frozen=True)
class _Tokenize:
  """Documents -> [{"inputs", "targets"} int32 [n] (next-token pairs)], empty ones dropped."""

  tokenizer: Any
  eos: int

  def __call__(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
    texts = [t for t in texts if t.strip()]
    out = []
    for encoding in self.tokenizer.encode_batch(texts) if texts else []:
      ids = np.asarray(encoding.ids + [self.eos], np.int32)
      out.append({"inputs": ids[:-1], "targets": ids[1:]})
    return out


@dataclasses.dataclass(frozen=True)
class _Unbatch(grain_exp.FlatMapTransform):
  max_fan_out: int = TOKENIZE_BATCH

  def flat_map(self, element):
    return element


def _tokenized(docs: grain.MapDataset, cfg: Any, prepared: Prepared) -> grain.IterDataset:
  """Documents -> one {"inputs", "targets"} element per non-empty document, in order."""
  tokenize = _Tokenize(prepared.tokenizer, tok_lib.eos_id(prepared.tokenizer))
  batches = docs.batch(TOKENIZE_BATCH, batch_fn=list).map(tokenize)
  return grain_exp.FlatMapIterDataset(batches.to_iter_dataset(_read_options(cfg)), _Unbatch())


@dataclasses.dataclass(frozen=True)
class _Chunk(grain_exp.FlatMapTransform):
  """Pad mode: a document -> its pieces of at most T next-token pairs."""

  seq_len: int
  max_fan_out: int = 1 << 20

  def flat_map(self, element):
    n, t = len(element["inputs"]), self.seq_len
    return [{k: v[i : i + t] for k, v in element.items()} for i in range(0, n, t)]


def _pad_row(element, seq_len: int):
  """Pad mode: one piece -> a row of T with segment id 1 on its tokens, 0 on padding."""
  n = len(element["inputs"])
  out = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "inputs_segment_ids")}
  out["inputs"][:n], out["targets"][:n] = element["inputs"], element["targets"]
  out["inputs_segment_ids"][:n] = 1
  out["inputs_positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
  return out


def _finalize(batch: dict) -> dict[str, np.ndarray]:
  """grain's packed features -> the batch contract (all [B, T])."""
  segment_ids_BxT = batch["inputs_segment_ids"].astype(np.int32)
  return {
    "inputs": batch["inputs"].astype(np.int32),
    "targets": batch["targets"].astype(np.int32),
    "weights": (segment_ids_BxT > 0).astype(np.float32),
    "segment_ids": segment_ids_BxT,
    "positions": batch["inputs_positions"].astype(np.int32),
  }


def _rows(ds: grain.IterDataset, cfg: Any) -> grain.IterDataset:
  """Variable-length (inputs, targets) documents -> rows of T (pack or pad mode)."""
  t = cfg.data.seq_len
  if cfg.data.packing == "pad":
    return grain_exp.FlatMapIterDataset(ds, _Chunk(t)).map(functools.partial(_pad_row, seq_len=t))
  return grain_exp.ConcatThenSplitIterDataset(ds, length_struct={"inputs": t, "targets": t})


def _interleaved_rows(docs: grain.MapDataset, cfg: Any, prepared: Prepared) -> grain.IterDataset:
  """The shuffled document stream -> rows taken in turn from ``data.interleave`` = N streams.

  Stream j reads documents j, j + N, j + 2N, ... of the shuffled, repeated order (so together
  the streams read every document of an epoch once), tokenises and packs them on its own, and
  the streams give one row each in turn (grain's mix, equal proportions). A document of
  thousands of rows then comes out one row in every N, next to the rows of N - 1 others, and a
  small shuffle window already holds N documents. Each stream tokenises one document at a time
  in the consuming thread (no read threads or read-ahead per stream: N of them would hold N
  buffers of documents); ``data.prefetch`` runs the whole pipeline ahead in its own thread.
  The state is every stream's grain state plus the mix's position: resumes exactly.
  """
  n = cfg.data.interleave
  tokenize = _Tokenize(prepared.tokenizer, tok_lib.eos_id(prepared.tokenizer))
  unthreaded = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  streams = []
  for j in range(n):
    one = docs[j::n].batch(1, batch_fn=list).map(tokenize).to_iter_dataset(unthreaded)
    streams.append(_rows(grain_exp.FlatMapIterDataset(one, _Unbatch()), cfg))
  return grain.IterDataset.mix(streams)


def _read_options(cfg: Any) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.data.num_threads, prefetch_buffer_size=64)


def train_dataset(
  cfg: Any, prepared: Prepared, process_index: int, process_count: int
) -> grain.IterDataset:
  """The infinite, shuffled training stream of this process's [B_local, T] batches."""
  d = cfg.data
  ds = grain.MapDataset.source(prepared.train)[process_index::process_count]
  if len(ds) == 0:
    raise ConfigError(
      "data.source",
      f"the training split has {len(prepared.train)} documents: too few for "
      f"{process_count} processes",
    )
  ds = ds.shuffle(seed=cfg.seed).repeat()
  if d.interleave > 1:
    it = _interleaved_rows(ds, cfg, prepared)
  else:
    it = _rows(_tokenized(ds, cfg, prepared), cfg)
  if d.shuffle_rows > 1:
    # Rows of one long document come out consecutively: shuffle rows within windows, so a
    # batch mixes many documents (else a 16 x 256 batch of 5k-token files is one file).
    it = grain_exp.WindowShuffleIterDataset(it, window_size=d.shuffle_rows, seed=cfg.seed)
  it = it.batch(d.batch_size // process_count, drop_remainder=True).map(_finalize)
  if d.prefetch > 0:
    it = grain_exp.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch)
  return it


def _finalize_row(row: dict) -> dict[str, np.ndarray]:
  return {k: v[0] for k, v in _finalize({k: v[None] for k, v in row.items()}).items()}


def ordered_rows(cfg: Any, prepared: Prepared) -> grain.IterDataset:
  """The training split packed in document order (no shuffle): one row of [T] arrays (the
  batch contract's keys) per element. Precomputed teacher targets index these rows."""
  docs = grain.MapDataset.source(prepared.train)
  return _rows(_tokenized(docs, cfg, prepared), cfg).map(_finalize_row)


def _global_to_local(batch: dict, global_rows: int, process_index: int, process_count: int):
  """A global batch (the last may be short) -> this process's rows, padded with empty rows."""
  out = {}
  for k, v_BxT in batch.items():
    if len(v_BxT) < global_rows:
      pad = np.zeros((global_rows - len(v_BxT), *v_BxT.shape[1:]), v_BxT.dtype)
      v_BxT = np.concatenate([v_BxT, pad])
    rows = global_rows // process_count
    out[k] = v_BxT[process_index * rows : (process_index + 1) * rows]
  return out


def eval_dataset(
  cfg: Any, prepared: Prepared, process_index: int, process_count: int
) -> grain.IterDataset:
  """One ordered pass over the validation split, as this process's rows of global batches."""
  docs = prepared.validation(cfg)
  it = _rows(_tokenized(grain.MapDataset.source(docs), cfg, prepared), cfg)
  b = cfg.data.batch_size
  it = it.batch(b, drop_remainder=False).map(_finalize)
  return it.map(
    functools.partial(
      _global_to_local, global_rows=b, process_index=process_index, process_count=process_count
    )
  )


def _close_quietly(it) -> None:
  """Stops grain's prefetch thread; at interpreter exit this runs before module teardown,
  and grain's own ``__del__`` (which would close again with its modules gone and print a
  traceback) becomes a no-op."""
  it.close()
  it.close = lambda: None


# Bump when a change to the pipeline's stages changes what a saved grain state means: a
# checkpoint of another version then fails with a clear error instead of a KeyError deep in
# grain or, worse, a silently different stream.
STATE_VERSION = 1


class GrainIterator:
  """``next()`` over a grain dataset, its prefetch thread stopped quietly when dropped, and
  ``_restore`` of a saved grain state with a clear error; the text (``LMIterator``) and image
  (``images.ImageIterator``) iterators add their ``get_state`` / ``set_state`` checks."""

  def __init__(self, dataset: grain.IterDataset):
    self._it = iter(dataset)
    weakref.finalize(self, _close_quietly, self._it)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def _restore(self, grain_state: Any) -> None:
    try:
      self._it.set_state(grain_state)
    except (KeyError, ValueError, TypeError, IndexError) as e:
      raise JaxdistillError(
        f"the data iterator state does not fit this pipeline ({type(e).__name__}: {e}); was "
        "data.* changed since the checkpoint? restore the data settings, or start a new run"
      ) from None


class LMIterator(GrainIterator):
  """The data-iterator interface over a grain dataset.

  ``next()`` gives a dict of numpy [B_local, T] arrays; ``get_state()`` /
  ``set_state()`` give and take grain's JSON-able state, so a checkpoint
  resumes the stream exactly. The validation iterator ends after one pass.
  """

  def __init__(self, dataset: grain.IterDataset, prepared: Prepared):
    super().__init__(dataset)
    self.prepared = prepared

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "grain": self._it.get_state()}

  def set_state(self, state: dict) -> None:
    version = state.get("version", 1)  # states saved before versioning are version 1
    if version != STATE_VERSION:
      raise JaxdistillError(
        f"the data iterator state was saved by input-pipeline version {version}, this is "
        f"version {STATE_VERSION}: the stream cannot continue exactly; resume with the "
        "jaxdistill that saved it, or start a new run from its final_params"
      )
    self._restore(_tuples_restored(state["grain"]))


def _tuples_restored(state: Any) -> Any:
  """Undoes what JSON does to grain's state: ConcatThenSplit compares its remainder slices
  with tuples, so a slice read back as a list would wrongly mean "has a remainder"."""
  if isinstance(state, dict):
    return {
      k: {f: tuple(v) for f, v in val.items()} if k == "remainder_slices" else _tuples_restored(val)
      for k, val in state.items()
    }
  if isinstance(state, list):  # data.interleave: the mix's list of per-stream states
    return [_tuples_restored(s) for s in state]
  return state
