"""``data.source=task``: prompt / completion rows of a built-in task, the prompt carrying no loss.

A row is one example, never packed with another: its prompt's tokens, its completion's and the
end-of-text token, zero-padded to T::

  tokens   p_0 .. p_{P-1} c_0 .. c_{C-1} <|endoftext|>
  inputs   tokens[:-1]         targets  tokens[1:]
  weights  1 where the target is a completion token or the end-of-text, else 0

so a model is trained (and evaluated) only on what it must write after the prompt, and a row's
prompt is the positions before its first weighted target (what ``distill.on_policy`` samples
after with ``prompt_tokens=0``).

Where the pairs come from:

  training    ``data.task_train_files`` empty: the task's own reference solutions, problem
              i = 0, 1, 2, ... of its train split (``tasks.problem`` with ``data.task_seed``;
              endless); else those
              files' (prompt, completion) records (``.jsonl`` objects, or ArrayRecord shards of
              JSON records, e.g. teacher-written by ``jaxdistill precompute --generate``),
              cycled in a seeded order per epoch
  corpus      ``data.task_train_files`` with a text corpus as ``data.source`` (e.g. a
              teacher's continuations of corpus prompts, sequence-level KD): the training
              rows are those files' records, tokenised by the corpus's tokenizer; validation
              stays the corpus's held-out split
  validation  the first ``data.task_eval_problems`` problems of the held-out split, once
  teacher targets  ``teacher.source='cache'`` with ``teacher.path`` = a teacher-written set
              made with top-k (``precompute --generate --topk K``): its records are the
              training pairs, and each row also carries the stored targets at its completion's
              positions (``teacher_topk_ids`` [T, K], ``teacher_topk_logp`` [T, K],
              ``teacher_tail`` [T]; zeros on the prompt, which carries no loss), the batch
              keys of a logit cache (``data/cached.py``) that the sparse head reads

Documents for the tokenizer (``sources.open_source``) are ``prompt + completion`` of the first
``TOKENIZER_PROBLEMS`` training problems; the task configs use a 257-token byte-level BPE
(256 bytes + end-of-text: no merges, one token a character).

Each process takes rows p, p + P, ... of the global row stream (P processes), so P processes
read what one would. The iterator's state is the next global row index (JSON).

Shape legend: B rows per batch (this process), T sequence length.
"""

import base64
import glob
import json
import os
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from jaxdistill.data import tasks
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.errors import ConfigError, JaxdistillError

TASKS = ("arithmetic",)
TOKENIZER_PROBLEMS = 4096
STATE_VERSION = 1


def documents(cfg: Any, split: str) -> list[str]:
  """The task's text as documents (``sources.open_source``): prompt + completion each."""
  _check_task(cfg)
  count = TOKENIZER_PROBLEMS if split == "train" else cfg.data.task_eval_problems
  return [p.prompt + p.completion for p in tasks.problems(cfg.data.task_seed, split, count)]


def _check_task(cfg: Any) -> None:
  if cfg.data.task not in TASKS:
    raise ConfigError("data.task", f"unknown task {cfg.data.task!r}; choose from {TASKS}")


def read_pairs(
  pattern_list: str, key: str = "data.task_train_files", topk: bool = False
) -> list[tuple]:
  """(prompt, completion) records of comma-separated globs of .jsonl / ArrayRecord files;
  with ``topk`` (prompt, completion, stored targets) (see ``targets_of``).

  Raises:
    ConfigError: (naming ``key``) no file, or a record without the keys.
  """
  pairs: list[tuple] = []
  patterns = [p.strip() for p in pattern_list.split(",") if p.strip()]
  for pattern in patterns:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
      raise ConfigError(key, f"{pattern!r} matches no file")
    for path in files:
      for where, record in _records(path):
        try:
          obj = json.loads(record)
          pair = pair_of(obj)
          pairs.append(pair + (targets_of(obj),) if topk else pair)
        except (ValueError, KeyError, TypeError):
          need = "'prompt', 'completion'" + (" and top-k targets" if topk else "")
          raise ConfigError(key, f"{where} is not a JSON object with {need}") from None
  if not pairs:
    raise ConfigError(key, f"{pattern_list!r} holds no (prompt, completion) record")
  return pairs


def pair_of(record: dict) -> tuple:
  """(prompt, completion) of a record: its token-id lists when it has them (a teacher's
  continuation of a corpus prompt, ``prompts_from=data``: "prompt_ids", "completion_ids"),
  else its texts."""
  if "prompt_ids" in record:
    return [int(t) for t in record["prompt_ids"]], [int(t) for t in record["completion_ids"]]
  return str(record["prompt"]), str(record["completion"])


# Stored float dtypes of a generated record's top-k fields (``precompute.logprob_dtype``).
FLOAT_DTYPES = {"bf16": ml_dtypes.bfloat16, "f16": np.float16, "f32": np.float32}


