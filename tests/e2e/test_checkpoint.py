"""Checkpoints: exact resume after SIGKILL, SIGTERM, damaged checkpoints, config mismatch,
cross-mesh restore and the non-finite policy."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import ROOT

# Slower steps than the plain smoke run so a test can kill the process mid-run; one-block
# models, as compiling them is most of what each run costs (after checkpoint 10, 20 steps and
# 4 saves, about 2 s on 2 busy cores, are left for a kill to land in).
SMOKE = [
  "--config",
  "configs/smoke.py",
  "--config.data.batch_size=16",
  "--config.data.seq_len=64",
  "--config.log.progress=false",
  "--config.teacher.num_layers=1",
  "--config.student.num_layers=1",
]


def _cmd(workdir, *extra):
  return [
    sys.executable,
    "-m",
    "jaxdistill.cli",
    "train",
    *SMOKE,
    "--workdir",
    str(workdir),
    *extra,
  ]


def _env():
  return dict(os.environ, PYTHONPATH=str(ROOT))


def _run(workdir, *extra):
  return subprocess.run(
    _cmd(workdir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
  )


def _train_here(workdir, *extra):
  """The same ``jaxdistill train`` as ``_run`` (``cli.main``) in this process, which has the
  same 8 devices: for the runs that are not killed nor read for their warnings (a warning in
  this process goes to pytest, not stderr), whose process start is not what is tested.
  Returns the exit code."""
  from jaxdistill.cli import commands as cli

  args = [str(ROOT / a) if a == "configs/smoke.py" else a for a in _cmd(workdir, *extra)[3:]]
  return cli.main(args)


def _rows(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _losses(workdir):
  return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in _rows(workdir)]


def _final_params(workdir):
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    return jax.device_get(ckptr.restore(str(workdir / "final_params")))


def _np(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(jax.device_get(x))


def _wait_until(predicate, proc, timeout=240):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, "the run ended before the test could interrupt it"
    assert time.time() - start < timeout
    time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 30-step run every resumed run must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("reference")
  assert _train_here(workdir) == 0
  return workdir


def _assert_same_run(workdir, reference):
  assert _losses(workdir) == _losses(reference)  # steps 1..30, every loss, bitwise
  for a, b in zip(
    jax.tree.leaves(_final_params(workdir)), jax.tree.leaves(_final_params(reference))
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, reference, capsys):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    _cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  _wait_until(lambda: (workdir / "checkpoints" / "10").is_dir(), proc)
  proc.kill()
  proc.wait()
  assert not (workdir / "final_params").exists()
  capsys.readouterr()
  rc = _train_here(workdir)
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  assert "resumed from step" in out + err
  assert [r["step"] for r in _rows(workdir)] == list(range(1, 31))
  _assert_same_run(workdir, reference)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes(tmp_path, reference, capsys):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    _cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  _wait_until(lambda: len(_rows(workdir)) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "preempted" in out
  saved = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert saved and saved[-1] < 30 and f"checkpoint at step {saved[-1]} " in out
  capsys.readouterr()
  rc = _train_here(workdir)
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  assert f"resumed from step {saved[-1]}" in out
  _assert_same_run(workdir, reference)


def _copy(reference, tmp_path):
  """A private copy of the finished reference run (steps 1..30; checkpoints 20, 25, 30)."""
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  return workdir


@pytest.mark.slow
def test_damaged_checkpoints(tmp_path, reference, capsys):
  workdir = _copy(reference, tmp_path)
  ckpts = workdir / "checkpoints"
  assert {"25", "30"} <= set(os.listdir(ckpts))
  # A kill during a save leaves only Orbax's temporary directory: it is skipped.
  (ckpts / "31.orbax-checkpoint-tmp-1").mkdir()
  (ckpts / "31.orbax-checkpoint-tmp-1" / "junk").write_text("half a checkpoint")
  # Truncate the latest complete checkpoint's largest array file.
  files = [p for p in (ckpts / "30" / "state").rglob("*") if p.is_file()]
  victim = max(files, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
  capsys.readouterr()
  with pytest.warns(UserWarning) as warned:  # in this process, warnings come here
    rc = _train_here(workdir, "--config.optim.steps=35")
  assert any("skipping partial checkpoint" in str(w.message) for w in warned)
  err = capsys.readouterr().err
  assert rc == 2, err[-3000:]
  errors = [x for x in err.splitlines() if x.startswith("error: ")]
  assert len(errors) == 1, err[-3000:]
  error = errors[0]
  assert error.startswith("error: checkpoint step 30") and str(ckpts / "30") in error
  assert "--resume_from" in error
  proc = _run(workdir, "--config.optim.steps=35", "--resume_from", "25")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from step 25" in proc.stdout
  assert "skipping partial checkpoint" in proc.stderr
  assert [r["step"] for r in _rows(workdir)] == list(range(1, 36))


@pytest.mark.slow
def test_config_that_changes_the_model_is_refused(tmp_path, reference, capsys):
  workdir = _copy(reference, tmp_path)
  before = (workdir / "metrics.jsonl").read_text()
  capsys.readouterr()
  assert _train_here(workdir, "--config.optim.steps=35", "--config.student.d_ff=64") == 2
  err = capsys.readouterr().err
  assert "student.d_ff" in [x for x in err.splitlines() if x.startswith("error: ")][0]
  assert (workdir / "metrics.jsonl").read_text() == before
  proc = _run(workdir, "--config.optim.steps=35", "--config.log.every=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "log.every" in proc.stderr  # harmless: a warning


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tiny_config):
  import tempfile

  from jaxdistill.train import checkpoint, loop

  cfg = tiny_config
  cfg.student.num_layers = cfg.teacher.num_layers = 1  # the state's shape, not its depth, counts
  cfg.mesh.update(data=2, fsdp=4, tensor=1)
  run = loop.build_run(cfg, devices=jax.devices()[:8])
  loop.run_steps(run, 2, lambda *a: None)
  saved = run.state
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir, cfg.ckpt)
    checkpoint.save(manager, 2, run.state, run.data_iter, {"config": cfg.to_dict()}, force=True)
    manager.wait_until_finished()
    # The random teacher is given, not initialised again (and compiled) for each mesh.
    teacher = jax.device_get(run.teacher_vars)
    for devices, mesh in ((1, dict(data=1, fsdp=1, tensor=1)), (8, dict(data=4, fsdp=2, tensor=1))):
      cfg.mesh.update(**mesh)
      target = loop.build_run(
        cfg, devices=jax.devices()[:devices], create_state=False, teacher_vars=teacher
      )
      state, _ = checkpoint.restore(manager, 2, target.state, target.data_iter)
      assert target.data_iter.get_state() == run.data_iter.get_state()
      embed = state.params["student"]["token_embed"]["embedding"]
      assert (
        embed.sharding.mesh.shape
        == target.state.params["student"]["token_embed"]["embedding"].sharding.mesh.shape
      )
      for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(_np(a), _np(b))
    manager.close()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_updates_are_never_applied(tiny_config, tmp_path, monkeypatch, policy):
  from jaxdistill.errors import JaxdistillError
  from jaxdistill.train import loop

  cfg = tiny_config
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.optim.nan_policy = policy
  cfg.ckpt.every = 1
  build = loop.build_run

  def poisoned(*args, **kwargs):  # a teacher whose params went NaN
    run = build(*args, **kwargs)
    run.teacher_vars = jax.tree.map(lambda x: x * np.nan, run.teacher_vars)
    return run

  monkeypatch.setattr(loop, "build_run", poisoned)
  workdir = tmp_path / "run"
  if policy == "stop":
    with pytest.raises(JaxdistillError, match="non-finite loss or gradient at step 1"):
      loop.train(cfg, str(workdir), devices=jax.devices()[:1])
    assert not [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
  else:
    fresh = jax.device_get(build(cfg, devices=jax.devices()[:1]).state.params)
    loop.train(cfg, str(workdir), devices=jax.devices()[:1])
    rows = _rows(workdir)
    assert [r["train/nonfinite"] for r in rows] == [1.0, 1.0, 1.0]
    restored = _final_params(workdir)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh["student"])):
      np.testing.assert_array_equal(a, b)
