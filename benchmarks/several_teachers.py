"""Several teachers (``teachers``, ``distill.ensemble``, issue 18): what a second teacher costs.

  python benchmarks/several_teachers.py [--repeats 7] [--json PATH]

One CPU device, float32, [8, 128] token batches, vocabulary 2048. Student 2 x 128; each
teacher 4 x 256 (the second one of another seed). For each head (dense, fused, sparse
top-k tail with k = 32) the one-teacher step is the baseline and each ensemble kind it takes
is measured beside it: the compiled step's temporary memory (``memory_analysis``) and its
step time (median of ``--repeats`` steps after 2 warm-ups, all configurations interleaved step
by step, so load on a shared machine hits them alike), then both as ratios to the baseline of
the same head. Model FLOPs per step (``run.flops``) show the work the second teacher adds.

Prints a table; writes JSON (default /tmp/several_teachers.json).
"""

import argparse
import json
import statistics
import time

import jax

from jaxdistill.config import default_config, teacher_fields
from jaxdistill.parallel import sharding
from jaxdistill.train import run as run_lib

MB = 1 << 20
TEACHER = dict(vocab_size=2048, d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=128)
# (head, ensemble kind or None for one teacher, fused, logit kind)
CASES = [
  ("dense", None, False, "kl"),
  ("dense", "probs", False, "kl"),
  ("dense", "logits", False, "kl"),
  ("dense", "losses", False, "kl"),
  ("fused", None, True, "kl"),
  ("fused", "logits", True, "kl"),
  ("fused", "losses", True, "kl"),
  ("sparse", None, False, "topk_tail"),
  ("sparse", "probs", False, "topk_tail"),
  ("sparse", "logits", False, "topk_tail"),
  ("sparse", "losses", False, "topk_tail"),
]


def make_config(kind, fused, logit_kind):
  cfg = default_config()
  cfg.student.update(vocab_size=2048, d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=128)
  cfg.teacher.update(source="random", **TEACHER)
  cfg.distill.update(temperature=2.0, fused=fused)
  cfg.distill.logit.kind = logit_kind
  cfg.distill.ce.weight = 0.5
  cfg.precompute.k = 32
  cfg.data.update(batch_size=8, seq_len=128)
  cfg.mesh.update(data=1)
  cfg.log.progress = False
  if kind is not None:
    cfg.distill.ensemble = kind
    cfg.teachers = (teacher_fields(source="random", **TEACHER),)
  return cfg


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--json", default="/tmp/several_teachers.json")
  args = parser.parse_args()
  start = time.perf_counter()
  runs, batch = [], None
  for head, kind, fused, logit_kind in CASES:
    run = run_lib.build_run(make_config(kind, fused, logit_kind), devices=jax.devices()[:1])
    if batch is None:
      batch = sharding.shard_batch(next(run.data_iter), run.mesh)
    memory = run.compile(batch).memory_analysis()
    runs.append((head, kind, run, memory.temp_size_in_bytes))
  times = {i: [] for i in range(len(runs))}
  for repeat in range(args.repeats + 2):
    for i, (_, _, run, _) in enumerate(runs):
      t0 = time.perf_counter()
      jax.block_until_ready(run.step(batch))
      if repeat >= 2:
        times[i].append(time.perf_counter() - t0)
  rows, base = [], {}
  for i, (head, kind, run, temp) in enumerate(runs):
    step = statistics.median(times[i])
    if kind is None:
      base[head] = (step, temp)
    rows.append(
      dict(
        head=head,
        ensemble=kind or "one teacher",
        teachers=1 if kind is None else 2,
        step_ms=1e3 * step,
        step_ratio=step / base[head][0],
        temp_mb=temp / MB,
        temp_ratio=temp / base[head][1],
        gflops=run.flops.total / 1e9,
      )
    )
  print(
    f"{'head':7} {'ensemble':12} {'step ms':>8} {'x1':>6} {'temp MB':>8} {'x1':>6} {'GFLOP':>7}"
  )
  for r in rows:
    print(
      f"{r['head']:7} {r['ensemble']:12} {r['step_ms']:8.1f} {r['step_ratio']:6.2f} "
      f"{r['temp_mb']:8.1f} {r['temp_ratio']:6.2f} {r['gflops']:7.2f}"
    )
  wall = time.perf_counter() - start
  print(f"wall {wall:.0f} s")
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(dict(rows=rows, repeats=args.repeats, wall_s=wall), f, indent=1)


if __name__ == "__main__":
  main()
