"""Text sources: where documents come from, by ``data.source``.

Each source is a random-access sequence of documents (``len`` and
``[i] -> str``) that grain reads with ``MapDataset.source``:

  stdlib        the built-in corpus (``corpora.py``), built into the cache once;
                ``data.stdlib_kind`` keeps all documents, only ``code`` or only
                ``docstrings`` (English prose)
  tfds          any prepared TFDS dataset: ``data.tfds_name`` is a registered name
                (``name[/config][:version]``, looked up in ``data.tfds_data_dir``)
                or the directory of a prepared dataset; ``data.text_key`` is the
                text feature; read with ``tfds.data_source`` (array_record, no TF)
  array_record  ArrayRecord files (``data.train_files`` / ``data.eval_files``,
                comma-separated globs); every record is one UTF-8 document
  text          ``.txt`` files (one document per file) or ``.jsonl`` files (one
                JSON object per line, the document under ``data.text_key``)
  task          a built-in task with checkable answers (``task_data.py``): its documents
                train the tokenizer; its rows are prompt + completion, never packed

``fingerprint`` identifies a split's contents cheaply, to key cached
tokenizers and teachers.

An image model (``student.arch`` != transformer) reads ``IMAGE_SOURCES`` instead:
``digits`` (the built-in MNIST digits), ``tfds`` (an image dataset) or ``synthetic``;
see ``image_sources.py``.
"""

import glob
import hashlib
import json
import os
from typing import Any, Sequence

from jaxdistill.errors import ConfigError

# Text sources are tokenised and packed by pipeline.py; ``synthetic`` needs no tokenizer.
TEXT_SOURCES = ("stdlib", "tfds", "array_record", "text", "task")
# An image model (student.arch != "transformer") reads these (image_sources.py): ``tfds`` is
# then an image dataset, ``synthetic`` a stream of class-conditional images.
IMAGE_SOURCES = ("digits", "tfds", "synthetic")
DATA_SOURCES = ("synthetic", "digits") + TEXT_SOURCES

SPLIT_KEYS = {"train": "train_split", "validation": "eval_split"}
FILE_KEYS = {"train": "train_files", "validation": "eval_files"}


class _Decoded(Sequence[str]):
  """A record source whose items become ``str`` documents."""

  def __init__(self, records: Any, key: str | None):
    self.records, self.key = records, key

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> str:
    record = self.records[index]
    if self.key is not None:
      record = record[self.key]
    return record.decode("utf-8", errors="replace") if isinstance(record, bytes) else str(record)

  def __repr__(self) -> str:  # grain prints sources in its pipeline description
    return f"_Decoded({type(self.records).__name__}, n={len(self)})"


class _OfKind(Sequence[str]):
  """The documents of ``records`` (built-in corpus examples) whose ``kind`` is ``kind``."""

  def __init__(self, records: Any, kind: str, key: str):
    self.docs = _Decoded(records, "text")
    self.indices = _kind_indices(records, kind, key)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> str:
    return self.docs[self.indices[index]]

  def __repr__(self) -> str:
    return f"_OfKind(n={len(self)})"


_KIND_INDICES: dict[str, list[int]] = {}


def _kind_indices(records: Any, kind: str, key: str) -> list[int]:
  """Indices of the records of ``kind``; one pass per corpus split and process (memoised)."""
  if key not in _KIND_INDICES:
    kinds = _Decoded(records, "kind")
    _KIND_INDICES[key] = [i for i in range(len(kinds)) if kinds[i] == kind]
  return _KIND_INDICES[key]


def _expand(cfg: Any, split: str) -> list[str]:
  key = FILE_KEYS[split]
  patterns = [p.strip() for p in cfg.data[key].split(",") if p.strip()]
  if not patterns:
    raise ConfigError(f"data.{key}", f"is empty; data.source={cfg.data.source!r} needs files")
  paths = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise ConfigError(f"data.{key}", f"{pattern!r} matches no file")
    paths += matched
  return paths


