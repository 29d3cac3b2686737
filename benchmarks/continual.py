"""Continual distillation (issue 30): forgetting with and without the snapshot term.

  python benchmarks/continual.py [--size full|test] [--seed N] [--student_steps N]
                                 [--workdir DIR] [--json PATH] [--plot PNG]
  python benchmarks/continual.py --from_json PATH --plot PNG     (the table and plot again)

Pretrains the teacher as ``configs/continual.py`` at ``--size`` does (once, in WORKDIR/teacher),
then runs that config twice on the same stream with that teacher (``teacher.source=workdir``):
with the snapshot term (``snapshot``: ``continual.snapshot_weight`` as configured) and without
it (``plain``: weight 0), so the two differ only in the term. ``--seed`` (default 0) seeds the
students and the stream's shuffles (the teacher is the same for every seed); a seed other than
0 trains in WORKDIR/<variant>_seed<N>. ``--student_steps N`` > 0 first trains the student's
model on CE for N steps on the whole corpus subset (the quickstart's CE student, once, in
WORKDIR/student_ce<N>) and starts both students from it (``student.init_from``): a student past
its fast early learning, which is where forgetting shows (WORKDIR/<variant>_init<N>).
Each run evaluates, at each window's end, the student's CE on the held-out rows of every
window seen so far (WORKDIR/<variant>/forgetting.json). Prints, for each evaluation, the loss
on each window with / without the term, then each window's forgetting (its loss at the end of
the stream minus its loss at the end of its own window) and the mean over the old windows;
writes the rows as JSON (default /tmp/continual.json) and, with ``--plot``, a PNG of each
window's loss over the stream, with (solid) and without (dashed) the term.
"""

import argparse
import json
import os
import shutil
import time

from jaxdistill.config import config_module
from jaxdistill.train import loop

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "continual.py")


