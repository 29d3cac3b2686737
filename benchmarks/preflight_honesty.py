"""Is the preflight roofline a bound? The CPU report of small configs next to their measured step.

  python benchmarks/preflight_honesty.py [--steps 8] [--output PATH]

For each config below, in one process on this machine's one CPU device:

* ``preflight.compiler.compile_for`` with the host's own topology (``compiler.host_topology``:
  this CPU's measured matmul FLOP/s and read bandwidth as its peaks, ``preflight.probe``,
  probed before and again after the case, the better of the two kept: a probe taken while
  other jobs run reads low and would make the bound too slow): the roofline step time, its
  compute and HBM terms;
* the same config's real step (``train.run.build_run``), timed over ``--steps`` steps after a
  compile step (median).

``measured / roofline`` must be >= 1 (a roofline is a lower bound) up to the noise of a shared
machine; how far above 1 it is says how much of the machine the step leaves unused (MFU of the
measured step against the probe). Prints a table, writes JSON.
"""

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxdistill import config as config_lib  # noqa: E402
from jaxdistill.parallel import sharding as sharding_lib  # noqa: E402
from jaxdistill.preflight import compiler, probe, roofline  # noqa: E402
from jaxdistill.train import run as run_lib  # noqa: E402

CASES = {
  # name: (student, teacher, batch, seq)
  "smoke": None,
  "d256 L4 / d512 L4, b8 T128": (
    dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024, vocab_size=4096, max_len=128),
    dict(d_model=512, num_layers=4, num_heads=8, d_ff=2048, vocab_size=4096, max_len=128),
    8,
    128,
  ),
  "d512 L6 / d768 L6, b8 T256": (
    dict(d_model=512, num_layers=6, num_heads=8, d_ff=2048, vocab_size=8192, max_len=256),
    dict(d_model=768, num_layers=6, num_heads=12, d_ff=3072, vocab_size=8192, max_len=256),
    8,
    256,
  ),
}


def case_config(name: str):
  cfg = config_lib.load_config("smoke", [])
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  spec = CASES[name]
  if spec is not None:
    student, teacher, batch, seq = spec
    cfg.student.update(student)
    cfg.teacher.update(teacher)
    cfg.distill.attention.update(weight=0.0, value_weight=0.0)
    cfg.data.update(batch_size=batch, seq_len=seq)
  return cfg


def measure(cfg, steps: int) -> float:
  """Median seconds of ``steps`` real steps (after one compiling step)."""
  run = run_lib.build_run(copy.deepcopy(cfg), devices=jax.devices()[:1])
  times = []
  for i in range(steps + 1):
    batch = sharding_lib.shard_batch(next(run.data_iter), run.mesh)
    start = time.perf_counter()
    metrics = run.step(batch)
    jax.block_until_ready(metrics)
    if i:
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--output", default="preflight_honesty.json")
  args = parser.parse_args()
  rows = []
  for name in CASES:
    cfg = case_config(name)
    topology = compiler.host_topology(1)
    report = compiler.compile_for(cfg, topology, devices=jax.devices()[:1])
    measured = measure(cfg, args.steps)
    # The probes read low while other jobs run: the best of before and after is the peak.
    after = probe.host_chip()
    chip = dataclasses.replace(
      topology.chip,
      peak_flops=max(topology.chip.peak_flops, after.peak_flops),
      hbm_bw=max(topology.chip.hbm_bw, after.hbm_bw),
      ici_bw=max(topology.chip.ici_bw, after.ici_bw),
    )
    report.notes = []
    roofline.fill_roofline(report, chip)
    row = dict(
      case=name,
      roofline_s=report.step_s,
      compute_s=report.compute_s,
      hbm_s=report.hbm_s,
      measured_s=measured,
      ratio=measured / report.step_s,
      model_flops=report.model_flops,
      measured_mfu=report.model_flops / measured / chip.peak_flops,
      load=os.getloadavg()[0],
      peak_gflops=chip.peak_flops / 1e9,
      read_gbs=chip.hbm_bw / 1e9,
    )
    rows.append(row)
    print(
      f"{name:<28} peaks {chip.peak_flops / 1e9:.0f} GFLOP/s {chip.hbm_bw / 1e9:.1f} GB/s  "
      f"roofline {report.step_s * 1e3:8.2f} ms (compute {report.compute_s * 1e3:.2f}, "
      f"HBM {report.hbm_s * 1e3:.2f})  measured {measured * 1e3:8.2f} ms  "
      f"ratio {row['ratio']:.2f}  MFU {row['measured_mfu']:.1%}"
    )
  out = dict(
    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    machine=dict(nproc=os.cpu_count(), python=platform.python_version()),
    jax=jax.__version__,
    rows=rows,
    bound_holds=all(r["ratio"] >= 0.95 for r in rows),
  )
  with open(args.output, "w") as f:
    json.dump(out, f, indent=1)
  print(f"bound holds: {out['bound_holds']}; wrote {args.output}")


if __name__ == "__main__":
  main()
