"""benchmarks/compression_bench.py (issue 16's targets) end to end at test size: its JSON holds
the int8 and pruning results, with finite ratios and int8 files smaller than the float model."""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_compression_bench_test_size_writes_its_results(tmp_path):
  """The int8 study on the digits (the cheapest task: the text one and the pruning study each
  train several more tiny runs and would take minutes; they share this code path and helpers)."""
  out = tmp_path / "compression.json"
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "compression_bench.py"), "--size", "test"]
    + ["--tasks", "vision", "--studies", "int8", "--no_control", "--output", str(out)]
    + ["--cache_dir", str(tmp_path / "cache"), "--workdir", str(tmp_path / "runs")],
    cwd=ROOT,
    # One CPU device, as the benchmark runs (not the tests' 8 fake ones): less to compile.
    env=dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=""),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result) >= {"size", "device", "wall_s", "vision"} and "prune" not in result["vision"]
  int8 = result["vision"]["int8"]
  s = int8["summary"]
  assert s["metric"] == "accuracy" and isinstance(s["qat_beats_ptq"], bool)
  for key in ("teacher_accuracy", "parent_accuracy", "qat_int8_accuracy", "ptq_int8_accuracy"):
    assert 0 <= s[key] <= 1, (key, s)
  assert math.isfinite(s["qat_vs_parent"]) and math.isfinite(s["ptq_vs_parent"])
  assert "float_cont" not in int8["quality"]  # --no_control
  size = int8["size"]
  for name in ("qat_int8", "ptq_int8"):
    # Really int8 weights (not fake-quantised floats): a CNN's bytes are nearly all kernels.
    assert size[name]["bytes_by_dtype"]["int8"] > 0
    assert size[name]["bytes"] < 0.3 * size["parent"]["bytes"], size
    for b in (1, 32):
      ratio = s[f"{name}_over_f32_latency_b{b}"]
      assert math.isfinite(ratio) and ratio > 0, s
  assert s["bytes_ratio_int8_over_f32"] == size["qat_int8"]["bytes"] / size["parent"]["bytes"]
  assert "| qat_int8 |" in proc.stdout and "| ptq_int8 |" in proc.stdout
