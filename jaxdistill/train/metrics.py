"""Metric writers.

Metrics are written once (by process 0) as one JSON object per logged step to
``WORKDIR/metrics.jsonl`` and, with ``log.tensorboard``, the same scalars to TensorBoard event
files in ``WORKDIR/tensorboard/`` (``TensorBoardWriter``: tensorboardX, imported only when one
is opened, so importing this module stays light; no TensorFlow). Model FLOPs are counted in
``models/flops.py``, MFU and goodput in ``throughput.py``.
"""

import io
import json
import math
import struct
import time
from typing import Any, Sequence

import jax
import numpy as np

from jaxdistill import paths


class JsonlWriter:
  """Appends one JSON object per call to ``path`` (process 0 only).

  A local file is appended to and flushed at every row. An object store cannot append: a
  remote ``path`` (``gs://``) is rewritten whole from the rows held in memory, at most every
  ``flush_secs`` and at ``flush`` (the loop calls it before each checkpoint, so a resumed
  run finds every row up to its step) and ``close``.
  """

  def __init__(self, path: str, flush_secs: float = 30.0):
    self.path, self.flush_secs = path, flush_secs
    self.enabled = jax.process_index() == 0
    self.remote = paths.is_remote(path)
    self._file, self._text, self._dirty, self._flushed = None, None, False, time.monotonic()
    if self.enabled and self.remote:
      self._text = io.StringIO()
      self._text.write(paths.read_text(path) if paths.exists(path) else "")
    elif self.enabled:
      self._file = open(path, "a", encoding="utf-8")

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(to_python(row), sort_keys=True) + "\n"
    if self._file:
      self._file.write(line)
      self._file.flush()
      return
    self._text.write(line)
    self._dirty = True
    if time.monotonic() - self._flushed >= self.flush_secs:
      self.flush()

  def flush(self) -> None:
    """Makes every row so far readable at ``path`` (a remote file is uploaded whole)."""
    if self._text is not None and self._dirty:
      paths.path(self.path).write_text(self._text.getvalue(), encoding="utf-8")
      self._dirty, self._flushed = False, time.monotonic()

  def close(self) -> None:
    self.flush()
    if self._file:
      self._file.close()


class TensorBoardWriter:
  """The scalars of metrics rows as TensorBoard event files in ``logdir`` (process 0 only).

  Each numeric value of a row becomes a scalar: tag = its metrics key, global step =
  ``row["step"]`` (stored as float32, TensorBoard's scalar type). Strings are skipped; a
  non-finite float is written as itself (TensorBoard shows it; metrics.jsonl keeps it as a
  string). Events reach the disk within ``flush_secs`` and at ``flush`` / ``close``.
  """

  def __init__(self, logdir: str, purge_step: int | None = None, flush_secs: int = 10):
    """Args:
    logdir: the event files' directory (created).
    purge_step: a resumed run's first step: TensorBoard drops events at or after it from the
      earlier event files, as ``workdir.truncate_metrics`` drops the rows after the resumed step.
    flush_secs: the writer thread's flush interval.
    """
    self.logdir = logdir
    self.enabled = jax.process_index() == 0
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # lazy: only runs that log to TensorBoard need it

      if paths.is_remote(logdir):
        _register_remote_events()
      self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=flush_secs)

  def write(self, row: dict[str, Any]) -> None:
    """Writes the numeric values of one metrics row at its ``step``."""
    if not self._writer:
      return
    step = int(row["step"])
    for key, value in row.items():
      value = _number(value)
      if key != "step" and value is not None:
        self._writer.add_scalar(key, value, step)

  def add_image(self, tag: str, png_path: str, step: int) -> None:
    """Adds the PNG file ``png_path`` as the image ``tag`` at ``step`` (its bytes unchanged)."""
    if not self._writer:
      return
    from tensorboardX.proto.summary_pb2 import Summary

    with open(png_path, "rb") as f:  # a local temporary file (matplotlib writes it)
      png = f.read()
    width, height, colorspace = png_size(png)
    image = Summary.Image(
      height=height, width=width, colorspace=colorspace, encoded_image_string=png
    )
    summary = Summary(value=[Summary.Value(tag=tag, image=image)])
    self._writer.file_writer.add_summary(summary, step)  # the PNG as is, no re-encoding

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()
      self._writer = None


class MultiWriter:
  """Writes each row to several writers (e.g. metrics.jsonl and TensorBoard); None is skipped."""

  def __init__(self, *writers):
    self.writers = [w for w in writers if w is not None]

  def write(self, row: dict[str, Any]) -> None:
    for writer in self.writers:
      writer.write(row)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


class _RemoteRecordFile:
  """tensorboardX's event file on an object store, through epath: the bytes are kept and
  uploaded whole at each flush (objects cannot be appended to; tensorboardX's own ``gs://``
  writer does the same through google-cloud-storage, which jaxdistill does not install)."""

  def __init__(self, path: str):
    self.path, self.buffer = path, io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    paths.path(self.path).write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _RemoteRecordFactory:
  def open(self, path: str) -> _RemoteRecordFile:
    return _RemoteRecordFile(path)

  def directory_check(self, path: str) -> None:
    pass  # an object store needs no directory before a file


def _register_remote_events() -> None:
  """Routes tensorboardX's event files at ``gs://`` (and the other URL schemes) through epath."""
  from tensorboardX import record_writer

  for scheme in paths.REMOTE_SCHEMES:
    record_writer.register_writer_factory(scheme.removesuffix("://"), _RemoteRecordFactory())


def _number(value: Any) -> float | None:
  """A scalar metric value as a float; None for a string or anything not a single number."""
  if isinstance(value, str):
    return None
  array = np.asarray(value)
  if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
    return None
  return float(array.reshape(()))


def png_size(png: bytes) -> tuple[int, int, int]:
  """(width, height, channels) of PNG bytes, from the IHDR chunk (1 gray, 2 gray + alpha,
  3 RGB, 4 RGBA; a palette image counts as RGB)."""
  if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
    raise ValueError("not a PNG file")
  width, height = struct.unpack(">II", png[16:24])
  channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[png[25]]
  return width, height, channels


def plot_loss_curve(rows: Sequence[dict[str, Any]], path: str, key: str = "train/loss") -> bool:
  """Saves ``key`` against step from metrics rows as a PNG at ``path`` (matplotlib, Agg).

  Also draws the "eval/loss" rows when there are some. Returns False (nothing written) when no
  row has a finite ``key``.
  """
  series = {}
  for name in (key, "eval/loss"):
    points = [(r["step"], _number(r[name])) for r in rows if name in r]
    points = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    if points:
      series[name] = points
  if key not in series:
    return False
  import matplotlib

  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
  for name, points in series.items():
    ax.plot(*zip(*points), label=name, marker="." if len(points) < 50 else None)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def to_python(row: dict[str, Any]) -> dict[str, Any]:
  """Scalars (numpy / jax) -> plain floats and ints; non-finite kept as strings."""
  out = {}
  for k, v in row.items():
    v = np.asarray(v).item() if not isinstance(v, (str, int)) else v
    out[k] = v if not isinstance(v, float) or math.isfinite(v) else str(v)
  return out


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file back (for tests and reports)."""
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