def pretrain_student(size: str, workdir: str, steps: int) -> str:
  """The student's model trained on CE for ``steps`` steps on the whole corpus subset (the
  quickstart's CE student at ``size``, constant rate), once: its workdir."""
  module = config_module(CONFIG)
  out = os.path.join(workdir, f"student_ce{steps}")
  if os.path.isdir(os.path.join(out, "final_params")):
    return out
  cfg = module._RECIPE.student_config(size, kd=False)
  cfg.data.update(**module.SIZES[size]["stdlib"])
  cfg.optim.update(steps=steps, lr_schedule="constant", warmup_steps=max(1, steps // 20))
  cfg.log.progress = False
  loop.train(cfg, out)
  return out


def run_variant(variant: str, size: str, workdir: str, teacher_dir: str, seed: int, init: str):
  """Trains one variant in WORKDIR/<variant> (fresh); returns its forgetting.json and time."""
  cfg = config_module(CONFIG).get_config(f"{variant},{size}")
  cfg.log.progress = False
  cfg.seed = seed
  cfg.teacher.update(source="workdir", path=teacher_dir)
  cfg.student.init_from = init
  name = variant + (f"_seed{seed}" if seed else "")
  out = os.path.join(workdir, name + (f"_init{init.rsplit('student_ce', 1)[-1]}" if init else ""))
  shutil.rmtree(out, ignore_errors=True)
  start = time.perf_counter()
  summary = loop.train(cfg, out)
  with open(os.path.join(out, "forgetting.json"), encoding="utf-8") as f:
    found = json.load(f)
  return dict(found, wall_s=time.perf_counter() - start, median_step_s=summary["median_step_s"])


def loss(row: dict, k: int) -> float | None:
  return row.get(f"eval/window_{k}/loss")


def forgetting(rows: list[dict], window_steps: int, k: int) -> float:
  """Window k's loss at the last evaluation minus at the evaluation closing window k."""
  own = next(r for r in rows if (r["step"] - 1) // window_steps == k)
  return loss(rows[-1], k) - loss(own, k)


def table(results: dict) -> str:
  """Markdown: the loss on each window at each window's end, with / without the term."""
  snap, plain = results["snapshot"], results["plain"]
  w = snap["window_steps"]
  windows = len(snap["rows"])
  head = "| after window (step) | " + " | ".join(f"w{k} with / without" for k in range(windows))
  lines = [head + " |", "|---|" + "---|" * windows]
  for a, b in zip(snap["rows"], plain["rows"]):
    cells = []
    for k in range(windows):
      cells.append(f"{loss(a, k):.3f} / {loss(b, k):.3f}" if loss(a, k) is not None else "")
    lines.append(f"| {(a['step'] - 1) // w} ({a['step']}) | " + " | ".join(cells) + " |")
  forgot = [
    f"{forgetting(snap['rows'], w, k):+.3f} / {forgetting(plain['rows'], w, k):+.3f}"
    for k in range(windows)
  ]
  lines.append("| forgetting | " + " | ".join(forgot) + " |")
  return "\n".join(lines)


def plot(results: dict, path: str, title: str) -> None:
  """Each window's held-out loss at each window's end, with (solid) / without (dashed)."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  for variant, style in (("snapshot", "-"), ("plain", "--")):
    rows = results[variant]["rows"]
    for k in range(len(rows)):
      points = [(r["step"], loss(r, k)) for r in rows if loss(r, k) is not None]
      label = f"window {k}" if variant == "snapshot" else None
      ax.plot(*zip(*points), style, marker="o", color=f"C{k}", label=label)
  ax.set(xlabel="step (each window's end)", ylabel="held-out CE (nats/token)", title=title)
  ax.plot([], [], "k-", label="with snapshot term")
  ax.plot([], [], "k--", label="without")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def summary_rows(results: dict) -> list[dict]:
  """One JSON row per (variant, evaluation, window)."""
  rows = []
  for variant, found in results.items():
    w = found["window_steps"]
    for r in found["rows"]:
      for k in range(len(found["rows"])):
        if loss(r, k) is not None:
          rows.append(dict(variant=variant, step=r["step"], window=k, loss=loss(r, k)))
    old = range(len(found["rows"]) - 1)  # every window but the last (which is not old yet)
    mean = sum(forgetting(found["rows"], w, k) for k in old) / max(1, len(old))
    rows.append(dict(variant=variant, mean_forgetting_old=mean, wall_s=found["wall_s"]))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="full", choices=("full", "test"))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--student_steps", type=int, default=0)
  parser.add_argument("--workdir", default="/tmp/continual_study")
  parser.add_argument("--json", default="/tmp/continual.json")
  parser.add_argument("--plot", default="")
  parser.add_argument("--from_json", default="", help="print and plot a saved study, run nothing")
  args = parser.parse_args()
  if args.from_json:
    with open(args.from_json, encoding="utf-8") as f:
      doc = json.load(f)
    print(table(doc["results"]))
    if args.plot:
      init = doc.get("student_steps", 0)
      plot(doc["results"], args.plot, f"students from {f'CE step {init}' if init else 'scratch'}")
    return
  start = time.perf_counter()
  # The teacher once, as the config pretrains it (WORKDIR/teacher; kept between invocations).
  cfg = config_module(CONFIG).get_config(f"snapshot,{args.size}")
  cfg.log.progress = False
  teacher = loop.pretrain_teacher(cfg, args.workdir)
  teacher_s = time.perf_counter() - start
  print(f"teacher: {teacher} ({teacher_s:.0f} s)")
  teacher = os.path.dirname(teacher)  # the teacher run's workdir
  init = ""
  if args.student_steps:
    init = pretrain_student(args.size, args.workdir, args.student_steps)
    print(f"student: {init} ({time.perf_counter() - start - teacher_s:.0f} s)")
  variants = ("snapshot", "plain")
  results = {v: run_variant(v, args.size, args.workdir, teacher, args.seed, init) for v in variants}
  print(f"domains: {results['snapshot']['domains']}")
  print(table(results))
  rows = summary_rows(results)
  for r in rows:
    if "mean_forgetting_old" in r:
      print(
        f"{r['variant']}: mean forgetting of the old windows {r['mean_forgetting_old']:+.3f} "
        f"nats, run {r['wall_s']:.0f} s"
      )
  wall = time.perf_counter() - start
  print(f"total {wall:.0f} s")
  with open(args.json, "w", encoding="utf-8") as f:
    doc = dict(size=args.size, seed=args.seed, student_steps=args.student_steps, rows=rows)
    doc.update(results=results, teacher_s=teacher_s, wall_s=wall)
    json.dump(doc, f, indent=1)
  if args.plot:
    start_from = f"CE step {args.student_steps}" if args.student_steps else "scratch"
    plot(results, args.plot, f"students from {start_from}")


if __name__ == "__main__":
  main()
