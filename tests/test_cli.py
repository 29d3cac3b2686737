"""The `jaxdistill` command end to end, and its handling of bad input."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _cli(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run(
    [sys.executable, "-m", "jaxdistill.cli", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_smoke_trains_and_loss_falls(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli("train", "--config", "configs/smoke.py", "--workdir", str(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 31))
  for key in (
    "train/loss",
    "task/ce",
    "distill/kl",
    "distill/attention",
    "distill/hidden",
    "perf/tokens_per_s",
  ):
    assert all(key in r for r in rows), key
  first = sum(r["train/loss"] for r in rows[:5]) / 5
  last = sum(r["train/loss"] for r in rows[-5:]) / 5
  assert last < first - 0.1, (first, last)
  assert (workdir / "final_params").is_dir() and (workdir / "config.json").is_file()


def _assert_usage_error(proc, *words):
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for word in words:
    assert word in lines[0]


@pytest.mark.slow
def test_bad_override_is_one_line_error_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(
    "train",
    "--config",
    "configs/smoke.py",
    "--workdir",
    str(workdir),
    "--config.distill.temprature=2",
  )
  _assert_usage_error(proc, "distill.temprature")
  assert not workdir.exists()


@pytest.mark.slow
def test_missing_config_file(tmp_path):
  proc = _cli("train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path / "w"))
  _assert_usage_error(proc, "nope.py")


@pytest.mark.slow
def test_existing_run_is_not_overwritten(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("precious\n")
  proc = _cli(
    "train", "--config", "configs/smoke.py", "--workdir", str(workdir), "--config.optim.steps=2"
  )
  _assert_usage_error(proc, str(workdir))
  assert (workdir / "metrics.jsonl").read_text() == "precious\n"


@pytest.mark.slow
def test_mesh_that_does_not_fit_the_devices(tmp_path):
  proc = _cli(
    "train",
    "--config",
    "configs/smoke.py",
    "--workdir",
    str(tmp_path / "w"),
    "--config.mesh.data=3",
  )
  _assert_usage_error(proc, "mesh")
  assert not (tmp_path / "w").exists()