def pack_floats(x: np.ndarray, dtype: str) -> dict:
  """A float array as a JSON record field: {"dtype", "shape", "b64": its bytes in ``dtype``
  (bf16 | f16 | f32), little-endian, base64}. bf16 costs 2.7 characters a value where a JSON
  float list costs about 12, and is what the logit cache stores (``cached.py``)."""
  raw = np.ascontiguousarray(np.asarray(x, np.float32).astype(FLOAT_DTYPES[dtype]))
  b64 = base64.b64encode(raw.astype(raw.dtype.newbyteorder("<")).tobytes()).decode("ascii")
  return {"dtype": dtype, "shape": list(raw.shape), "b64": b64}


def unpack_floats(field) -> np.ndarray:
  """float32: a ``pack_floats`` field, or a plain (nested) list of numbers (sets written
  before the binary fields, or ``.jsonl`` files written by hand)."""
  if not isinstance(field, dict):
    return np.asarray(field, np.float32)
  dtype = np.dtype(FLOAT_DTYPES[field["dtype"]]).newbyteorder("<")
  raw = np.frombuffer(base64.b64decode(field["b64"]), dtype)
  return raw.astype(np.float32).reshape(field["shape"])


def targets_of(record: dict) -> dict[str, np.ndarray]:
  """A generated record's stored top-k targets as arrays: ids int32 [C, K], log-probs and
  tail float32 ([C, K], [C]; stored binary, ``pack_floats``, or as lists)."""
  return {
    "topk_ids": np.asarray(record["topk_ids"], np.int32),
    "topk_logp": unpack_floats(record["topk_logp"]),
    "tail": unpack_floats(record["topk_tail"]),
  }


def place_targets(row: dict, targets: dict[str, np.ndarray], k: int) -> dict:
  """``row`` (``encode_row``'s) with ``teacher_*`` [T, ...] arrays: the stored targets at its
  weighted positions in order, zeros elsewhere."""
  at = np.flatnonzero(row["weights"] > 0)
  t, n = len(row["weights"]), min(len(at), len(targets["tail"]))
  out = dict(row)
  out["teacher_topk_ids"] = np.zeros((t, k), np.int32)
  out["teacher_topk_logp"] = np.zeros((t, k), np.float32)
  out["teacher_tail"] = np.zeros((t,), np.float32)
  out["teacher_topk_ids"][at[:n]] = targets["topk_ids"][:n]
  out["teacher_topk_logp"][at[:n]] = targets["topk_logp"][:n]
  out["teacher_tail"][at[:n]] = targets["tail"][:n]
  return out


def check_targets(cfg: Any, manifest: dict, where: str) -> None:
  """A teacher-written set as ``teacher.source='cache'`` targets: it fits the config.

  Raises:
    ConfigError: naming the key (not the task source, no top-k stored, another k, temperature,
      seq_len or logit kind, or ``data.task_train_files`` set besides).
  """
  g = manifest["generate"]
  if cfg.data.source != "task":
    raise ConfigError("data.source", f"{where} is a teacher-written set: it trains a task source")
  if not g.get("topk"):
    raise ConfigError(
      "teacher.path",
      f"{where} holds no teacher top-k targets; write it with `precompute --generate --topk K`",
    )
  if cfg.data.task_train_files:
    raise ConfigError(
      "data.task_train_files", "must be empty: the training pairs are teacher.path's records"
    )
  pairs = [
    ("precompute.k", g["topk"], cfg.precompute.k),
    ("distill.temperature", g["topk_temperature"], cfg.distill.temperature),
    ("data.seq_len", g["seq_len"], cfg.data.seq_len),
  ]
  for key, stored, configured in pairs:
    if stored != configured:
      raise ConfigError(key, f"the set ({where}) has {stored!r} but this config {configured!r}")
  if cfg.distill.logit.kind not in ("topk_renorm", "topk_tail"):
    raise ConfigError(
      "distill.logit.kind", f"the set ({where}) stores top-k targets: topk_renorm or topk_tail"
    )


def _records(path: str):
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if line.strip():
          yield f"{path}:{lineno}", line
    return
  from array_record.python import array_record_data_source

  source = array_record_data_source.ArrayRecordDataSource([path])
  for i in range(len(source)):
    yield f"{path} record {i}", source[i]


def check_writer(files: str, teacher_sha256: str) -> None:
  """Refuses training pairs written (``precompute --generate``) by another teacher than the
  run names: each directory of ``files`` holding a generated set's manifest must record a
  teacher with this content hash.

  Raises:
    ConfigError: naming ``data.task_train_files`` and both teachers.
  """
  for pattern in (p.strip() for p in files.split(",") if p.strip()):
    manifest = os.path.join(os.path.dirname(os.path.expanduser(pattern)), "manifest.json")
    if not os.path.isfile(manifest):
      continue
    with open(manifest, encoding="utf-8") as f:
      made = json.load(f)
    if made.get("kind") != "generated":
      continue
    wrote = str(made.get("teacher", {}).get("sha256", "?"))
    if wrote != teacher_sha256:
      raise ConfigError(
        "data.task_train_files",
        f"{os.path.dirname(manifest)!r} was written by teacher {wrote[:12]}..., but the run "
        f"names teacher {teacher_sha256[:12]}... (teacher.path); point teacher.* at the teacher "
        "that wrote it, or generate the set again",
      )


