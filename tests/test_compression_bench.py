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
  out = tmp_path / "compression.json"
  proc = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks" / "compression_bench.py"), "--size", "test"]
    + ["--tasks", "text", "--no_control", "--output", str(out)]
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
  int8 = result["text"]["int8"]
  s = int8["summary"]
  assert s["metric"] == "val_loss" and isinstance(s["qat_beats_ptq"], bool)
  for key in ("parent_val_loss", "qat_int8_val_loss", "ptq_int8_val_loss", "qat_vs_parent"):
    assert math.isfinite(s[key]), (key, s)
  assert "float_cont" not in int8["quality"]  # --no_control
  size = int8["size"]
  for name in ("qat_int8", "ptq_int8"):
    assert size[name]["bytes"] < size["parent"]["bytes"], size
    assert size[name]["bytes_by_dtype"]["int8"] > 0  # really int8 weights, not fake-quantised
    for b in (1, 32):
      ratio = s[f"{name}_over_f32_latency_b{b}"]
      assert math.isfinite(ratio) and ratio > 0, s
  assert 0 < s["bytes_ratio_int8_over_f32"] < 1
  prune = result["text"]["prune"]
  assert prune["changed"]["d_ff"] == 32  # half the test teacher's 64
  assert prune["params"]["student"] < prune["params"]["teacher"]
  for key in ("from_pruned_val_loss", "from_random_val_loss", "pruned_step0_val_loss"):
    assert math.isfinite(prune["summary"][key]), prune["summary"]
  assert isinstance(prune["summary"]["pruned_beats_random"], bool)
  assert "| qat_int8 |" in proc.stdout and "| from_pruned |" in proc.stdout
