"""Multi-host precompute for real: 2 processes of ``jaxdistill precompute`` started through
launch/local.py (a jax.distributed job on fake CPU devices) write the cache one process writes,
byte for byte (shards, sidecars, settings, manifest); and a job in which one process dies by
SIGKILL halfway through a shard, rerun, finishes with those same bytes.

Every process has one device, as the reference run here has: the cache does not depend on the
process count, but XLA may round a last bf16 bit differently for another per-device batch
(see docs/precompute.md, "Many processes, resuming").

This file is also the job whose process 1 dies (``python tests/e2e/test_precompute_multihost.py
DIE_AT_SHARD PRECOMPUTE_ARGS...``): it must therefore not import conftest, which would give
every worker 8 devices.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# configs/smoke.py (teacher d128/L4), 64 rows in 8 shards of one 8-row batch: 4 per process.
OVERRIDES = ["--config.precompute.rows=64", "--config.precompute.rows_per_shard=8"]
OVERRIDES += ["--config.log.progress=false"]
DIE_AT = 3  # process 1's second shard (process p writes the shards s with s % 2 == p)


def _precompute_args(output) -> list[str]:
  config = ["--config", str(ROOT / "configs" / "smoke.py")]
  return ["precompute", *config, "--output", str(output), *OVERRIDES]


def _launch(job: list[str]) -> tuple[int, str]:
  """Runs ``job`` as 2 processes x 1 CPU device through launch/local.py: (status, output)."""
  cmd = [sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2"]
  cmd += ["--devices-per-process", "1", "--grace", "2", "--heartbeat-timeout", "15"]
  cmd += ["--init-timeout", "60", "--timeout", "240", "--", *job]
  proc = subprocess.run(
    cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
  )
  return proc.returncode, proc.stdout


def _files(path: pathlib.Path) -> dict[str, bytes]:
  return {n: (path / n).read_bytes() for n in sorted(os.listdir(path))}


def _assert_same_cache(got: pathlib.Path, want: dict[str, bytes]) -> None:
  files = _files(got)
  assert sorted(files) == sorted(want)  # no .partial / .tmp left, one manifest
  differ = [n for n in want if files[n] != want[n]]
  assert not differ, f"{differ} differ from the 1-process cache"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, bytes]:
  """The cache 1 process with 1 device writes (here, in the test process), as bytes by name."""
  import jax

  from jaxdistill import config
  from jaxdistill.config import validate
  from jaxdistill.precompute import text as precompute

  out = tmp_path_factory.mktemp("one")
  overrides = [tuple(o.removeprefix("--config.").split("=", 1)) for o in OVERRIDES]
  cfg = config.load_config(str(ROOT / "configs" / "smoke.py"), overrides)
  validate.validate(cfg)
  result = precompute.run(cfg, str(out), devices=jax.devices()[:1])
  assert result["complete"] and result["shards"] == 8 and result["rows"] == 64
  files = _files(out)
  assert len([n for n in files if n.endswith(".arrayrecord")]) == 8 and "manifest.json" in files
  return files


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(one_process, tmp_path):
  rc, text = _launch([sys.executable, "-m", "jaxdistill.cli", *_precompute_args(tmp_path)])
  assert rc == 0, text[-3000:]
  # Process 0 alone reports; each process computed its own half.
  assert "[p0] done: 64 rows in 8 shard(s) (32 computed here" in text, text[-3000:]
  assert "[p1] done" not in text
  _assert_same_cache(tmp_path, one_process)


def _dying_job(die_at: int, argv: list[str]) -> int:
  """One process of the killed job: ``jaxdistill precompute``, except that process 1 SIGKILLs
  itself once shard ``die_at``'s rows are queued for writing (its ``.partial`` file open), before
  the shard is finished. A kill at a chosen point, so the test never races the job."""
  from jaxdistill.cli import commands as cli
  from jaxdistill.data import cache_writer

  if os.environ["JAX_PROCESS_ID"] == "1":
    put = cache_writer.ShardWriter.put

    def put_or_die(self, item):
      if item[:2] == ("close", die_at):
        while not self.queue.empty():  # the rows reach the writer thread
          time.sleep(0.01)
        time.sleep(0.2)
        print(f"SIGKILL in shard {die_at}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      put(self, item)

    cache_writer.ShardWriter.put = put_or_die
  return cli.main(argv)


@pytest.mark.slow
def test_sigkill_of_one_process_then_a_rerun_writes_the_same_cache(one_process, tmp_path):
  out = tmp_path / "cache"
  rc, text = _launch([sys.executable, __file__, str(DIE_AT), *_precompute_args(out)])
  assert f"[p1] SIGKILL in shard {DIE_AT}" in text, text[-3000:]
  assert rc == 128 + signal.SIGKILL and "process 1 (pid" in text, text[-3000:]
  names = set(os.listdir(out))
  assert "manifest.json" not in names and "shard-00001.arrayrecord" in names, names
  assert f"shard-0000{DIE_AT}.arrayrecord" not in names, names
  finished = out / "shard-00001.arrayrecord"
  stamp = finished.stat().st_mtime_ns

  rc, text = _launch([sys.executable, "-m", "jaxdistill.cli", *_precompute_args(out)])
  assert rc == 0, text[-3000:]
  assert "[p0] done: 64 rows in 8 shard(s)" in text, text[-3000:]
  assert finished.stat().st_mtime_ns == stamp  # a finished shard is kept, not redone
  _assert_same_cache(out, one_process)


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  sys.exit(_dying_job(int(sys.argv[1]), sys.argv[2:]))
