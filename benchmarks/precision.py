"""Dtype policies in quickstart-size distillation: quality, step time and compiled memory.

  python benchmarks/precision.py [--json PATH] [--steps N] [--teacher-steps N] [--combos ...]

The quickstart's recipe (``jaxdistill.quickstart``: built-in stdlib corpus, its BPE, the
d256/L4 teacher and the d128/L2 KD student with KL + CE + MiniLM + hidden-state losses), at
the quickstart's step counts by default (about 10 minutes on 2 idle CPU cores with the
quickstart's teacher cached; ``--steps 20 --teacher-steps 100 --eval-batches 4`` for a quick
look):

1. the teacher is trained ONCE in f32 (``--teacher-steps``), cached by
   ``quickstart.get_teacher`` (``--cache-dir``; a second run reuses it);
2. for each ``STUDENT/TEACHER`` policy pair (``--combos``) a KD student is trained for
   ``--steps`` steps from the same init on the same batches (``loop.build_run`` +
   ``loop.run_steps``); the teacher runs under its own policy (c=fp8: static scales
   calibrated on 8 batches, ``teacher.calibrate_fp8``); f16 students use dynamic loss scaling;
3. both are evaluated on the first ``--eval-batches`` validation batches
   (``jaxdistill.evaluation.evaluate``; an FP8 model with its FP8 state).

Per row: the student's and the teacher's validation CE, the student's agreement with / KL
from its teacher, the median step time (steps 3..N), and the step's compiled memory per device
(``memory_analysis()``: temp + argument + output bytes; one CPU device here). CPU emulates
bf16 and FP8 (no native units), so CPU times say nothing about accelerator speed; memory and
quality are the point. Policy names: f32 = p=f32,c=f32,o=f32; bf16 / f16 = p=f32,c=X,o=f32
(f32 master params); fp8 = p=f32,c=fp8,o=f32.
"""

import argparse
import json
import statistics
import time

import jax

from jaxdistill import data as data_lib
from jaxdistill import quickstart
from jaxdistill.config import validate
from jaxdistill.evaluation import evaluate
from jaxdistill.models.layers import FP8_STATE
from jaxdistill.parallel import sharding
from jaxdistill.train import loop

POLICIES = {c: f"p=f32,c={c},o=f32" for c in ("f32", "bf16", "f16", "fp8")}
# The diagonal, then the cross terms the issue asks for, then f16 against an f32 teacher.
DEFAULT_COMBOS = ("f32/f32", "bf16/bf16", "fp8/fp8", "f32/bf16", "bf16/fp8", "f16/f32")


def teacher_dir(args) -> str:
  """Trains (or reuses from the cache) the f32 teacher; returns its run directory."""
  cfg = quickstart.teacher_config(args.size)
  steps = args.teacher_steps or cfg.optim.steps
  cfg.optim.update(steps=steps, warmup_steps=max(1, int(0.15 * steps)))
  cfg.eval.every = 0
  cfg.log.progress = False
  cfg.cache_dir = args.cache_dir
  if args.max_files:
    cfg.data.stdlib_max_files = args.max_files
  data_lib.check(cfg)
  return quickstart.get_teacher(cfg)[0]


def combo_config(args, teacher_path: str, student: str, teacher: str):
  cfg = quickstart.student_config(args.size, kd=True, teacher_path=teacher_path)
  steps = args.steps or cfg.optim.steps
  cfg.optim.update(steps=steps, warmup_steps=max(1, int(0.15 * steps)))
  cfg.student.policy, cfg.teacher.policy = POLICIES[student], POLICIES[teacher]
  if student == "f16":
    cfg.optim.loss_scale = "dynamic"
  cfg.eval.every = 0
  cfg.log.progress = False
  cfg.cache_dir = args.cache_dir
  if args.max_files:
    cfg.data.stdlib_max_files = args.max_files
  validate.validate(cfg)
  return cfg


def compile_step(run) -> dict:
  """Compiles the step once (the run then uses that executable); its memory per device.

  Returns:
    Bytes of temp, argument, output and their total (``memory_analysis()``).
  """
  batch = sharding.shard_batch(next(data_lib.make_iterator(run.cfg, "train")), run.mesh)
  run.step_fn = run.compile(batch)
  m = run.step_fn.memory_analysis()
  out = {
    "temp": int(m.temp_size_in_bytes),
    "argument": int(m.argument_size_in_bytes),
    "output": int(m.output_size_in_bytes),
  }
  out["total"] = sum(out.values())
  return out


