"""Several processes compute exactly what one does; how jax.distributed gets started.

The end-to-end test launches 2 processes x 4 fake CPU devices with
launch/local.py and compares them with 1 process x 8 devices run in this test
process (conftest gives it 8). If it fails on losses, look first at data
sharding (each process must feed its own rows of the same global batch) and at
anything a process computes from ``jax.local_devices()`` instead of the mesh.

This file is also the 2-process job itself (``python tests/e2e/test_distributed.py
WORKDIR REFERENCE OUT``): it must therefore not import conftest, which would
give every worker 8 devices.
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 10
MID = 5  # a full-state checkpoint (configs/smoke.py saves every 5 steps, keeps 3)
# configs/smoke.py with one-block models: every loss family still on, half the compile time
# (compiling is most of what these runs cost; nothing here depends on depth).
SMALL = [("teacher.num_layers", "1"), ("student.num_layers", "1")]


def _load_launcher():
  spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _smoke_config():
  from jaxdistill import config

  cfg = config.load_config(
    str(ROOT / "configs" / "smoke.py"), [("optim.steps", str(STEPS))] + SMALL
  )
  cfg.log.progress = False
  return cfg


def _student_target(cfg, mesh):
  """ShapeDtypeStructs (with shardings on ``mesh``) of the student's params."""
  from jaxdistill import models
  from jaxdistill.parallel import precision

  policy = precision.parse_policy(cfg.student.policy, "student.policy")
  student = models.build(cfg.student, policy, "student")
  return models.abstract_variables(student, mesh, cfg.data.seq_len)["params"]


def _flat_numpy(tree) -> dict[str, np.ndarray]:
  import jax

  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _train_cli(workdir: str, *extra: str) -> int:
  from jaxdistill.cli import commands as cli

  return cli.main(
    ["train", "--config", str(ROOT / "configs" / "smoke.py"), "--workdir", workdir]
    + [f"--config.optim.steps={STEPS}", "--config.log.progress=false", *extra]
    + [f"--config.{k}={v}" for k, v in SMALL]
  )


def _two_process_job(workdir: str, reference: str, out: str, resume_dir: str) -> int:
  """Runs in each of the 2 processes: train like ``jaxdistill train``; resume the
  1-process run's mid-run checkpoint (full state: params, optimizer, rng, data
  iterator) into ``resume_dir``; load its final params into this 2-process mesh
  and write them gathered."""
  rc = _train_cli(workdir) or _train_cli(
    resume_dir, f"--resume_from={os.path.join(os.path.dirname(reference), 'checkpoints', str(MID))}"
  )
  if rc:
    return rc
  import jax
  from jax.experimental import multihost_utils

  from jaxdistill.parallel import sharding
  from jaxdistill.train import checkpoint

  cfg = _smoke_config()
  params = checkpoint.load_params(reference, _student_target(cfg, sharding.make_mesh(cfg.mesh)))
  gathered = _flat_numpy(multihost_utils.process_allgather(params, tiled=True))
  if jax.process_index() == 0:
    np.savez(out, **gathered)
  return 0


# --- the settings: flags > environment > cluster > single process (pure) ------


def _args(**kw):
  fields = ("coordinator_address", "num_processes", "process_id", "cluster")
  return types.SimpleNamespace(
    **{f: kw.get(f) for f in fields},
    **{k: kw.get(k) for k in ("init_timeout", "heartbeat_timeout", "shutdown_timeout")},
  )


def test_flags_beat_environment_and_nothing_means_one_process():
  from jaxdistill.parallel import distributed

  assert distributed.resolve(_args(), {}).source == "none"
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  plan = distributed.resolve(_args(), env)
  assert (plan.source, plan.coordinator_address, plan.num_processes, plan.process_id) == (
    "explicit",
    "h:1",
    4,
    3,
  )
  plan = distributed.resolve(
    _args(coordinator_address="x:2", process_id=1, heartbeat_timeout=7), env
  )
  assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("x:2", 4, 1)
  assert plan.heartbeat_timeout == 7 and plan.init_timeout == 300
  plan = distributed.resolve(_args(), {**env, "JAXDISTILL_HEARTBEAT_TIMEOUT": "9"})
  assert plan.heartbeat_timeout == 9


