"""Writing a teacher-target cache: the output directory check, the settings check (``start``),
the shard writer thread, sidecars, the manifest, and ``verify``. The record format and reading
are ``cached.py``'s (an image classifier's whole class logits: ``cached_images.py``).

A shard is written to ``shard-S.arrayrecord.partial``; its sidecar ``shard-S.json`` (records,
sha256) is written, then the shard is renamed: a shard with both is finished, anything else is
redone by a rerun. ``manifest.json`` lists every shard once all exist.

An ``--output`` on an object store (``gs://``; ``paths``): ArrayRecord's writer needs a local
file, so the ``.partial`` is written in a local temporary directory and uploaded as the shard
after its sidecar (an object appears only once its upload completes: the same guarantee).
"""

import json
import os
import queue
import re
import shutil
import tempfile
import threading

import jax
from array_record.python import array_record_module

from jaxdistill import paths
from jaxdistill.data import cached, cached_images
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import distributed

# Names precompute writes into --output (a teacher.source=pretrain teacher trains in teacher/).
_OUR_NAME_RE = re.compile(
  r"^(shard-\d+\.(arrayrecord(\.partial)?|logits(\.partial)?|json(\.tmp)?)"
  r"|(settings|manifest)\.json\.tmp|teacher)$"
)


def check_output(output: str) -> None:
  """Refuses an ``output`` that is a file or a non-empty directory that is not a cache of ours.

  Ours (resumed): a directory holding settings.json or manifest.json, or only names
  precompute writes (shards, sidecars, teacher/): a run stopped before its settings.
  """
  existing = paths.nearest_existing(output)  # the output, or the ancestor it would be made in
  if paths.exists(existing) and not paths.isdir(existing):
    raise JaxdistillError(f"--output {output!r} is no directory ({existing!r} is a file)")
  names = paths.listdir(output) if paths.isdir(output) else []
  if cached.SETTINGS in names or cached.MANIFEST in names:
    return
  foreign = sorted(n for n in names if not _OUR_NAME_RE.match(n))
  if foreign:
    raise JaxdistillError(
      f"--output {output!r} is not empty and holds no precompute cache ({cached.SETTINGS}; "
      f"found {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); pass a new or "
      "empty directory"
    )


def start(output: str, current: dict) -> None:
  """Creates ``output`` with settings.json, or checks a rerun uses the same settings.

  Raises:
    JaxdistillError: ``output`` holds a cache made with other settings (naming the keys).
  """
  path = paths.join(output, cached.SETTINGS)
  current = json.loads(json.dumps(current))
  if paths.exists(path):
    saved = json.loads(paths.read_text(path))
    if saved != current:
      diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
      raise JaxdistillError(
        f"{output!r} holds a cache made with other settings (they differ in {diff}); "
        "pass a new --output or the same config"
      )
  # Every process makes the directory: past the barrier, another may open its first shard
  # there before process 0 gets to it.
  paths.makedirs(output)
  distributed.barrier("jaxdistill:precompute-settings-checked")
  if jax.process_index() == 0:
    write_json(path, current)


class ShardWriter:
  """A thread that encodes and writes records, and finishes shards (sidecar, then rename)."""

  def __init__(self, output: str, layout: cached.Layout):
    self.output, self.layout, self.error = output, layout, None
    # A remote output's partial shards are staged on the local disk (see the module doc).
    self.staging = (
      tempfile.mkdtemp(prefix="jaxdistill-shards-") if paths.is_remote(output) else None
    )
    self.queue = queue.Queue(maxsize=4)
    self.thread = threading.Thread(target=self._loop, daemon=True)
    self.thread.start()

  def put(self, item) -> None:
    if self.error is not None:
      raise self.error
    self.queue.put(item)

  def join(self) -> None:
    self.queue.put(None)
    self.thread.join()
    if self.staging:
      shutil.rmtree(self.staging, ignore_errors=True)
    if self.error is not None:
      raise self.error

  def _loop(self) -> None:
    writer, count = None, 0
    while (item := self.queue.get()) is not None:
      if self.error is not None:
        continue
      try:
        kind, s, *rest = item
        partial = cached.shard_path(self.output, s) + ".partial"
        if self.staging:
          partial = os.path.join(self.staging, os.path.basename(partial))
        if kind == "open":
          writer, count = array_record_module.ArrayRecordWriter(partial, cached.WRITER_OPTIONS), 0
        elif kind == "rows":
          rows, targets = rest
          for i, row in enumerate(rows):
            writer.write(cached.encode(self.layout, row, {k: v[i] for k, v in targets.items()}))
          count += len(rows)
        else:  # "close"
          writer.close()
          side = {"index": s, "records": count, "sha256": cached.sha256_file(partial)}
          write_json(cached.sidecar_path(self.output, s), side)
          paths.replace(partial, cached.shard_path(self.output, s))
      except Exception as e:  # reported to the main thread at its next put / join
        self.error = e


