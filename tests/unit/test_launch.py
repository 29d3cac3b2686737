"""The launchers: local processes that never hang, and every script's --dry-run commands.

The local launcher's children here are plain Python sleepers (no JAX): what is
tested is the launcher's own job of starting, prefixing, and stopping
everything when one process fails. test_distributed.py runs real training
through it.
"""

import importlib.util
import io
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT

LOCAL = ROOT / "launch" / "local.py"
SLEEPER = (
  "import os, sys, time; print('pid', os.getpid(), flush=True); time.sleep(float(sys.argv[1]))"
)


def _local():
  spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (exited, not yet reaped by the launcher) counts as gone.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split()[2] != "Z"


def test_worker_env_gives_each_process_its_own_devices_and_rank():
  local = _local()
  base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "KEEP": "1"}
  env = local.worker_env(
    base, process_id=3, num_processes=4, coordinator="h:9", devices_per_process=2, local_rank=1
  )
  assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
  assert (env["JAX_PLATFORMS"], env["JAX_NUM_CPU_DEVICES"], env["KEEP"]) == ("cpu", "2", "1")
  assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == (
    "h:9",
    "4",
    "3",
  )
  gpu = local.worker_env(
    {},
    process_id=5,
    num_processes=8,
    coordinator="h:9",
    devices_per_process=2,
    local_rank=1,
    platform="gpu",
    heartbeat_timeout=30,
  )
  assert gpu["JAX_LOCAL_DEVICE_IDS"] == "2,3" and "JAX_PLATFORMS" not in gpu
  assert gpu["JAXDISTILL_HEARTBEAT_TIMEOUT"] == "30"


def test_all_processes_succeed_and_output_is_prefixed():
  out = io.StringIO()
  code = (
    "import os; print('rank', os.environ['JAX_PROCESS_ID'], 'of', os.environ['JAX_NUM_PROCESSES'])"
  )
  rc = _local().run([sys.executable, "-c", code], processes=3, out=out, timeout_s=60)
  text = out.getvalue()
  assert rc == 0, text
  for i in range(3):
    assert f"[p{i}] rank {i} of 3" in text
  assert "all 3 processes finished" in text


def test_a_failing_process_stops_the_others_and_is_named():
  # Process 1 exits with status 3 after a second; process 0 would sleep for 300 s.
  code = (
    "import os, sys, time\n"
    "if os.environ['JAX_PROCESS_ID'] == '1': time.sleep(1); sys.exit(3)\n"
    "print('pid', os.getpid(), flush=True); time.sleep(300)"
  )
  out = io.StringIO()
  start = time.monotonic()
  rc = _local().run([sys.executable, "-c", code], processes=2, grace_s=2, out=out, timeout_s=120)
  text = out.getvalue()
  assert rc == 3, text
  assert time.monotonic() - start < 30, text
  assert "process 1 (pid" in text and "exit status 3" in text, text
  assert not _alive(int(text.split("[p0] pid ")[1].split()[0])), "process 0 was not stopped"


def test_timeout_stops_a_hanging_job():
  out = io.StringIO()
  rc = _local().run(
    [sys.executable, "-c", SLEEPER, "300"], processes=2, grace_s=1, timeout_s=3, out=out
  )
  assert rc == 124 and "timeout after 3 s" in out.getvalue(), out.getvalue()


