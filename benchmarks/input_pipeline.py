"""Input pipeline throughput vs what training consumes: the loader must never be the bottleneck.

  python benchmarks/input_pipeline.py [--json out.json] [--cache_dir DIR] [--batches 200]

Delivered: tokens/s of the grain pipeline on the built-in corpus with the quickstart's
batches and BPE (pack and pad modes; default threads vs one thread without prefetch; rows
shuffled in 1024-row windows, the general default), timed alone after a warm-up; and the
time to the first batch with the quickstart's own window over the whole split (filling it
tokenises the split once; after that rows come from memory). Consumed: tokens/s of the
training step of configs/smoke.py, of the quickstart's KD student (configs/lm_distill.py
with a random teacher of the real shape) and of its CE student (configs/lm_baseline.py), fed
a fixed batch so no loader cost is included. Prints a table and the ratios (aim: >= 20x).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill import quickstart
from jaxdistill.parallel import sharding  # noqa: E402
from jaxdistill.train import loop  # noqa: E402


def pipeline_tokens_per_s(cfg, batches: int) -> float:
  """Valid tokens per second delivered by the training iterator (after 10 warm-up batches)."""
  it = data_lib.make_iterator(cfg, "train", 0, 1)
  for _ in range(10):
    next(it)
  start, tokens = time.perf_counter(), 0.0
  for _ in range(batches):
    tokens += float(next(it)["weights"].sum())
  return tokens / (time.perf_counter() - start)


def step_tokens_per_s(cfg, steps: int) -> float:
  """Tokens per second the jitted step consumes on a fixed batch (median step time)."""
  run = loop.build_run(cfg)
  batch = next(run.data_iter)
  times = []
  with sharding.rules_context(run.mesh):
    global_batch = sharding.shard_batch(batch, run.mesh)
    state = run.state
    for i in range(steps + 2):  # the first two include compilation
      start = time.perf_counter()
      state, metrics = run.step_fn(state, run.teacher_vars, global_batch)
      jax.block_until_ready(metrics)
      if i >= 2:
        times.append(time.perf_counter() - start)
  return cfg.data.batch_size * cfg.data.seq_len / statistics.median(times)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--cache_dir", default="", help="jaxdistill cache (default: the usual)")
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--steps", type=int, default=5, help="timed steps of the KD config")
  args = parser.parse_args(argv)

  lm = quickstart.student_config("full", kd=False)
  lm.cache_dir = args.cache_dir
  data_lib.check(lm)  # builds the corpus and tokenizer once, outside the timings
  delivered = {}
  for name, overrides in (
    ("pack", {}),
    ("pad", {"packing": "pad"}),
    ("pack, 1 thread, no prefetch", {"num_threads": 1, "prefetch": 0}),
  ):
    cfg = quickstart.student_config("full", kd=False)
    cfg.cache_dir = args.cache_dir
    cfg.data.update(shuffle_rows=1024, **overrides)
    delivered[name] = pipeline_tokens_per_s(cfg, args.batches)
  start = time.perf_counter()
  next(data_lib.make_iterator(lm, "train", 0, 1))
  first_batch_s = time.perf_counter() - start

  shape = f"{lm.data.batch_size} x {lm.data.seq_len}"
  smoke = config_lib.load_config("configs/smoke.py", [("log.progress", "false")])
  kd = quickstart.student_config("full", kd=True)
  kd.cache_dir = args.cache_dir
  kd.teacher.source = "random"  # same shapes and cost as the cached teacher
  consumed = {
    "smoke (synthetic, 8 x 32)": step_tokens_per_s(smoke, 20),
    f"lm_distill KD step ({shape})": step_tokens_per_s(kd, args.steps),
    f"lm_baseline CE step ({shape})": step_tokens_per_s(lm, 2 * args.steps),
  }
  print(f"{f'pipeline ({shape}, {lm.student.vocab_size} BPE)':36s} {'tokens/s':>12s}")
  for name, value in delivered.items():
    print(f"  {name:34s} {value:12,.0f}")
  print(f"  first batch, window of {lm.data.shuffle_rows} rows: {first_batch_s:.1f} s")
  print(f"{'training step consumes':36s} {'tokens/s':>12s} {'pipeline / step':>16s}")
  for name, value in consumed.items():
    print(f"  {name:34s} {value:12,.0f} {delivered['pack'] / value:15.1f}x")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(
        {
          "delivered_tokens_per_s": delivered,
          "consumed_tokens_per_s": consumed,
          "first_batch_s": {"shuffle_rows": lm.data.shuffle_rows, "seconds": first_batch_s},
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  main()