def write_json(path: str, value: dict) -> None:
  paths.write_text(path, json.dumps(value, indent=2, sort_keys=True))


def finished(output: str, s: int, shard_path=cached.shard_path) -> bool:
  """Shard ``s`` exists with its sidecar (``shard_path``: an image cache's
  ``cached_images.shard_path``)."""
  return paths.exists(shard_path(output, s)) and paths.exists(cached.sidecar_path(output, s))


def write_manifest(
  output: str, current: dict, rows: int, shards: int, shard_path=cached.shard_path
) -> None:
  """``manifest.json``: the settings, the rows and every shard's sidecar (all must exist)."""
  entries = []
  for s in range(shards):
    if not finished(output, s, shard_path):
      raise JaxdistillError(f"shard {s} of {output!r} is missing; rerun precompute to finish it")
    side = json.loads(paths.read_text(cached.sidecar_path(output, s)))
    entries.append({"index": s, "records": side["records"], "sha256": side["sha256"]})
  write_json(paths.join(output, cached.MANIFEST), dict(current, rows=rows, shards=entries))


def verify(output: str) -> dict:
  """Re-reads every shard: its sha256 and record count against the manifest (a language
  model's ArrayRecord shards, or an image cache's raw logits, by the manifest's kind).

  Returns:
    {"shards", "rows"} when everything matches.

  Raises:
    JaxdistillError: listing every missing or corrupted shard, and what differs.
  """
  try:
    manifest = cached.read_manifest(output, version=None)
    image = manifest.get("kind") == cached.IMAGE_KIND
    manifest = cached_images.read_manifest(output) if image else cached.read_manifest(output)
  except ConfigError as e:
    raise JaxdistillError(str(e).replace("teacher.path: ", "--output: ")) from None
  problems, total = [], 0
  for entry in manifest["shards"]:
    path = (cached_images.shard_path if image else cached.shard_path)(output, entry["index"])
    name = paths.path(path).name
    if not paths.isfile(path):
      problems.append(f"{name} is missing")
      continue
    digest = cached.sha256_file(path)
    if digest != entry["sha256"]:
      problems.append(f"{name} has sha256 {digest[:12]}..., the manifest {entry['sha256'][:12]}...")
      continue
    records = cached_images.count_records(path, manifest) if image else _records(path)
    if records is None:
      problems.append(f"{name} holds {paths.size(path)} bytes: no whole number of rows")
      continue
    total += records
    if records != entry["records"]:
      problems.append(f"{name} has {records} records, the manifest {entry['records']}")
  if not problems and total != manifest["rows"]:
    problems.append(f"the shards hold {total} rows, the manifest {manifest['rows']}")
  if problems:
    raise JaxdistillError(f"cache {output!r} failed verification: " + "; ".join(problems))
  return {"shards": len(manifest["shards"]), "rows": total}


def _records(path: str) -> int:
  with tempfile.TemporaryDirectory() as tmp:  # a remote shard is read from a local copy
    reader = array_record_module.ArrayRecordReader(paths.download(path, tmp))
    records = reader.num_records()
    reader.close()
  return records
