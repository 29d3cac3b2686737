"""Image pipeline supply vs distill-step demand: the loader must never be the bottleneck.

  python benchmarks/image_pipeline.py [--batch_size 64] [--cache_dir DIR] [--output PATH]

Supply: batches/s that ``jaxdistill.data.make_iterator`` delivers on the host (the training
split: shuffle, augmentation, normalisation, grain threads and prefetch as configured) for
the built-in digits (28x28x1) and synthetic images (32x32x3), with augmentation off and on:
crop (pad 2 for digits, as configs/cnn_digits.py; pad 4 for 32x32, as configs/cnn_cifar10.py)
+ horizontal flip (32x32 only: digits are not mirror-symmetric) + mixup (alpha ``--mixup``).
A timed call reads ``--chunk`` batches, after draining what the pipeline prefetched while it
waited its turn.

Demand: steps/s of the classic pair's distill step (configs/cnn_cifar10.py's teacher 32 / 64
fc 512 -> student 16 / 32 fc 256, KL + CE, adapted to the dataset's image shape; a random
teacher of that shape) on a fixed batch of that pipeline already on the device, ``--block``
steps a timed call. ``fed`` is the same step fed from the live iterator (next batch, device
transfer, step): what a training loop on this machine gets, the pipeline's threads sharing
the cores with the step.

Every program (pipelines and steps) takes turns, ``--rounds`` timed calls each, so supply and
demand see the same load changes; rates are of the median call. Ratio = supply / demand; the
target is >= 20x. The built-in digits are built into ``--cache_dir`` (default: a new
temporary directory, removed at the end) before timing.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill.parallel import sharding  # noqa: E402
from jaxdistill.train import loop

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATASETS = {
  "digits 28x28x1": dict(
    source="digits", size=28, channels=1, padding=2, flip=False, mean="0.1307", std="0.3081"
  ),
  "synthetic 32x32x3": dict(
    source="synthetic",
    size=32,
    channels=3,
    padding=4,
    flip=True,
    mean="0.4914,0.4822,0.4465",
    std="0.2470,0.2435,0.2616",
  ),
}
DRAIN = 16  # > what a waiting pipeline holds ready (grain's read buffer 8 + prefetch 2)


def make_config(dataset: str, augment: bool, args):
  """The classic pair's KL + CE distill config on ``dataset``, augmentation on or off."""
  d = DATASETS[dataset]
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/cnn_cifar10.py:distill"))
  for side in (cfg.student, cfg.teacher):
    side.update(image_size=d["size"], image_channels=d["channels"])
  cfg.teacher.source = "random"
  cfg.cache_dir = args.cache_dir
  cfg.eval.every = 0
  cfg.log.progress = False
  cfg.data.update(
    source=d["source"],
    batch_size=args.batch_size,
    image_mean=d["mean"],
    image_std=d["std"],
    crop_padding=d["padding"] if augment else 0,
    flip=d["flip"] and augment,
    mixup=args.mixup if augment else 0.0,
  )
  return cfg


def _variants():
  """(name, dataset, augment) of every measured pipeline."""

  def label(dataset: str, aug: bool) -> str:
    if not aug:
      return "no augmentation"
    return "crop+flip+mixup" if DATASETS[dataset]["flip"] else "crop+mixup"

  pairs = [(dataset, aug) for dataset in DATASETS for aug in (False, True)]
  return [(f"{dataset}, {label(dataset, aug)}", dataset, aug) for dataset, aug in pairs]


def pipeline_programs(cfgs: dict, chunk: int) -> dict:
  """Programs returning the seconds ``chunk`` batches of each pipeline take, timed after
  draining what the pipeline prefetched while it waited its turn."""
  programs = {}
  for name, cfg in cfgs.items():
    it = data_lib.make_iterator(cfg, "train", 0, 1)

    def timed_chunk(it=it):
      for _ in range(DRAIN):
        next(it)
      start = time.perf_counter()
      for _ in range(chunk):
        next(it)
      return time.perf_counter() - start

    programs[f"supply: {name}"] = timed_chunk
  return programs


