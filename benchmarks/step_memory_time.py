"""Compiled memory and step time of the whole distill step, to compare two checkouts.

  cd CHECKOUT && python benchmarks/step_memory_time.py [--repeats 5]

Builds the runs of ``step_overhead.py``'s cpu preset (fused head; objectives kl+ce and all) on
one device, prints one JSON line per objective: the compiled step's ``memory_analysis()``
bytes (temp, argument, output) and the median of ``--repeats`` step times after 2 warm-ups.
Run it in both checkouts, alternating, and compare: memory is exact, times are noisy on a
shared machine. Used to check that the layout redesign (issue 14) did not change the step.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import step_overhead  # noqa: E402

from jaxdistill.parallel import sharding  # noqa: E402
from jaxdistill.train import loop


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  for objective in ("kl+ce", "all"):
    cfg = step_overhead.make_config(step_overhead.PRESETS["cpu"], objective, True)
    run = loop.build_run(cfg, devices=jax.devices()[:1])
    batch = sharding.shard_batch(next(run.data_iter), run.mesh)
    m = run.compile(batch).memory_analysis()
    times = []
    for _ in range(args.repeats + 2):
      start = time.perf_counter()
      jax.block_until_ready(run.step(batch))
      times.append(time.perf_counter() - start)
    row = dict(objective=objective, temp=m.temp_size_in_bytes, argument=m.argument_size_in_bytes)
    row.update(output=m.output_size_in_bytes, median_s=statistics.median(times[2:]))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
