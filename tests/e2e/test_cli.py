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
  # One-block teacher and student (every loss family still on): compiling is most of the run.
  small = ["--config.teacher.num_layers=1", "--config.student.num_layers=1"]
  proc = _cli("train", "--config", "configs/smoke.py", "--workdir", str(workdir), *small)
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
  # The trained student generates (token-id prompts: the smoke run has no tokenizer).
  (tmp_path / "prompts.txt").write_text("1 2 3\n\n40 41 42 43 44\n")
  out = tmp_path / "out.jsonl"
  gen = ["generate", "--workdir", str(workdir), "--prompts", str(tmp_path / "prompts.txt")]
  proc = _cli(
    *gen,
    "--max_new_tokens",
    "5",
    "--num_samples",
    "2",
    "--temperature",
    "0.7",
    "--output",
    str(out),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  assert rows[2]["prompt_ids"] == [40, 41, 42, 43, 44]
  assert all(len(r["token_ids"]) == 5 and r["stop_reason"] == "length" for r in rows)


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


# --- issue 14: bad inputs a new user tries, in-process (one `error:` line, exit 2) -----------


def _main_error(capsys, argv, *words):
  """cli.main(argv) returns (or exits with) 2 and prints one `error: ...` line naming words."""
  from jaxdistill.cli import commands as cli

  try:
    rc = cli.main(argv)
  except SystemExit as e:  # argparse's usage errors
    rc = e.code
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2, err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for word in words:
    assert word in lines[0], err


TINY_CONFIG = """
from jaxdistill.config import default_config

def get_config():
  cfg = default_config()
  cfg.student.update(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8)
  cfg.teacher.source = "none"
  cfg.distill.logit.weight = 0.0
  cfg.data.update(batch_size=8, seq_len=8)
  cfg.optim.steps = 1
  cfg.log.progress = False
  return cfg
"""


def _tiny_config(tmp_path) -> str:
  """A CE-only run of one step of a tiny model: the cheapest run `train` accepts."""
  path = tmp_path / "tiny.py"
  path.write_text(TINY_CONFIG)
  return str(path)


def _snapshot(path):
  return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_help_is_for_users(capsys):
  import pytest

  from jaxdistill.cli import commands as cli

  with pytest.raises(SystemExit) as info:
    cli.main(["--help"])
  out = capsys.readouterr().out
  assert info.value.code == 0
  assert "Thin" not in out and "distillation" in out.lower()
  for command in ("train", "quickstart", "precompute", "embed", "export", "report"):
    assert f"jaxdistill {command}" in out, command
  # The developers' notes stay in the module docstring.
  assert "Thin" in cli.__doc__


def test_usage_errors_are_one_line(capsys):
  _main_error(capsys, ["train", "--config", "configs/smoke.py"], "--workdir")
  _main_error(capsys, [], "COMMAND")
  _main_error(capsys, ["quickstart", "--size", "huge"], "huge")


def test_train_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "taken"
  path.write_text("mine\n")
  argv = ["train", "--config", str(ROOT / "configs/smoke.py"), "--config.optim.steps=2"]
  _main_error(capsys, argv + ["--workdir", str(path)], str(path), "is a file")
  _main_error(capsys, argv + ["--workdir", str(path / "sub")], "is a file")
  assert path.read_text() == "mine\n"


def test_train_refuses_a_non_empty_directory_that_is_not_a_run(tmp_path, capsys):
  workdir = tmp_path / "mine"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"my": "own file"}\n')
  (workdir / "notes.txt").write_text("precious\n")
  before = _snapshot(workdir)
  argv = ["train", "--config", str(ROOT / "configs/smoke.py"), "--config.optim.steps=2"]
  _main_error(capsys, argv + ["--workdir", str(workdir)], str(workdir), "not empty")
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_train_resumes_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
  """A workdir holding only the config.json a run wrote (killed while compiling) is ours."""
  from jaxdistill import config as config_lib
  from jaxdistill.cli import commands as cli

  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(config_lib.default_config().to_json(indent=2))
  assert cli.main(["train", "--config", _tiny_config(tmp_path), "--workdir", str(workdir)]) == 0
  assert (workdir / "metrics.jsonl").is_file() and (workdir / "final_params").is_dir()


def test_precompute_output_that_is_a_file_or_not_ours(tmp_path, capsys):
  argv = ["precompute", "--config", str(ROOT / "configs/smoke.py")]
  path = tmp_path / "taken"
  path.write_text("mine\n")
  _main_error(capsys, argv + ["--output", str(path)], "is a file")
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
  before = _snapshot(folder)
  _main_error(capsys, argv + ["--output", str(folder)], str(folder), "holiday.jpg")
  assert _snapshot(folder) == before and path.read_text() == "mine\n"


def test_config_that_is_not_a_python_file(tmp_path, capsys):
  path = tmp_path / "config.txt"
  path.write_text("steps = 3\n")
  argv = ["train", "--config", str(path), "--workdir", str(tmp_path / "w")]
  _main_error(capsys, argv, "config.txt", "Python file")


@pytest.mark.slow
def test_params_directory_that_holds_no_params(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  argv = ["train", "--config", _tiny_config(tmp_path), "--workdir", str(tmp_path / "w")]
  _main_error(capsys, argv + [f"--config.student.init_from={empty}"], "no params", str(empty))


def test_quickstart_and_export_dirs_that_are_files(tmp_path, capsys):
  path = tmp_path / "taken"
  path.write_text("mine\n")
  _main_error(capsys, ["quickstart", "--size", "test", "--workdir", str(path)], "is a file")
  _main_error(capsys, ["quickstart", "--size", "test", "--cache_dir", str(path)], "--cache_dir")
  workdir = tmp_path / "run"  # never read: --output is checked first
  argv = ["export", "--workdir", str(workdir), "--output", str(path / "hf")]
  _main_error(capsys, argv, "--output", "is a file")
  assert path.read_text() == "mine\n"
