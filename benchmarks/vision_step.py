"""What image distillation costs beyond its two models: distill step / (teacher fwd + CE step).

  python benchmarks/vision_step.py [--preset cpu|gpu] [--pairs cnn,resnet] [--wrn]
      [--repeats 11] [--warmup 2] [--output PATH]

For each teacher -> student pair, built from the repository's configs with a random teacher
(``teacher.source='random'``: the same shapes and cost as a trained one) and synthetic images
(``data.source='synthetic'``), programs at the same batch, timed round-robin in one run
(median of ``--repeats`` calls after ``--warmup``), so that this shared machine's drifting speed
hits all of them alike:

* ``kl+ce``: the full jitted distill step of the config (teacher forward in inference mode,
  student forward in train mode with its BatchNorm statistics, backward, KL at the config's
  temperature + CE, optimizer update), with attention transfer off;
* ``kl+ce+at``: the same plus attention transfer between every stage pair (``stage_map
  uniform``, the authors' ``squared`` form as in configs/resnet_cifar10.py);
* ``ce``: the student trained on CE alone (the config's ``baseline``: ``teacher.source none``,
  the same optimizer);
* ``teacher``: the teacher's forward alone (inference mode, stored statistics) to its logits.

Pairs: ``cnn`` is configs/cnn_cifar10.py's classic pair (teacher conv 32 / 64, fc 512;
student 16 / 32, fc 256) at 32x32x3; ``resnet`` configs/resnet_cifar10.py's ResNet-56 ->
ResNet-20; ``--wrn`` adds a WRN-16-2 teacher -> ResNet-20. Every program gets one fixed batch
already on the device (``build_run(..., data=False)``), so no input pipeline is timed here
(benchmarks/image_pipeline.py measures it).

Ratio = distill / (teacher + ce) of the medians; the target is <= 1.10. ``rounds p25-p75``:
the quartiles of the same ratio taken within each round, whose spread shows how much the
machine's load moved during the run. ``xla ratio`` is the same ratio of
the compiled programs' ``cost_analysis()`` FLOPs: about 1 when the distill step does no work
beyond the two programs (no recomputed teacher forward, no second student forward). Images/s
and model FLOP/s are of the distill step (``models.flops_per_example``: student forward +
backward = 3x its forward, teacher forward once); ``--peak-tflops`` (the device's dense peak)
adds MFU. On an accelerator: ``--preset gpu --peak-tflops <bf16 peak>``.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from step_overhead import interleaved_times  # noqa: E402 (the same round-robin timer)

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill import models
from jaxdistill.parallel import sharding  # noqa: E402
from jaxdistill.train import loop

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# Attention transfer as configs/resnet_cifar10.py sets it (every stage: uniform pairs 1:1..S:S).
AT = dict(kind="squared", weight=1500.0, stage_map="uniform")
PAIRS = {
  "cnn": dict(config="configs/cnn_cifar10.py", kind="cnn", teacher={}),
  "resnet": dict(config="configs/resnet_cifar10.py", kind="resnet", teacher={}),
  "wrn": dict(
    config="configs/resnet_cifar10.py", kind="resnet", teacher=dict(arch="wrn", depth=16, widen=2)
  ),
}
PRESETS = {
  # A few minutes on a 2-core CPU, f32.
  "cpu": dict(batch=dict(cnn=64, resnet=32), policy="p=f32,c=f32,o=f32"),
  # For an accelerator (not measured yet): CIFAR-sized batches, bf16 compute.
  "gpu": dict(batch=dict(cnn=1024, resnet=256), policy="p=f32,c=bf16,o=f32"),
}


def make_config(pair: str, variant: str, batch: int, policy: str):
  """The config of one program: ``variant`` "kl+ce", "kl+ce+at" or "ce" (the baseline)."""
  p = PAIRS[pair]
  cfg = config_lib.load_config(
    os.path.join(ROOT, p["config"]) + (":baseline" if variant == "ce" else ":distill")
  )
  cfg.data.update(source="synthetic", batch_size=batch)
  cfg.eval.every = 0
  cfg.ckpt.every = 0
  cfg.log.progress = False
  cfg.student.policy = cfg.teacher.policy = policy
  cfg.teacher.update(p["teacher"])
  if variant != "ce":
    cfg.teacher.source = "random"
    cfg.distill.attention_transfer.update(AT if variant == "kl+ce+at" else dict(weight=0.0))
  return cfg


def fixed_batch(cfg, mesh) -> dict:
  """One global batch of the config's synthetic images, placed on the mesh."""
  local = next(data_lib.make_iterator(cfg, "train", 0, 1))
  with sharding.rules_context(mesh):
    return sharding.shard_batch(local, mesh)


def step_program(run, batch):
  """(one step on ``batch``, blocking; the compiled step's XLA FLOPs). Compiling first puts
  the executable in jit's cache, so the warm-up calls do not compile again."""
  flops = run.compile(batch).cost_analysis()["flops"]

  def step():
    jax.block_until_ready(run.step(batch))

  return step, flops


def teacher_program(run, batch):
  """(the teacher's forward alone, inference mode, to its logits, blocking; its XLA FLOPs)."""
  forward = jax.jit(lambda variables, b: models.apply(run.teacher, variables, b)["logits"])
  with sharding.rules_context(run.mesh):
    compiled = forward.lower(run.teacher_vars, batch).compile()

  def fwd():
    jax.block_until_ready(compiled(run.teacher_vars, batch))

  return fwd, compiled.cost_analysis()["flops"]


