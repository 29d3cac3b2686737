"""Metric writers.

Metrics are written once (by process 0) as one JSON object per logged step to
``WORKDIR/metrics.jsonl`` and, with ``log.tensorboard``, the same scalars to TensorBoard event
files in ``WORKDIR/tensorboard/`` (``TensorBoardWriter``: tensorboardX, imported only when one
is opened, so importing this module stays light; no TensorFlow). Model FLOPs are counted in
``models/flops.py``, MFU and goodput in ``throughput.py``.
"""

import json
import math
import os
import struct
from typing import Any, Sequence

import jax
import numpy as np


class JsonlWriter:
  """Appends one JSON object per call to ``path`` (process 0 only)."""

  def __init__(self, path: str):
    self.path = path
    self.enabled = jax.process_index() == 0
    self._file = open(path, "a", encoding="utf-8") if self.enabled else None

  def write(self, row: dict[str, Any]) -> None:
    if self.enabled:
      self._file.write(json.dumps(to_python(row), sort_keys=True) + "\n")
      self._file.flush()

  def close(self) -> None:
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

    with open(png_path, "rb") as f:
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

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


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
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
