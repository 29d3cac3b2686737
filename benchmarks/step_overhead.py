"""What distillation costs beyond its two models: distill step / (teacher forward + CE step).

  python benchmarks/step_overhead.py [--preset cpu|gpu] [--json PATH]

Three programs at the same shapes, built with ``loop.build_run`` from configs made here and
timed in the same run, round-robin (median of ``--repeats`` calls after ``--warmup``):

* ``distill``: the full jitted distill step (teacher forward, student forward and backward,
  all losses, AdamW update), for two objectives: ``kl+ce`` (logit KL at tau=2 + CE) and
  ``all`` (plus MiniLM attention/value relations and projected hidden-state MSE);
* ``ce_step``: the same student trained on CE alone (``teacher.source='none'``);
* ``teacher_fwd``: the teacher's forward pass to its log-normaliser (logits reduced by a
  logsumexp, so the head matmul cannot be skipped and [B, T, V] never leaves the program).

Overhead = distill / (teacher_fwd + ce_step); the target is <= 1.10. Each is measured with
``distill.fused`` True (the default: the CE step then uses the fused CE head too) and False
(dense logits everywhere). MFU (student 6 * P * tokens + teacher 2 * P * tokens, no teacher
backward; ``loop.Run.flops_per_step``) is printed with ``--peak-tflops`` (the device's dense
peak); on CPU it is left out.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from jaxdistill import config as config_lib
from jaxdistill.config import validate
from jaxdistill.parallel import sharding
from jaxdistill.train import loop

OBJECTIVES = ("kl+ce", "all")
PRESETS = {
  # Runs in a few minutes on a 2-core CPU.
  "cpu": dict(
    student=dict(vocab_size=8192, d_model=128, num_layers=2, num_heads=4, d_ff=512),
    teacher=dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, d_ff=1024),
    batch_size=8,
    seq_len=128,
    policy="p=f32,c=f32,o=f32",
  ),
  "gpu": dict(
    student=dict(vocab_size=32768, d_model=1024, num_layers=8, num_heads=16, d_ff=4096),
    teacher=dict(vocab_size=32768, d_model=2048, num_layers=16, num_heads=16, d_ff=8192),
    batch_size=16,
    seq_len=1024,
    policy="p=f32,c=bf16,o=f32",
  ),
}


def make_config(preset: dict, objective: str, fused: bool, teacher: bool = True):
  """A validated config for one program of the comparison."""
  cfg = config_lib.default_config()
  for side in ("student", "teacher"):
    cfg[side].update(max_len=preset["seq_len"], policy=preset["policy"], **preset[side])
  cfg.teacher.source = "random" if teacher else "none"
  d = cfg.distill
  d.fused = fused
  d.temperature = 2.0
  d.ce.weight = 1.0 if not teacher else 0.5
  d.logit.weight = 0.5 if teacher else 0.0
  if teacher and objective == "all":
    d.attention.update(weight=0.1, value_weight=0.1, layer_map="last")
    d.hidden.update(weight=0.1, layer_map="uniform")
  cfg.data.update(batch_size=preset["batch_size"], seq_len=preset["seq_len"])
  cfg.optim.update(steps=1000, warmup_steps=10)
  cfg.log.progress = False
  validate.validate(cfg)
  return cfg


def interleaved_times(programs: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
  """Seconds of each call of each zero-argument program, timed round-robin so that load
  changes on a shared machine hit all of them alike (call i of every program: round i)."""
  for fn in programs.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in programs}
  for _ in range(repeats):
    for name, fn in programs.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def interleaved_medians(programs: dict, warmup: int, repeats: int) -> dict[str, float]:
  """Median seconds of each zero-argument program (``interleaved_times``)."""
  times = interleaved_times(programs, warmup, repeats)
  return {name: statistics.median(t) for name, t in times.items()}


def step_program(cfg, devices):
  """(one jitted step on a fixed batch, blocking; the Run)."""
  run = loop.build_run(cfg, devices=devices)
  with sharding.rules_context(run.mesh):
    batch = sharding.shard_batch(next(run.data_iter), run.mesh)

  def step():
    with sharding.rules_context(run.mesh):
      run.state, metrics = run.step_fn(run.state, run.teacher_vars, batch)
    jax.block_until_ready((run.state, metrics))

  return step, run


def teacher_program(run):
  """The teacher's forward pass (to per-token logsumexps), blocking."""
  with sharding.rules_context(run.mesh):
    batch = sharding.shard_batch(next(run.data_iter), run.mesh)

  @jax.jit
  def forward(params, batch):
    out = run.teacher.apply(
      {"params": params},
      batch["inputs"],
      segment_ids_BxT=batch.get("segment_ids"),
      positions_BxT=batch.get("positions"),
    )
    return jax.nn.logsumexp(out["logits"].astype(jnp.float32), axis=-1)

  def fwd():
    with sharding.rules_context(run.mesh):
      jax.block_until_ready(forward(run.teacher_params, batch))

  return fwd


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak, for MFU")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args(argv)
  preset, devices = PRESETS[args.preset], jax.devices()[:1]
  tokens = preset["batch_size"] * preset["seq_len"]
  rows = []
  header = (
    f"{'objective':<8} {'fused':>5} {'distill s':>10} {'teacher s':>10} {'ce s':>8} {'ratio':>6}"
  )
  print(header)
  for fused in (True, False):
    programs, runs = {}, {}
    programs["ce"], _ = step_program(make_config(preset, "", fused, teacher=False), devices)
    for objective in OBJECTIVES:
      programs[objective], runs[objective] = step_program(
        make_config(preset, objective, fused), devices
      )
    programs["teacher"] = teacher_program(runs[OBJECTIVES[0]])
    medians = interleaved_medians(programs, args.warmup, args.repeats)
    for objective in OBJECTIVES:
      distill_s, teacher_s, ce_s = medians[objective], medians["teacher"], medians["ce"]
      row = dict(
        objective=objective,
        fused=fused,
        tokens=tokens,
        distill_s=distill_s,
        teacher_fwd_s=teacher_s,
        ce_step_s=ce_s,
        ratio=distill_s / (teacher_s + ce_s),
      )
      if args.peak_tflops:
        row["mfu"] = runs[objective].flops_per_step / distill_s / (args.peak_tflops * 1e12)
      rows.append(row)
      print(
        f"{objective:<8} {fused!s:>5} {distill_s:>10.3f} {teacher_s:>10.3f} {ce_s:>8.3f} "
        f"{row['ratio']:>6.3f}" + (f"  MFU {row['mfu']:.1%}" if "mfu" in row else ""),
        flush=True,
      )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