def step_programs(cfgs: dict, block: int) -> dict:
  """Programs returning the seconds ``block`` distill steps take: "NAME" on a fixed batch of
  that pipeline on the device, "fed: NAME" from the live iterator (next batch, device
  transfer, step). One Run per dataset: its variants differ only in the batch's keys (mixup
  adds mix_targets / mix_lambda), which jit traces apart."""
  runs, programs = {}, {}
  for name, cfg in cfgs.items():
    dataset = name.split(",")[0]
    if dataset not in runs:
      runs[dataset] = loop.build_run(cfg, data=False, devices=jax.devices()[:1])
    run = runs[dataset]
    it = data_lib.make_iterator(cfg, "train", 0, 1)
    with sharding.rules_context(run.mesh):
      fixed = sharding.shard_batch(next(it), run.mesh)

    def on_fixed(run=run, fixed=fixed):
      start = time.perf_counter()
      for _ in range(block):
        metrics = run.step(fixed)
      jax.block_until_ready(metrics)
      return time.perf_counter() - start

    def fed(run=run, it=it):
      start = time.perf_counter()
      for _ in range(block):
        with sharding.rules_context(run.mesh):
          metrics = run.step(sharding.shard_batch(next(it), run.mesh))
      jax.block_until_ready(metrics)
      return time.perf_counter() - start

    programs[f"demand: {name}"], programs[f"fed: {name}"] = on_fixed, fed
  return programs


def interleaved_seconds(programs: dict, warmup: int, rounds: int) -> dict[str, list[float]]:
  """The seconds each program reports, ``rounds`` times, the programs taking turns (supply
  and demand under the same load changes)."""
  for fn in programs.values():
    for _ in range(warmup):
      fn()
  seconds = {name: [] for name in programs}
  for _ in range(rounds):
    for name, fn in programs.items():
      seconds[name].append(fn())
  return seconds


def measure(args) -> dict:
  """Builds the digits, then supply and demand of every variant; the result dict."""
  cfgs = {name: make_config(dataset, aug, args) for name, dataset, aug in _variants()}
  start = time.perf_counter()
  data_lib.check(cfgs[_variants()[0][0]])  # builds the digits into the cache, once
  build_s = time.perf_counter() - start
  programs = {**pipeline_programs(cfgs, args.chunk), **step_programs(cfgs, args.block)}
  seconds = interleaved_seconds(programs, 1, args.rounds)
  median_s = {name: statistics.median(s) for name, s in seconds.items()}
  rows = []
  for name in cfgs:
    supply = args.chunk / median_s[f"supply: {name}"]
    demand = args.block / median_s[f"demand: {name}"]
    rows.append(
      dict(
        pipeline=name,
        batch_size=args.batch_size,
        supply_batches_per_s=supply,
        supply_images_per_s=supply * args.batch_size,
        demand_steps_per_s=demand,
        fed_steps_per_s=args.block / median_s[f"fed: {name}"],
        ratio=supply / demand,
      )
    )
  return dict(digits_build_s=build_s, mixup=args.mixup, rows=rows, seconds=seconds)


def print_result(result: dict) -> None:
  print(f"built-in digits built into the cache in {result['digits_build_s']:.1f} s")
  print(
    f"{'pipeline (batch ' + str(result['rows'][0]['batch_size']) + ')':<46} {'supply b/s':>10} "
    f"{'images/s':>9} {'step/s':>7} {'fed step/s':>10} {'supply/demand':>13}"
  )
  for r in result["rows"]:
    print(
      f"{r['pipeline']:<46} {r['supply_batches_per_s']:>10.0f} {r['supply_images_per_s']:>9.0f} "
      f"{r['demand_steps_per_s']:>7.2f} {r['fed_steps_per_s']:>10.2f} {r['ratio']:>12.1f}x",
      flush=True,
    )


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--mixup", type=float, default=0.2, help="Beta(alpha, alpha) when on")
  parser.add_argument("--cache_dir", default="", help="default: a temporary directory")
  parser.add_argument("--chunk", type=int, default=100, help="batches per timed chunk")
  parser.add_argument("--block", type=int, default=5, help="steps per timed call")
  parser.add_argument("--rounds", type=int, default=7, help="timed calls of each program")
  parser.add_argument("--output", help="write the result here as JSON")
  args = parser.parse_args(argv)
  temporary = not args.cache_dir
  if temporary:
    args.cache_dir = tempfile.mkdtemp(prefix="jaxdistill_bench_")
  try:
    result = measure(args)
  finally:
    if temporary:
      shutil.rmtree(args.cache_dir, ignore_errors=True)
  print_result(result)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