def test_clusters_are_detected_from_their_environment():
  from jaxdistill.errors import JaxdistillError
  from jaxdistill.parallel import distributed

  slurm = {
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "5",
  }
  assert distributed.resolve(_args(), slurm).source == "slurm"
  # The batch script's own shell (no srun step) and one-task steps are single processes.
  assert distributed.resolve(_args(), {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}).source == "none"
  assert distributed.resolve(_args(), {**slurm, "SLURM_NTASKS": "1"}).source == "none"
  mpi = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"}
  assert distributed.resolve(_args(), {**mpi, "OMPI_MCA_orte_hnp_uri": "1.2.3.4"}).source == "ompi"
  if importlib.util.find_spec("mpi4py"):
    assert distributed.resolve(_args(), mpi).source == "mpi4py"
  else:
    with pytest.raises(JaxdistillError, match="pip install mpi4py"):
      distributed.resolve(_args(), mpi)
  assert distributed.resolve(_args(cluster="none"), slurm).source == "none"
  # Complete explicit settings win over a detected cluster.
  explicit = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
  assert distributed.resolve(_args(), {**slurm, **explicit}).source == "explicit"


@pytest.mark.parametrize(
  "env, words",
  [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, ["--coordinator_address"]),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, ["--process_id"]),
    (
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
      ["[0, 2)"],
    ),
    ({"JAX_NUM_PROCESSES": "two"}, ["JAX_NUM_PROCESSES", "'two'"]),
    ({"JAXDISTILL_INIT_TIMEOUT": "0"}, ["--init_timeout", "JAXDISTILL_INIT_TIMEOUT"]),
  ],
)
def test_incomplete_or_bad_settings_name_what_to_set(env, words):
  from jaxdistill.errors import JaxdistillError
  from jaxdistill.parallel import distributed

  with pytest.raises(JaxdistillError) as e:
    distributed.resolve(_args(), env)
  for word in words:
    assert word in str(e.value)