def _read_text_files(paths: list[str], key: str, text_key: str) -> list[str]:
  docs = []
  for path in paths:
    with open(path, encoding="utf-8", errors="replace") as f:
      if not path.endswith(".jsonl"):
        docs.append(f.read())
        continue
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          docs.append(str(json.loads(line)[text_key]))
        except (ValueError, KeyError, TypeError) as e:
          raise ConfigError(
            f"data.{key}", f"{path}:{lineno} is not a JSON object with key {text_key!r} ({e})"
          ) from None
  return docs


def _tfds_source(name: str, data_dir: str, split: str, key: str):
  import tensorflow_datasets as tfds

  try:
    if os.path.isdir(name):  # a prepared dataset's own directory
      return tfds.builder_from_directory(name).as_data_source(split=split)
    return tfds.data_source(
      name, split=split, data_dir=data_dir or None, download=False, try_gcs=False
    )
  except Exception as e:  # TFDS raises many kinds; all mean "not there / not prepared"
    raise ConfigError(
      key,
      f"cannot open TFDS dataset {name!r} split {split!r}"
      f"{f' in {data_dir!r}' if data_dir else ''}: {type(e).__name__}: {str(e)[:300]}",
    ) from None


def open_source(cfg: Any, split: str, cache: str) -> tuple[Sequence[str], str]:
  """The documents of ``split`` ("train" or "validation") and their fingerprint.

  Args:
    cfg: the config (``data`` section, ``cache_dir``).
    split: "train" or "validation".
    cache: the cache directory (the built-in corpus is built there).

  Returns:
    (documents, fingerprint): a random-access sequence of str and a short hex id
    of its contents.

  Raises:
    ConfigError: missing files, an unprepared dataset, an empty split.
  """
  d = cfg.data
  if d.source == "stdlib":
    from jaxdistill.data import corpora

    data_dir, name, corpus_fp = corpora.build_stdlib(
      cache, d.stdlib_max_files, d.stdlib_max_file_bytes, d.stdlib_root
    )
    records = _tfds_source(name, data_dir, split, "data.source")
    kind = d.stdlib_kind
    fp = f"stdlib:{corpus_fp}:{name}:{split}" + ("" if kind == "all" else f":{kind}")
    docs = _Decoded(records, "text") if kind == "all" else _OfKind(records, kind, fp)
  elif d.source == "tfds":
    split_name = d[SPLIT_KEYS[split]]
    docs = _Decoded(
      _tfds_source(d.tfds_name, d.tfds_data_dir, split_name, "data.tfds_name"), d.text_key
    )
    fp = f"tfds:{d.tfds_name}:{d.tfds_data_dir}:{split_name}:{len(docs)}"
  elif d.source == "array_record":
    import grain

    paths = _expand(cfg, split)
    docs = _Decoded(grain.sources.ArrayRecordDataSource(paths), None)
    fp = "array_record:" + ":".join(f"{p}:{os.path.getsize(p)}" for p in paths)
  elif d.source == "task":
    from jaxdistill.data import task_data

    docs = task_data.documents(cfg, split)
    fp = f"task:{d.task}:{d.task_seed}:{split}:{len(docs)}"
  elif d.source == "text":
    paths = _expand(cfg, split)
    docs = _read_text_files(paths, FILE_KEYS[split], d.text_key)
    fp = "text:" + ":".join(f"{p}:{os.path.getsize(p)}" for p in paths)
  else:
    raise ConfigError("data.source", f"{d.source!r} has no documents (it is not a text source)")
  if len(docs) == 0 or not any(docs[i].strip() for i in range(min(len(docs), 1000))):
    raise ConfigError(
      "data.source", f"the {split} split of data.source={d.source!r} has no text; check its files"
    )
  if d.source != "stdlib":  # cheap content check: the first and last documents
    fp += ":" + hashlib.sha256((docs[0] + "\0" + docs[len(docs) - 1]).encode()).hexdigest()
  return docs, hashlib.sha256(fp.encode()).hexdigest()[:16]
