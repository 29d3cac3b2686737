"""Serving latency of the quickstart teacher and student, as `jaxdistill eval --latency` times it.

  python benchmarks/forward_latency.py [--batch_sizes 1,32] [--repeats 30] [--output PATH]

Builds the quickstart recipe's teacher and student (configs/quickstart.py at full size, random
weights: latency does not depend on their values) and times their compiled forwards with
``latency.model_latency``: per batch size, both models warmed up, then called alternately
(round-robin) so that this shared machine's drifting speed hits both alike; median and p90 of
the repeats, compiled memory at the largest batch, params and bytes. Prints a table and the
teacher / student latency ratio (the serving speed-up distillation buys), writes JSON.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxdistill import config as config_lib
from jaxdistill.evaluation import latency
from jaxdistill.train import run as run_lib  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_sizes", default="1,32")
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--output", default="/tmp/forward_latency.json")
  args = parser.parse_args(argv)
  sizes = tuple(int(b) for b in args.batch_sizes.split(","))
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", "quickstart.py") + ":distill")
  cfg.teacher.source = "random"
  seq_len = cfg.data.seq_len
  entries = {}
  for side in ("teacher", "student"):
    module = run_lib.model_of(cfg, side)
    variables = jax.jit(
      lambda r, m=module: m.init(r, latency.example_batch(m, 1, seq_len)["inputs"])
    )(jax.random.key(0))
    entries[side] = (module, {"params": variables["params"]})
  got = latency.model_latency(
    entries,
    lambda b: latency.example_batch(entries["student"][0], b, seq_len),
    sizes,
    repeats=args.repeats,
  )
  result = {"seq_len": seq_len, "device": jax.devices()[0].device_kind, "latency": got}
  result["size"] = {name: latency.size(v) for name, (_, v) in entries.items()}
  print(
    "| model | params | MB | "
    + " | ".join(f"ms b={b} (median / p90)" for b in sizes)
    + " | memory MB |"
  )
  print("|---|---|---|" + "---|" * len(sizes) + "---|")
  for name in entries:
    size, lat = result["size"][name], got[name]
    cells = [
      f"{lat[f'batch_{b}']['median_s'] * 1e3:.2f} / {lat[f'batch_{b}']['p90_s'] * 1e3:.2f}"
      for b in sizes
    ]
    mem = lat["memory"]["total_bytes"]
    print(
      f"| {name} | {size['params'] / 1e6:.2f}M | {size['bytes'] / 2**20:.1f} | "
      + " | ".join(cells)
      + f" | {mem / 2**20:.1f} |"
    )
  for b in sizes:
    ratio = got["teacher"][f"batch_{b}"]["median_s"] / got["student"][f"batch_{b}"]["median_s"]
    result[f"teacher_over_student_b{b}"] = ratio
    print(f"teacher / student latency at batch {b}: {ratio:.2f}x")
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.output}")
  return result


if __name__ == "__main__":
  main()
