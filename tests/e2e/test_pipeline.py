"""``jaxdistill pipeline`` (configs/progressive.py), ``prune`` and ``quantize`` commands:
declaration errors, and the test-size pipeline killed mid-stage and resumed exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from jaxdistill.cli import compress as cli_compress
from jaxdistill.compress import pipeline
from jaxdistill.compress import stages as pipeline_spec
from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError, JaxdistillError


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "jaxdistill.cli", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _stages(*extra):
  return [{"name": "a", "action": "train", "config": default_config()}, *extra]


@pytest.mark.parametrize(
  "stages, words",
  [
    (_stages({"name": "a", "action": "train", "config": default_config()}), ["stages[a].name"]),
    (_stages({"name": "b", "action": "squash"}), ["stages[b].action", "squash"]),
    (_stages({"name": "b", "action": "prune", "targets": {}, "from": "z"}), ["'z'", "a"]),
    (_stages({"name": "b", "action": "prune"}), ["stages[b].targets"]),
    (_stages({"name": "b", "action": "distil", "config": {}}), ["stages[b].config"]),
    (_stages({"name": "b", "action": "quantise", "bits": 4}), ["bits"]),
    (_stages({"name": "b c", "action": "export"}), ["name"]),
    ([{"name": "x", "action": "export"}], ["stages[x].from", "previous"]),
  ],
)
def test_bad_declarations_are_one_line_errors(stages, words):
  with pytest.raises(ConfigError) as e:
    pipeline_spec.check({"teacher": "", "stages": stages})
  message = str(e.value)
  assert "\n" not in message
  for word in words:
    assert word in message


def test_references_resolve_and_overrides_reach_every_run():
  spec = pipeline_spec.check(
    {
      "teacher": "a",
      "stages": _stages(
        {"name": "p", "action": "prune", "targets": {"d_ff": 0.5}},
        {"name": "d", "action": "distil", "config": default_config(), "init": "previous"},
        {"name": "ta", "action": "distil", "config": default_config(), "teacher": "previous"},
      ),
    },
    [("optim.steps", "7")],
  )
  by = {s["name"]: s for s in spec["stages"]}
  assert by["p"]["from"] == "a" and by["d"]["init"] == "p" and by["d"]["teacher"] == "a"
  assert by["ta"]["teacher"] == "d"  # a teacher assistant: the previous stage's student
  assert by["d"]["dir"] == "02-d" and by["d"]["config"].optim.steps == 7
  assert by["a"]["config"].optim.steps == 7
  with pytest.raises(ConfigError, match="optim.nope"):
    pipeline_spec.check({"stages": _stages()}, [("optim.nope", "1")])


def test_target_parsing():
  assert cli_compress.parse_targets("d_ff=0.5, num_heads=3") == {"d_ff": 0.5, "num_heads": 3}
  for bad in ("", "d_ff", "d_ff=half", "=3"):
    with pytest.raises(JaxdistillError, match="--targets"):
      cli_compress.parse_targets(bad)


def test_a_used_workdir_or_a_changed_pipeline_is_refused(tmp_path):
  (tmp_path / "mine.txt").write_text("a user's file")
  spec = pipeline.load("configs/progressive.py:test")
  with pytest.raises(JaxdistillError, match="not empty"):
    pipeline._read_state(str(tmp_path), spec)
  state = pipeline._read_state(str(tmp_path / "new"), spec)
  state["stages"] = state["stages"][:-1]
  os.makedirs(tmp_path / "new")
  pipeline._write_state(str(tmp_path / "new"), state)
  with pytest.raises(JaxdistillError, match="other stages"):
    pipeline._read_state(str(tmp_path / "new"), spec)
  assert (tmp_path / "mine.txt").read_text() == "a user's file"


def _stage(name, arch, nbytes, ms, loss, per_batch=None):
  """A done, evaluated and timed stage of pipeline.json (hand-made)."""
  metrics = {"val_loss": loss}
  if per_batch:
    metrics.update(batch_val_loss=per_batch, batch_weights=[512.0] * len(per_batch))
  return {"name": name, "action": "train", "status": "done", "seconds": 1.0, "arch": arch,
          "metrics": metrics, "size": {"params": nbytes // 4, "bytes": nbytes},
          "latency_ms": {"batch_1": ms}, "latency_spread_ms": {"batch_1": 0.05}}  # fmt: skip


def test_stage_pareto_shares_one_latency_per_architecture_and_reads_the_noise():
  # a and b: one architecture timed at 2.48 and 3.08 ms, the same loss; c: smaller and
  # faster, worse; d: as big and good as the pair but slower beyond the noise; e: as the
  # pair, slower and worse only within the noise (loss SE 0.018 over 4 batches).
  state = {"stages": [
    _stage("a", "x", 1000, 2.48, 3.0),
    _stage("b", "x", 1000, 3.08, 3.0),
    _stage("c", "y", 250, 1.0, 3.5),
    _stage("d", "z", 1000, 6.0, 3.0),
    _stage("e", "w", 1000, 2.9, 3.02, per_batch=[2.98, 3.06, 3.0, 3.04]),
    {"name": "out", "action": "export", "status": "done", "from": "e", "seconds": 1.0},
  ]}  # fmt: skip
  shared = pipeline.shared_latency(state)
  # The pair's latency: the median of their timings; its spread: half their range.
  assert shared["a"]["batch_1"] == shared["b"]["batch_1"] == pytest.approx((2.78, 0.3))
  flags = pipeline.pareto_flags(state)
  assert {n: f["batch_1"] for n, f in flags.items()} == dict(a=True, b=True, c=True, d=False,
                                                              e=True)  # fmt: skip
  assert {n: f["bytes"] for n, f in flags.items()} == dict(a=True, b=True, c=True, d=True, e=True)
  table = pipeline._stage_table(state)
  rows = {
    line.split(" | ")[0].strip("| "): line for line in table.splitlines() if "| train |" in line
  }
  assert "| 2.78 |" in rows["a"] and "| 2.78 |" in rows["b"] and "| 6 |" in rows["d"]
  assert "beyond the noise" in table


@pytest.mark.slow
def test_cli_errors(tmp_path):
  cases = [
    (("pipeline", "--config", "configs/nope.py", "--workdir", str(tmp_path / "p")), "nope.py"),
    (
      ("pipeline", "--config", "configs/smoke.py", "--workdir", str(tmp_path / "p")),
      "get_pipeline",
    ),
    (
      ("prune", "--workdir", str(tmp_path), "--output", str(tmp_path / "o"), "--targets", "x"),
      "--targets",
    ),
    (
      ("quantize", "--workdir", str(tmp_path / "none"), "--output", str(tmp_path / "q")),
      "not a jaxdistill run",
    ),
  ]
  for args, word in cases:
    proc = _cli(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert word in lines[0], lines[0]
  assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def _losses(workdir):
  rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix.*")  # ~950 a run, in this process
def test_killed_pipeline_resumes_exactly_and_skips_finished_stages(tmp_path, capsys):
  """SIGKILL during the `recover` distil stage (after its first checkpoint); the rerun skips
  teacher / blocks / prune, resumes recover bitwise, finishes, reports every stage. The rerun
  is `jaxdistill pipeline` in this process (only the killed run needs one of its own)."""
  from jaxdistill.cli import commands as cli
  from jaxdistill.train import loop

  w = tmp_path / "p"
  args = ["pipeline", "--config", "configs/progressive.py:test", "--workdir", str(w)]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "jaxdistill.cli", *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  started = time.time()
  while not (w / "03-recover" / "checkpoints" / "2").is_dir():
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() - started < 600
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (w / "03-recover" / "final_params").exists(), "killed too late to test a resume"
  state = json.loads((w / "pipeline.json").read_text())
  assert [s["status"] for s in state["stages"]][:4] == ["done", "done", "done", "pending"]
  before = {
    p: os.stat(w / p).st_mtime_ns for p in ("00-teacher/final_params", "02-prune/prune.json")
  }

  capsys.readouterr()
  rc = cli.main(args)
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  for name in ("teacher", "blocks", "prune"):
    assert f"stage {name}: done before, skipped" in out
  assert {p: os.stat(w / p).st_mtime_ns for p in before} == before
  state = json.loads((w / "pipeline.json").read_text())
  assert state["complete"] and all(s["status"] == "done" for s in state["stages"])
  assert "final student qat" in out
  for s in state["stages"][:-1]:  # all but the export: evaluated and timed
    assert s["metrics"]["val_loss"] > 0 and s["size"]["params"] > 0
    assert set(s["latency_ms"]) == {"batch_1", "batch_32"}
  by = {s["name"]: s for s in state["stages"]}
  assert by["prune"]["size"]["params"] < by["blocks"]["size"]["params"]
  assert by["qat"]["size"]["bytes"] < by["recover"]["size"]["bytes"]  # int8 weights
  assert (w / "06-export" / "model.safetensors").is_file()
  report = (w / "report.md").read_text()
  assert all(f"| {n} |" in report for n in ("teacher", "blocks", "recover", "qat", "ptq"))

  # The resumed stage equals the same stage run uninterrupted, step for step, bitwise.
  spec = pipeline.load("configs/progressive.py:test")
  stage = next(s for s in spec["stages"] if s["name"] == "recover")
  ref = tmp_path / "recover-uninterrupted"
  # On the 8 fake devices of the session, which the pipeline's process inherited too.
  loop.train(pipeline._stage_config(stage, str(w), spec), str(ref))
  resumed = _losses(w / "03-recover")
  steps = stage["config"].optim.steps  # log.every=1: a row per step
  assert [r["step"] for r in resumed if "train/loss" in r] == list(range(1, steps + 1))
  assert resumed == _losses(ref)