def test_killing_one_process_makes_the_launcher_exit_nonzero_naming_it():
  proc = subprocess.Popen(
    [sys.executable, str(LOCAL), "--processes", "2", "--grace", "2", "--"]
    + [sys.executable, "-c", SLEEPER, "300"],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines: queue.Queue = queue.Queue()
  threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
  pids, seen, deadline = {}, [], time.monotonic() + 60
  try:
    while len(pids) < 2 and time.monotonic() < deadline:
      try:
        line = lines.get(timeout=1)
      except queue.Empty:
        continue
      seen.append(line)
      if " pid " in line:
        pids[line.split("]")[0].lstrip("[")] = int(line.split()[-1])
    assert len(pids) == 2, "".join(seen)
    os.kill(pids["p1"], signal.SIGKILL)
    start = time.monotonic()
    rc = proc.wait(timeout=30)
    assert time.monotonic() - start < 30
  finally:
    if proc.poll() is None:
      proc.kill()
  time.sleep(0.5)
  while not lines.empty():
    seen.append(lines.get())
  text = "".join(seen)
  assert rc != 0, text
  assert "process 1 (pid" in text and "SIGKILL" in text, text
  assert not _alive(pids["p0"]), "the surviving process was not stopped"


def _script(*args, env=None):
  """Runs a launch / tpu script in dry-run mode; returns its stdout lines."""
  proc = subprocess.run(
    ["bash", *map(str, args)],
    capture_output=True,
    text=True,
    timeout=60,
    env=dict(os.environ, **(env or {})),
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


TRAIN = ["jaxdistill", "train", "--config", "configs/smoke.py", "--workdir", "/shared/run 1"]
TPU = ["--name", "my-tpu", "--zone", "us-east5-a", "--project", "proj", "--dry-run"]
WHERE = "--zone=us-east5-a --project=proj"


def test_local_launcher_dry_run():
  proc = subprocess.run(
    [sys.executable, str(LOCAL), "--processes", "2", "--devices-per-process", "4", "--dry-run"]
    + ["--coordinator", "localhost:1234", "--", *TRAIN],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    argv = shlex.split(line)
    assert argv[0] == "env" and argv[-len(TRAIN) :] == TRAIN
    assert f"JAX_PROCESS_ID={i}" in argv and "JAX_NUM_PROCESSES=2" in argv
    assert "JAX_COORDINATOR_ADDRESS=localhost:1234" in argv
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in argv


def test_slurm_script_dry_run():
  lines = _script(ROOT / "launch" / "slurm_gpu.sbatch", "--dry-run", *TRAIN, env={"XLA_FLAGS": ""})
  srun = [line for line in lines if line.startswith("srun ")]
  assert len(srun) == 1
  argv = shlex.split(srun[0].split(" 2>&1")[0])
  assert argv == ["srun", "--kill-on-bad-exit=1", "--label", *TRAIN]
  assert "export NCCL_DEBUG=WARN" in lines
  assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in lines
  assert any("scontrol requeue" in line for line in lines)
  text = (ROOT / "launch" / "slurm_gpu.sbatch").read_text()
  for directive in ("--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=TERM@"):
    assert f"#SBATCH {directive}" in text


def test_multinode_gpu_script_dry_run():
  lines = _script(
    ROOT / "launch" / "multinode_gpu.sh",
    "--hosts",
    "gpu1,gpu2",
    "--dir",
    "/opt/jd",
    "--dry-run",
    "--",
    *TRAIN,
  )
  assert len(lines) == 3 and lines[2].startswith("wait")
  for rank, line in enumerate(lines[:2]):
    host = f"gpu{rank + 1}"
    assert line.endswith(f"2>&1 | sed 's/^/[{host}] /' &")
    ssh = shlex.split(line.split(" 2>&1")[0])
    assert ssh[:3] == ["ssh", "-tt", host]
    remote = shlex.split(ssh[3])
    assert remote[:3] == ["cd", "/opt/jd", "&&"]
    assert remote[3:5] == ["python3", "/opt/jd/launch/local.py"]
    launcher = " ".join(remote[5 : remote.index("--")])
    assert "--platform gpu --processes 8 --devices-per-process 1 --num-nodes 2" in launcher
    assert f"--node-rank {rank} --coordinator gpu1:29500" in launcher
    assert remote[remote.index("--") + 1 :] == TRAIN
  one = _script(
    ROOT / "launch" / "multinode_gpu.sh",
    "--nodes",
    "2",
    "--node-rank",
    "1",
    "--coordinator",
    "gpu1:29500",
    "--dry-run",
    "--",
    *TRAIN,
  )
  assert len(one) == 1 and "--node-rank 1 --coordinator gpu1:29500" in one[0]


def test_tpu_create_and_delete_dry_run():
  lines = _script(
    ROOT / "tpu_scripts" / "create.sh",
    *TPU,
    "--type",
    "v5p-32",
    "--version",
    "v2-alpha-tpuv5",
    "--spot",
  )
  assert lines[0] == (
    f"gcloud compute tpus queued-resources create my-tpu {WHERE} --node-id=my-tpu "
    "--accelerator-type=v5p-32 --runtime-version=v2-alpha-tpuv5 --spot"
  )
  assert lines[-1] == (
    f"gcloud compute tpus queued-resources describe my-tpu {WHERE} --format='value(state.state)'"
  )
  lines = _script(ROOT / "tpu_scripts" / "delete.sh", *TPU)
  assert lines == [f"gcloud compute tpus queued-resources delete my-tpu {WHERE} --force --quiet"]


@pytest.mark.parametrize("status", [0, 1, 2])
def test_tpu_create_runs_the_preflight_first(tmp_path, status):
  """--config: `jaxdistill compile` for the slice first; nothing is created unless it fits
  (a stub stands in for jaxdistill: tests/unit/test_preflight.py compiles for real)."""
  stub = tmp_path / "jaxdistill"
  stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\nexit {status}\n')
  stub.chmod(0o755)
  argv = ["bash", str(ROOT / "tpu_scripts" / "create.sh"), *TPU, "--type", "v5litepod-16"]
  argv += [
    "--version",
    "v2-alpha-tpuv5e",
    "--config",
    "configs/x.py",
    "--override",
    "data.batch_size=16",
  ]
  proc = subprocess.run(
    argv, capture_output=True, text=True, timeout=60, env=dict(os.environ, JAXDISTILL=str(stub))
  )
  assert (tmp_path / "args").read_text().split() == [
    "compile",
    "--config",
    "configs/x.py",
    "--topology",
    "v5litepod-16",
    "--config.data.batch_size=16",
  ]
  assert proc.returncode == status
  created = "queued-resources create" in proc.stdout
  assert created == (status == 0)
  if status == 1:
    assert "does not fit" in proc.stderr and "not creating my-tpu" in proc.stderr


def test_tpu_setup_dry_run():
  lines = _script(ROOT / "tpu_scripts" / "setup.sh", *TPU, "--bucket", "gs://my-bucket")
  assert lines[0].startswith("tar czf ") and "--exclude=./.venv" in lines[0]
  assert lines[1].startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in lines[1]
  install = shlex.split(lines[2])
  assert install[:9] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-tpu",
    "--zone=us-east5-a",
    "--project=proj",
    "--worker=all",
  ]
  assert "pip install -q -e . 'jax[tpu]" in install[9]
  assert "gcsfuse" in lines[3] and "/mnt/gcs/my-bucket" in lines[3]


def test_tpu_run_dry_run_kills_stale_processes_and_logs_per_worker():
  lines = _script(
    ROOT / "tpu_scripts" / "run.sh", *TPU, "--workers", "2", "--logs", "L", "--", *TRAIN
  )
  kill = shlex.split(lines[0])
  assert "--worker=all" in kill and "/dev/accel*" in kill[-1] and "kill -9" in kill[-1]
  assert lines[1] == "mkdir -p L"
  for w in (0, 1):
    line = lines[2 + w]
    assert line.endswith(f"> L/worker-{w}.log 2>&1 &")
    argv = shlex.split(line.split(" > ")[0])
    assert f"--worker={w}" in argv
    command = argv[-1]
    assert command.startswith("--command=cd ~/jaxdistill && source .venv/bin/activate && ")
    assert shlex.split(command.split("&& ")[-1]) == TRAIN  # quoting survives the round trip
  assert lines[4].startswith("wait")


def test_tpu_resume_loop_dry_run():
  lines = _script(
    ROOT / "tpu_scripts" / "resume_loop.sh",
    *TPU,
    "--type",
    "v5p-32",
    "--version",
    "v2",
    "--workers",
    "1",
    "--logs",
    "L",
    "--",
    *TRAIN,
  )
  text = "\n".join(lines)
  for expected in (
    "queued-resources describe my-tpu",
    "queued-resources delete my-tpu",
    "queued-resources create my-tpu",
    "tpu-vm scp",
    "--worker=0 --command='cd ~/jaxdistill",
    "> L/attempt-1/worker-0.log",
    "'done: ...'",
  ):
    assert expected in text, expected


@pytest.mark.parametrize(
  "script, args, words",
  [
    ("tpu_scripts/run.sh", ["--name", "t", "--zone", "z", "--dry-run", "--", "x"], ["--workers"]),
    ("tpu_scripts/create.sh", ["--name", "t", "--zone", "z", "--dry-run"], ["--type"]),
    ("tpu_scripts/delete.sh", ["--zone", "z", "--dry-run"], ["--name"]),
    ("launch/multinode_gpu.sh", ["--dry-run", "--", "x"], ["--hosts"]),
  ],
)
def test_scripts_reject_missing_settings(script, args, words):
  proc = subprocess.run(
    ["bash", str(ROOT / script), *args],
    capture_output=True,
    text=True,
    timeout=60,
    env={k: v for k, v in os.environ.items() if not k.startswith("TPU_")},
  )
  assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
  for word in words:
    assert word in proc.stderr