def measure(args, teacher_path: str, combo: str) -> dict:
  student, teacher = combo.split("/")
  cfg = combo_config(args, teacher_path, student, teacher)
  start = time.perf_counter()
  run = loop.build_run(cfg)
  memory = compile_step(run)
  times, losses = [], []

  def on_metrics(step, m, seconds):
    times.append(seconds)
    losses.append(float(m["train/loss"]))

  loop.run_steps(run, cfg.optim.steps, on_metrics)
  models = {"student": (run.student, run.state.params["student"], run.state.model_state)}
  t_state = {k: v for k, v in run.teacher_vars.items() if k != "params"} or None
  t_model = (run.teacher, run.teacher_params, t_state)
  batches = evaluate.validation_batches(cfg, args.eval_batches)
  results = evaluate.evaluate(models, batches, run.mesh, teacher=t_model)
  s, t = results["student"], results["teacher"]
  return {
    "student": student,
    "teacher": teacher,
    "student_policy": cfg.student.policy,
    "teacher_policy": cfg.teacher.policy,
    "steps": cfg.optim.steps,
    "final_train_loss": losses[-1],
    "val_loss": s["val_loss"],
    "teacher_val_loss": t["val_loss"],
    "agreement": s["agreement"],
    "kl_to_teacher": s["kl_to_teacher"],
    "median_step_s": statistics.median(times[2:] or times),
    "memory_bytes": memory,
    "student_fp8_state": run.state.model_state is not None and FP8_STATE in run.state.model_state,
    "wall_s": time.perf_counter() - start,
  }


def format_table(rows: list[dict]) -> str:
  head = (
    "| student | teacher | val CE | teacher val CE | agree | KL(T‖S) | step s "
    "| temp MiB | args MiB | out MiB | total MiB |"
  )
  lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
  mib = lambda b: f"{b / 2**20:.1f}"
  for r in rows:
    m = r["memory_bytes"]
    lines.append(
      f"| {r['student']} | {r['teacher']} | {r['val_loss']:.3f} | {r['teacher_val_loss']:.3f} "
      f"| {r['agreement']:.3f} | {r['kl_to_teacher']:.3f} | {r['median_step_s']:.3f} "
      f"| {mib(m['temp'])} | {mib(m['argument'])} | {mib(m['output'])} | {mib(m['total'])} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default="", help="write the rows to this JSON file")
  parser.add_argument(
    "--steps", type=int, default=0, help="KD student steps per combo (0 = the quickstart's)"
  )
  parser.add_argument(
    "--teacher-steps", type=int, default=0, help="f32 teacher steps (0 = the quickstart's)"
  )
  parser.add_argument("--combos", nargs="+", default=list(DEFAULT_COMBOS), help="STUDENT/TEACHER")
  parser.add_argument("--eval-batches", type=int, default=48, help="validation batches")
  parser.add_argument("--size", default="full", choices=sorted(quickstart.SIZES))
  parser.add_argument("--max-files", type=int, default=0, help="stdlib files (0 = the size's)")
  parser.add_argument("--cache-dir", default="", help="jaxdistill cache ('' = default)")
  args = parser.parse_args()
  for combo in args.combos:
    s, _, t = combo.partition("/")
    if s not in POLICIES or t not in POLICIES:
      parser.error(f"bad combo {combo!r}: write STUDENT/TEACHER, each from {sorted(POLICIES)}")
  start = time.perf_counter()
  path = teacher_dir(args)
  print(f"teacher: {path} ({time.perf_counter() - start:.0f} s)", flush=True)
  rows = []
  for combo in args.combos:
    rows.append(measure(args, path, combo))
    r = rows[-1]
    print(
      f"{combo}: val CE {r['val_loss']:.3f} (teacher {r['teacher_val_loss']:.3f}), "
      f"{r['median_step_s']:.3f} s/step, {r['memory_bytes']['total'] / 2**20:.1f} MiB, "
      f"{r['wall_s']:.0f} s",
      flush=True,
    )
  print(format_table(rows))
  print(f"total {time.perf_counter() - start:.0f} s; jax {jax.__version__}, {jax.devices()[0]}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