def build_programs(pair: str, batch_size: int, policy: str, devices) -> tuple[dict, dict, dict]:
  """(programs by name, XLA FLOPs by name, the distill Runs by variant) of one pair. The
  variants share the batch, the teacher's random variables and the student's initial ones
  (which also spares each build its own init compilations)."""
  programs, flops, runs = {}, {}, {}
  batch = student_vars = teacher_vars = None
  for variant in ("kl+ce", "kl+ce+at", "ce"):
    cfg = make_config(pair, variant, batch_size, policy)
    # A copy per Run: a given array may become the Run's own state, which its steps donate.
    given = jax.tree.map(jnp.copy, student_vars)
    run = loop.build_run(
      cfg,
      data=False,
      devices=devices,
      student_vars=given,
      teacher_vars=teacher_vars if variant != "ce" else None,
    )
    if batch is None:
      batch, teacher_vars = fixed_batch(cfg, run.mesh), run.teacher_vars
      student_vars = {"params": run.state.params["student"], **(run.state.model_state or {})}
    programs[variant], flops[variant] = step_program(run, batch)
    if variant != "ce":
      runs[variant] = run
  programs["teacher"], flops["teacher"] = teacher_program(runs["kl+ce"], batch)
  return programs, flops, runs


def pair_rows(pair: str, args, devices) -> list[dict]:
  """Measures one pair; returns a row per distill variant."""
  preset = PRESETS[args.preset]
  batch_size = args.batch or preset["batch"][PAIRS[pair]["kind"]]
  start = time.perf_counter()
  programs, flops, runs = build_programs(pair, batch_size, preset["policy"], devices)
  built_s = time.perf_counter() - start
  times = interleaved_times(programs, args.warmup, args.repeats)
  medians = {name: statistics.median(t) for name, t in times.items()}
  teacher_s, ce_s = medians["teacher"], medians["ce"]
  student_cfg, teacher_cfg = runs["kl+ce"].student.config, runs["kl+ce"].teacher.config
  rows = []
  for variant, run in runs.items():
    distill_s = medians[variant]
    # The ratio within each round too: its spread shows how much the machine's load moved.
    rounds = [d / (t + c) for d, t, c in zip(times[variant], times["teacher"], times["ce"])]
    quartiles = statistics.quantiles(rounds, n=4)
    rows.append(
      dict(
        pair=pair,
        teacher=_name(teacher_cfg),
        student=_name(student_cfg),
        variant=variant,
        batch=batch_size,
        policy=preset["policy"],
        distill_s=distill_s,
        teacher_fwd_s=teacher_s,
        ce_step_s=ce_s,
        ratio=distill_s / (teacher_s + ce_s),
        round_ratio_quartiles=quartiles,
        xla_flops=dict(distill=flops[variant], teacher=flops["teacher"], ce=flops["ce"]),
        xla_ratio=flops[variant] / (flops["teacher"] + flops["ce"]),
        model_flops_per_step=run.flops_per_step,
        images_per_s=batch_size / distill_s,
        model_flops_per_s=run.flops_per_step / distill_s,
        teacher_params=models.count_params(run.teacher_params),
        student_params=models.count_params(run.state.params["student"]),
        build_and_compile_s=built_s,
        times_s={name: times[name] for name in (variant, "teacher", "ce")},
      )
    )
    if args.peak_tflops:
      rows[-1]["mfu"] = rows[-1]["model_flops_per_s"] / (args.peak_tflops * 1e12)
  return rows


def _name(config) -> str:
  """A short model name: cnn-32,64-fc512, resnet56, wrn16-2."""
  if config.arch == "cnn":
    return f"cnn-{','.join(map(str, config.cnn_channels))}-fc{config.cnn_fc}"
  return f"{config.arch}{config.depth}" + (f"-{config.widen}" if config.arch == "wrn" else "")


def print_rows(rows: list[dict]) -> None:
  """The table: seconds as ms, the ratios, throughput."""
  print(
    f"{'teacher -> student':<32} {'B':>4} {'objective':<9} {'distill ms':>10} "
    f"{'teacher ms':>10} {'ce ms':>8} {'ratio':>6} {'rounds p25-p75':>14} {'xla':>6} "
    f"{'img/s':>7} {'GFLOP/s':>8}"
  )
  for r in rows:
    q = r["round_ratio_quartiles"]
    print(
      f"{r['teacher'] + ' -> ' + r['student']:<32} {r['batch']:>4} {r['variant']:<9} "
      f"{1e3 * r['distill_s']:>10.1f} {1e3 * r['teacher_fwd_s']:>10.1f} "
      f"{1e3 * r['ce_step_s']:>8.1f} {r['ratio']:>6.3f} {q[0]:>7.3f}-{q[2]:<6.3f} "
      f"{r['xla_ratio']:>6.3f} {r['images_per_s']:>7.0f} {r['model_flops_per_s'] / 1e9:>8.1f}"
      + (f"  MFU {r['mfu']:.1%}" if "mfu" in r else ""),
      flush=True,
    )


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--pairs", default="cnn,resnet", help="comma-separated: cnn, resnet, wrn")
  parser.add_argument("--wrn", action="store_true", help="also WRN-16-2 -> ResNet-20")
  parser.add_argument("--batch", type=int, default=0, help="override the preset's batch sizes")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU")
  parser.add_argument("--output", help="write the rows here as JSON")
  args = parser.parse_args(argv)
  pairs = [p for p in args.pairs.split(",") if p] + (["wrn"] if args.wrn else [])
  unknown = sorted(set(pairs) - set(PAIRS))
  if unknown:
    parser.error(f"unknown pairs {unknown}; choose from {sorted(PAIRS)}")
  devices = jax.devices()[:1]
  rows = []
  for pair in dict.fromkeys(pairs):
    rows += pair_rows(pair, args, devices)
  print_rows(rows)
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(dict(device=str(devices[0].device_kind), rows=rows), f, indent=2)
  return rows


if __name__ == "__main__":
  main()