@pytest.mark.slow
def test_cli_rejects_bad_multiprocess_flags_in_one_line(tmp_path):
  proc = subprocess.run(
    [sys.executable, "-m", "jaxdistill.cli", "train", "--config", "configs/smoke.py"]
    + ["--workdir", str(tmp_path / "w"), "--num_processes", "2", "--process_id", "5"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith("error: --process_id"), proc.stderr
  assert not (tmp_path / "w").exists()


# --- data: each process its own rows, resuming exactly --------------------------


def test_data_shards_are_disjoint_cover_the_batch_and_resume():
  from jaxdistill import data

  cfg = _smoke_config()
  whole = data.make_iterator(cfg, "train", process_index=0, process_count=1)
  parts = [data.make_iterator(cfg, "train", process_index=i, process_count=2) for i in (0, 1)]
  for _ in range(3):
    batch = next(whole)
    halves = [next(p) for p in parts]
    for key, value in batch.items():
      # Process 0 gets the first half of the rows, process 1 the second: disjoint and covering.
      assert halves[0][key].shape[0] == halves[1][key].shape[0] == value.shape[0] // 2
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
  states = [p.get_state() for p in parts]
  expected = [[next(p) for _ in range(2)] for p in parts]
  for i, state in enumerate(states):
    fresh = data.make_iterator(cfg, "train", process_index=i, process_count=2)
    fresh.set_state(state)
    for want in expected[i]:
      got = next(fresh)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


# --- the end-to-end comparison ---------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(tmp_path):
  import jax

  from jaxdistill.parallel import sharding
  from jaxdistill.train import checkpoint, loop, metrics

  assert jax.process_count() == 1 and jax.device_count() == 8
  cfg = _smoke_config()
  one, two = tmp_path / "one", tmp_path / "two"
  loop.train(cfg, str(one))  # 1 process x 8 devices, here

  launcher = _load_launcher()
  log = tmp_path / "launch.log"
  with open(log, "w") as out:
    rc = launcher.run(
      [sys.executable, __file__, str(two), str(one / "final_params"), str(tmp_path / "one.npz")]
      + [str(tmp_path / "two_from_one")],
      processes=2,
      devices_per_process=4,
      heartbeat_timeout=15,  # a dead process aborts the other soon, never a hang
      init_timeout=60,
      timeout_s=400,
      out=out,
    )
  text = log.read_text()
  assert rc == 0, text[-4000:]
  assert f"[p0] done: {STEPS} steps" in text and "[p1] done" not in text, text[-2000:]
  assert "2 process(es), 8 devices (4 local, cpu)" in text

  # Same per-step losses: metrics written once (by process 0), one row per step.
  rows_1 = metrics.read_jsonl(str(one / "metrics.jsonl"))
  rows_2 = metrics.read_jsonl(str(two / "metrics.jsonl"))
  assert [r["step"] for r in rows_2] == [r["step"] for r in rows_1] == list(range(1, STEPS + 1))
  losses_1 = np.array([r["train/loss"] for r in rows_1])
  losses_2 = np.array([r["train/loss"] for r in rows_2])
  np.testing.assert_allclose(losses_2, losses_1, rtol=0, atol=1e-6)
  assert json.loads((two / "summary.json").read_text())["steps"] == STEPS

  # Full-state checkpoints move between process counts: the 1-process run's step-MID
  # checkpoint resumed by 2 processes, and the 2-process run's resumed here by 1, continue
  # with the uninterrupted run's losses (params, optimizer, rng and data iterator restored).
  one_from_two = tmp_path / "one_from_two"
  loop.train(cfg, str(one_from_two), resume_from=str(two / "checkpoints" / str(MID)))
  for resumed in (tmp_path / "two_from_one", one_from_two):
    rows = metrics.read_jsonl(str(resumed / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(MID + 1, STEPS + 1)), resumed
    np.testing.assert_allclose(
      [r["train/loss"] for r in rows], losses_1[MID:], rtol=0, atol=1e-6, err_msg=str(resumed)
    )

  # Same final params; the 2-process checkpoint restores in this 1-process run...
  target = _student_target(cfg, sharding.make_mesh(cfg.mesh))
  params_1 = _flat_numpy(checkpoint.load_params(str(one / "final_params"), target))
  params_2 = _flat_numpy(checkpoint.load_params(str(two / "final_params"), target))
  assert params_1.keys() == params_2.keys() and len(params_1) > 10
  for name in params_1:
    np.testing.assert_allclose(params_2[name], params_1[name], rtol=0, atol=1e-6, err_msg=name)
  # ... and the 1-process checkpoint restored in the 2-process job, bit for bit.
  with np.load(tmp_path / "one.npz") as restored:
    assert set(restored.files) == params_1.keys()
    for name in params_1:
      np.testing.assert_array_equal(restored[name], params_1[name], err_msg=name)


def _children(pid: int) -> list[int]:
  with open(f"/proc/{pid}/task/{pid}/children") as f:
    return [int(c) for c in f.read().split()]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
  # Several processes must save the same step and all exit: a process that
  # stops alone leaves the others blocked in a collective. Only process 1 gets
  # the signal; JAX's preemption sync point must tell process 0.
  workdir = tmp_path / "run"
  cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2"]
  cmd += ["--devices-per-process", "4", "--grace", "60", "--heartbeat-timeout", "15", "--"]
  cmd += [sys.executable, "-m", "jaxdistill.cli", "train", "--config", "configs/smoke.py"]
  cmd += ["--workdir", str(workdir), "--config.optim.steps=100000", "--config.ckpt.every=0"]
  cmd += ["--config.log.progress=false", "--config.student.num_layers=1"]
  # Cross-entropy alone (no teacher): what is tested is the stop, not the losses, and each of
  # the 2 processes then compiles a third of the smoke run's programs.
  cmd += ["--config.teacher.source=none", "--config.distill.logit.weight=0"]
  cmd += [f"--config.distill.{k}.weight=0" for k in ("attention", "hidden")]
  cmd += ["--config.distill.attention.value_weight=0"]
  launcher = subprocess.Popen(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  try:
    deadline = time.monotonic() + 300
    metrics = workdir / "metrics.jsonl"
    while time.monotonic() < deadline and launcher.poll() is None:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      time.sleep(0.5)
    assert launcher.poll() is None, launcher.communicate()[0][-3000:]
    children = _children(launcher.pid)
    assert len(children) == 2
    os.kill(children[1], signal.SIGTERM)  # the launcher starts process 1 second
    out = launcher.communicate(timeout=120)[0]
  finally:
    if launcher.poll() is None:  # a hang: kill the processes, then the launcher
      for pid in _children(launcher.pid):
        os.kill(pid, signal.SIGKILL)
      launcher.kill()
  assert launcher.returncode == 0, out[-3000:]
  saved = [line for line in out.splitlines() if "preempted: saved a checkpoint at step" in line]
  assert len(saved) == 1 and saved[0].startswith("[p0] "), out[-3000:]
  step = int(saved[0].split("at step ")[1].split()[0])
  assert os.listdir(workdir / "checkpoints") == [str(step)]
  assert os.path.isdir(workdir / "checkpoints" / str(step) / "state")
  assert json.loads(metrics.read_text().splitlines()[-1])["step"] == step


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  sys.exit(_two_process_job(*sys.argv[1:]))
