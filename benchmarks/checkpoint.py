"""Checkpoint save / restore time and size, async vs sync saving.

  python benchmarks/checkpoint.py [--json PATH] [--repeats 5]

For each model size it builds a real run (TrainState: student params,
projections, AdamW state, step, rng; plus the data-iterator state and the
metadata), then measures with Orbax:
  blocked_s  how long ``save`` blocks the step loop (async: device->host copy
             only; sync: the whole write)
  total_s    until the checkpoint is complete on disk
  restore_s  restoring it into the target shardings
  bytes      size on disk
Medians over --repeats saves. Sizes: "smoke" (configs/smoke.py) and
"quickstart" (a d128/L2 student on an 8192-token vocabulary, the scale of the
quickstart's student).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxdistill import config as config_lib
from jaxdistill.train import (
  checkpoint,
  loop,  # noqa: E402
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _config(name: str):
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", "smoke.py"))
  if name == "quickstart":
    cfg.student.update(
      vocab_size=8192, d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=256
    )
    cfg.teacher.update(
      vocab_size=8192, d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=256
    )
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def measure(name: str, async_save: bool, repeats: int) -> dict:
  cfg = _config(name)
  cfg.ckpt.async_save = async_save
  run = loop.build_run(cfg, devices=jax.devices()[:1])
  meta = checkpoint.metadata(cfg, run.mesh, None)
  blocked, total, restored = [], [], []
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir, cfg.ckpt)
    for step in range(1, repeats + 1):
      start = time.perf_counter()
      checkpoint.save(manager, step, run.state, run.data_iter, meta, force=True)
      blocked.append(time.perf_counter() - start)
      manager.wait_until_finished()
      total.append(time.perf_counter() - start)
    size = _dir_bytes(os.path.join(workdir, checkpoint.CHECKPOINTS, str(repeats)))
    target = loop.build_run(cfg, devices=jax.devices()[:1], create_state=False)
    for _ in range(repeats):
      start = time.perf_counter()
      state, _ = checkpoint.restore(manager, repeats, target.state, target.data_iter)
      jax.block_until_ready(state)
      restored.append(time.perf_counter() - start)
    manager.close()
  params = sum(x.size for x in jax.tree.leaves(run.state.params))
  return {
    "config": name,
    "async": async_save,
    "params": int(params),
    "bytes": size,
    "blocked_s": statistics.median(blocked),
    "total_s": statistics.median(total),
    "restore_s": statistics.median(restored),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rows = [measure(n, a, args.repeats) for n in ("smoke", "quickstart") for a in (False, True)]
  print(
    f"{'config':<11}{'mode':<7}{'params':>10}{'MiB':>8}{'blocked ms':>12}{'total ms':>10}"
    f"{'restore ms':>12}"
  )
  for r in rows:
    print(
      f"{r['config']:<11}{'async' if r['async'] else 'sync':<7}{r['params']:>10,}"
      f"{r['bytes'] / 2**20:>8.2f}{r['blocked_s'] * 1e3:>12.1f}{r['total_s'] * 1e3:>10.1f}"
      f"{r['restore_s'] * 1e3:>12.1f}"
    )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
