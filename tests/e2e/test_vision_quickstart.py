"""The vision quickstart end to end at test size (the classic CNN pair on the built-in digits),
its teacher cache, and the vision configs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from testing import host_variables

from jaxdistill import config as config_lib
from jaxdistill.config import validate

MODELS = ("teacher", "kd_student", "ce_student", "ce_student_equal_time")
KEYS = ("accuracy", "top5_accuracy", "agreement", "kl_to_teacher", "ece", "images_per_s")


def _quickstart(workdir, cache):
  """The CLI on one CPU device, as a user's machine runs it: the session's 8 fake devices would
  only multiply the programs compiled (sharded steps and evaluation are tests/integration's)."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
  return subprocess.run(
    [sys.executable, "-m", "jaxdistill.cli", "quickstart", "--task", "vision", "--size", "test"]
    + ["--workdir", str(workdir), "--cache_dir", str(cache)],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS=" ".join(flags)),
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.slow
def test_vision_quickstart_reports_and_caches_its_teacher(tmp_path):
  proc = _quickstart(tmp_path / "run", tmp_path / "cache")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  for name in MODELS:
    for key in KEYS:
      assert isinstance(report[name][key], (int, float)), (name, key)
    assert 0 <= report[name]["accuracy"] <= report[name]["top5_accuracy"] <= 1
    assert report[name]["images"] == 1000  # the whole test split of the built-in digits
  assert report["teacher"]["params"] > report["kd_student"]["params"]
  assert report["summary"]["task"] == "vision" and report["summary"]["teacher_cached"] is False
  md = (tmp_path / "run" / "report.md").read_text()
  assert "| kd_student |" in md and "validation.png" in md
  # Every evaluation reads the whole test split: named so, never "the first 0 batches".
  assert "first 0" not in md and "the whole validation split (1,000 images)" in md
  # Each comparison is won, tied or lost against its measured noise, with the numbers.
  same_time = report["summary"]["kd_vs_ce_same_time"]
  assert same_time["outcome"] in ("won", "tie", "lost") and same_time["se"] is not None
  assert "standard errors, paired over" in md
  png = (tmp_path / "run" / "validation.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  # The plotted curve is the table's measurement: the last periodic evaluation of the KD
  # student (whole test split) equals its row.
  rows = [json.loads(x) for x in (tmp_path / "run" / "kd_student" / "metrics.jsonl").open()]
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [2, 4]
  assert evals[-1]["eval/accuracy"] == pytest.approx(report["kd_student"]["accuracy"], abs=1e-6)
  again = _quickstart(tmp_path / "run2", tmp_path / "cache")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Using the cached teacher" in again.stdout
  assert json.loads((tmp_path / "run2" / "report.json").read_text())["summary"]["teacher_cached"]


@pytest.mark.parametrize(
  "arg",
  [
    "configs/cnn_digits.py:teacher",
    "configs/cnn_digits.py:distill",
    "configs/cnn_digits.py:baseline,test",
    "configs/cnn_cifar10.py:teacher",
    "configs/cnn_cifar10.py:baseline",
    "configs/resnet_cifar10.py:teacher",
    "configs/resnet_cifar10.py:baseline",
    "configs/smoke_vision.py",
  ],
)
def test_vision_configs_validate(arg):
  validate.validate(config_lib.load_config(os.path.join(ROOT, arg)))


@pytest.mark.parametrize(
  "path", ["configs/cnn_cifar10.py:distill", "configs/resnet_cifar10.py:distill"]
)
def test_cifar_distill_configs_validate_given_a_teacher(path, tmp_path):
  cfg = config_lib.load_config(os.path.join(ROOT, path), [("teacher.path", str(tmp_path))])
  validate.validate(cfg)
  assert cfg.distill.logit.weight > 0


@pytest.mark.slow
@pytest.mark.parametrize(
  "arg",
  ["configs/cnn_cifar10.py:distill", "configs/resnet_cifar10.py:distill"],
)
def test_cifar_configs_train_on_mocked_tfds_cifar10(arg, tmp_path):
  """The CIFAR recipes run as written (teacher.source=workdir) against TFDS's cifar10 (mocked
  offline: random images of the real features), with a stand-in teacher run of the recipe's
  shape: its final_params filled on the host (a random init of ResNet-56 is the slowest compile
  here); on one device (the 8 of the test session would only add sharded compiles)."""
  import jax
  import tensorflow_datasets as tfds

  from jaxdistill.train import loop
  from jaxdistill.train import run as run_lib
  from jaxdistill.train import workdir as workdir_lib

  teacher_dir = str(tmp_path / "teacher")
  overrides = [
    ("teacher.path", teacher_dir),
    ("optim.steps", "2"),
    ("data.batch_size", "8"),
    ("eval.every", "2"),
    ("eval.batches", "1"),
    ("ckpt.every", "0"),
    ("log.progress", "false"),
    ("cache_dir", str(tmp_path / "cache")),
  ]
  cfg = config_lib.load_config(os.path.join(ROOT, arg), overrides)
  assert cfg.teacher.source == "workdir"
  teacher = host_variables(run_lib.model_of(cfg, "teacher"))
  workdir_lib.save_final_params(teacher_dir, teacher.pop("params"), teacher)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    summary = loop.train(cfg, str(tmp_path / "run"), devices=jax.devices()[:1])
  assert summary["last_step"] == 2 and summary["final_loss"] > 0
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
  assert any("eval/accuracy" in r for r in rows)
