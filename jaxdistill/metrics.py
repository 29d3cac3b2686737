"""Metric writers.

Metrics are written once (by process 0) as one JSON object per logged step to
``WORKDIR/metrics.jsonl``. (Model FLOPs: ``models/flops.py``; MFU and goodput:
``throughput.py``.)
"""

import json
import math
import os
from typing import Any

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
