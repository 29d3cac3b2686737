"""The ``generate --output FILE.jsonl`` file: rows in request order, resumable, never overwritten.

A request's rows (prompt p, sample s: row ``p * num_samples + s``) are appended in that order,
a batch at a time, each batch flushed and fsynced. Beside the file, ``FILE.meta.json`` records
the settings that decide its content (model, prompts, sampling, seed, ...) and their hash;
``open_output`` writes it before the first row.

A restart with the same arguments (``open_output`` again) checks the sidecar's hash, drops a
trailing partial line (a kill mid-write), checks that the complete rows are the request's first
rows in order, and reports how many there are: the caller skips them and appends the rest.
Sampling keys depend on (seed, row, step) only, so the rows of a resumed run are those of an
uninterrupted one. A file without a sidecar (not ours), or one written with other settings, is
refused; nothing existing is ever rewritten, except that cut-off last line.
"""

import hashlib
import json
import os
from typing import Any, Sequence

from jaxdistill.errors import JaxdistillError

META_SUFFIX = ".meta.json"
VERSION = 1


def settings_hash(settings: dict) -> str:
  """sha256 (hex, 16 chars) of ``settings`` as canonical JSON."""
  blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
  return hashlib.sha256(blob).hexdigest()[:16]


def _differences(old: dict, new: dict) -> list[str]:
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _read_meta(path: str) -> dict | None:
  meta_path = path + META_SUFFIX
  if not os.path.exists(meta_path):
    return None
  try:
    meta = json.loads(open(meta_path, encoding="utf-8").read())
  except (OSError, ValueError) as e:
    raise JaxdistillError(f"--output {path!r}: its {meta_path!r} is unreadable ({e})") from None
  if not isinstance(meta, dict) or "hash" not in meta:
    raise JaxdistillError(f"--output {path!r}: {meta_path!r} is no jaxdistill generate sidecar")
  return meta


def _write_meta(path: str, settings: dict, rows: int) -> None:
  meta = {"version": VERSION, "hash": settings_hash(settings), "rows": rows, "settings": settings}
  tmp = f"{path}{META_SUFFIX}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path + META_SUFFIX)


def _complete_rows(path: str, expected: Sequence[tuple[int, int]]) -> int:
  """The number of complete rows of ``path`` (a cut-off last line is truncated away)."""
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1
  if end < len(data):  # a kill mid-write left part of a line: drop it
    with open(path, "r+b") as f:
      f.truncate(end)
      f.flush()
      os.fsync(f.fileno())
  lines = data[:end].splitlines()
  if len(lines) > len(expected):
    raise JaxdistillError(
      f"--output {path!r} holds {len(lines)} rows, more than the request's {len(expected)}"
    )
  for n, (line, (p, s)) in enumerate(zip(lines, expected), 1):
    try:
      row = json.loads(line)
      ok = (row["prompt_index"], row["sample_index"]) == (p, s)
    except (ValueError, KeyError, TypeError):
      ok = False
    if not ok:
      raise JaxdistillError(
        f"--output {path!r} line {n} is not row (prompt {p}, sample {s}) of this request; "
        "the file was edited: pass a new --output"
      )
  return len(lines)


def open_output(path: str, settings: dict, expected: Sequence[tuple[int, int]]) -> int:
  """Prepares ``path`` for writing the request's rows; returns how many are already there.

  Args:
    path: the .jsonl file (local).
    settings: what decides the rows' content (JSON-serialisable); hashed into the sidecar.
    expected: (prompt_index, sample_index) of every row of the request, in order.
  Raises:
    JaxdistillError: ``path`` is a directory, a file not written by this command, one written
      with other settings (the differing keys are named), or rows out of order.
  """
  if os.path.isdir(path):
    raise JaxdistillError(f"--output {path!r} is a directory; pass a .jsonl file name")
  exists = os.path.exists(path) and os.path.getsize(path) > 0
  meta = _read_meta(path)
  if exists and meta is None:
    raise JaxdistillError(
      f"--output {path!r} exists and was not written by jaxdistill generate (no "
      f"{os.path.basename(path)}{META_SUFFIX}); pass a new --output"
    )
  if exists and meta["hash"] != settings_hash(settings):
    changed = _differences(meta.get("settings", {}), settings)
    raise JaxdistillError(
      f"--output {path!r} was written with other settings (differing: "
      f"{', '.join(changed) or 'unknown'}); rerun with its arguments to resume, or pass a new "
      "--output"
    )
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise JaxdistillError(f"--output {path!r}: no directory {parent!r}")
  if not exists:
    _write_meta(path, settings, len(expected))
    return 0
  return _complete_rows(path, expected)


def row(completion: Any, prompt_text: str, num_samples: int, logprobs: bool) -> dict:
  """The JSON object of one ``Completion`` (see docs/generate.md for the fields)."""
  out = {
    "prompt_index": completion.index // num_samples,
    "sample_index": completion.index % num_samples,
    "prompt": prompt_text,
    "prompt_ids": list(completion.prompt_ids),
    "completion": completion.text,
    "token_ids": list(completion.token_ids),
    "stop_reason": completion.stop_reason,
  }
  if logprobs:
    out["logprobs"] = completion.logprobs
  return out


def append(path: str, rows: Sequence[dict]) -> None:
  """Appends ``rows`` (one JSON object a line), then flushes and fsyncs."""
  if not rows:
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    f.flush()
    os.fsync(f.fileno())


def format_row(r: dict, has_tokenizer: bool) -> str:
  """A row, readable: a header line, the prompt, then the completion after ``>>> `` (token ids
  without a tokenizer)."""
  head = (
    f"# prompt {r['prompt_index']}, sample {r['sample_index']}: {len(r['token_ids'])} tokens, "
    f"{r['stop_reason']}"
  )
  if has_tokenizer:
    return f"{head}\n{r['prompt']}\n>>> {r['completion']}\n"
  ids = lambda xs: " ".join(map(str, xs))  # noqa: E731
  return f"{head}\n{ids(r['prompt_ids'])}\n>>> {ids(r['token_ids'])}\n"