def encode_row(
  tokenizer: Any, prompt: str | Sequence[int], completion: str | Sequence[int], seq_len: int
) -> dict:
  """One row's [T] arrays (see the module docstring); a row longer than T + 1 tokens is cut
  (its tail then carries no end-of-text).

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` with an end-of-text token.
    prompt, completion: the example: texts (the completion gets the end-of-text), or token
      ids used as they are (a generated completion holds its end-of-text only if the teacher
      wrote one: a continuation cut at max_new_tokens must not teach the student to stop).
    seq_len: T.
  Raises:
    JaxdistillError: the prompt alone does not leave one completion token in T.
  """
  p_ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
  if isinstance(completion, str):
    c_ids = tokenizer.encode(completion).ids + [tok_lib.eos_id(tokenizer)]
  else:
    c_ids = list(completion)
  if len(p_ids) >= seq_len:
    raise JaxdistillError(
      f"the prompt {prompt[:40]!r} is {len(p_ids)} tokens: data.seq_len={seq_len} leaves no "
      "room for its completion; raise data.seq_len"
    )
  ids = np.asarray((p_ids + c_ids)[: seq_len + 1], np.int32)
  n = len(ids) - 1
  row = {k: np.zeros((seq_len,), np.int32) for k in ("inputs", "targets", "segment_ids")}
  row["inputs"][:n], row["targets"][:n], row["segment_ids"][:n] = ids[:-1], ids[1:], 1
  row["weights"] = np.zeros((seq_len,), np.float32)
  row["weights"][len(p_ids) - 1 : n] = 1.0
  row["positions"] = np.arange(seq_len, dtype=np.int32)
  return row


class TaskIterator:
  """This process's rows of consecutive global batches of task rows (see the module doc).

  ``next()`` gives a dict of numpy [B_local, T] arrays; ``get_state()`` / ``set_state()`` a
  JSON-able dict, so a checkpoint resumes the stream exactly. The validation iterator ends
  after one pass (its last batch padded with empty rows).
  """

  def __init__(self, cfg: Any, split: str, tokenizer: Any, process_index: int, process_count: int):
    _check_task(cfg)
    self.tokenizer, self.seq_len = tokenizer, cfg.data.seq_len
    self.global_rows = cfg.data.batch_size
    self.rows = self.global_rows // process_count
    self.process_index = process_index
    self.split, self.seed, self.next_row = split, cfg.data.task_seed, 0
    self.order_seed = cfg.seed
    self.pairs: Sequence[tuple] | None = None
    self.k = 0  # > 0: rows carry the stored teacher targets (teacher.source='cache')
    if split != "train":
      probs = tasks.problems(self.seed, "validation", cfg.data.task_eval_problems)
      self.pairs = [(p.prompt, p.completion) for p in probs]
    elif cfg.teacher.source == "cache":
      shards = os.path.join(cfg.teacher.path, "shard-*.arrayrecord")
      self.pairs, self.k = read_pairs(shards, "teacher.path", topk=True), cfg.precompute.k
    elif cfg.data.task_train_files:
      self.pairs = read_pairs(cfg.data.task_train_files)

  def __iter__(self):
    return self

  def _pair(self, i: int) -> tuple | None:
    if self.split != "train":
      return self.pairs[i] if i < len(self.pairs) else None
    if self.pairs is None:
      p = tasks.problem(self.seed, "train", i)
      return p.prompt, p.completion
    epoch, k = divmod(i, len(self.pairs))
    order = np.random.default_rng([self.order_seed, epoch]).permutation(len(self.pairs))
    return self.pairs[order[k]]

  def __next__(self) -> dict[str, np.ndarray]:
    if self.split != "train" and self.next_row >= len(self.pairs):
      raise StopIteration
    first = self.next_row + self.process_index * self.rows
    rows = []
    for i in range(first, first + self.rows):
      pair = self._pair(i)
      if pair is None:
        rows.append(_empty_row(self.seq_len))
        continue
      row = encode_row(self.tokenizer, pair[0], pair[1], self.seq_len)
      rows.append(place_targets(row, pair[2], self.k) if self.k else row)
    self.next_row += self.global_rows
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "task_row": self.next_row}

  def set_state(self, state: dict) -> None:
    if state.get("version") != STATE_VERSION or "task_row" not in state:
      raise JaxdistillError(
        "the data iterator state is not a task stream's; was data.source changed since the "
        "checkpoint? restore the data settings, or start a new run"
      )
    self.next_row = int(state["task_row"])


def _empty_row(seq_len: int) -> dict:
  row = {k: np.zeros((seq_len,), np.int32) for k in ("inputs", "targets", "segment_ids")}
  row["weights"] = np.zeros((seq_len,), np.float32)
  row["positions"] = np.arange(seq_len, dtype=np.int32)
  return row
