"""The quickstart's report: its summary of what distillation bought, the verdict paragraph,
its four-row table and report.json / .md with the validation curve (validation loss, or test
accuracy for the vision task).

The quickstart-specific layer: the rows are the job's four runs (``ROWS``), each holding
``evaluate.evaluate``'s metrics plus the run's params, tokens/s, steps and training time.
The general multi-run report (any runs, their ``eval/<name>.json``, latency, Pareto front) is
``jaxdistill.report``; its plotting (``report_plots``) draws this curve too, so both mark the
table's measurement on the periodic evaluation's curve and say which batches each uses.
Nothing here trains or evaluates.
"""

import json
import os

# The table's rows, in order: the job's four models.
ROWS = ("teacher", "kd_student", "ce_student", "ce_student_equal_time")


def build(results, summaries, cfg, teacher_dir, cached, wall_s) -> dict:
  """The report dict: one row per model plus a "summary" of what distillation bought.

  Args:
    results: name -> ``evaluate.evaluate`` metrics (the students and "teacher").
    summaries: name -> the run's training summary (``loop.train``'s, plus ``train_s``).
    cfg: the KD student's config (for the corpus line).
    teacher_dir: the teacher's run directory.
    cached: whether the teacher came from the cache.
    wall_s: the job's wall time so far.

  Returns:
    name -> row dict, and "summary" -> dict (gap closed, who beat whom, corpus, wall time).
  """
  report, vision = {}, _is_vision(results)
  rate = "images_per_s" if vision else "tokens_per_s"
  for name, m in results.items():
    s = summaries[name]
    row = dict(m, params=s["student_params"], steps=s["steps"], **{rate: s[rate]})
    row.setdefault("agreement", 1.0)  # the teacher against itself
    row.setdefault("kl_to_teacher", 0.0)
    if "train_s" in s:
      row["train_s"] = s["train_s"]
    report[name] = row
  if vision:
    report["summary"] = _vision_summary(report, teacher_dir, cached, wall_s)
    return report
  t, kd, ce = (report[k]["val_loss"] for k in ("teacher", "kd_student", "ce_student"))
  report["summary"] = {
    "teacher_cached": cached,
    "teacher_dir": teacher_dir,
    "gap_closed": (ce - kd) / (ce - t) if ce != t else None,  # share of CE->teacher gap
    "kd_beats_ce_same_steps": kd < ce,
    "kd_beats_ce_same_time": kd < report["ce_student_equal_time"]["val_loss"],
    "teacher_beats_ce": t < ce,
    "validation_tokens": report["teacher"]["tokens"],
    "wall_s": wall_s,
    "jemalloc": "jemalloc" in os.environ.get("LD_PRELOAD", ""),
    "corpus": f"python_stdlib ({cfg.data.stdlib_max_files or 'all'} files)",
  }
  return report


def _is_vision(results: dict) -> bool:
  return "images" in next(iter(results.values()))


def _vision_summary(report: dict, teacher_dir: str, cached: bool, wall_s: float) -> dict:
  t, kd, ce = (report[k]["accuracy"] for k in ("teacher", "kd_student", "ce_student"))
  return {
    "task": "vision",
    "teacher_cached": cached,
    "teacher_dir": teacher_dir,
    "gap_closed": (kd - ce) / (t - ce) if t != ce else None,  # share of CE->teacher gap
    "kd_beats_ce_same_steps": kd > ce,
    "kd_beats_ce_same_time": kd > report["ce_student_equal_time"]["accuracy"],
    "teacher_beats_ce": t > ce,
    "test_images": report["teacher"]["images"],
    "wall_s": wall_s,
    "jemalloc": "jemalloc" in os.environ.get("LD_PRELOAD", ""),
    "corpus": "built-in digits (5,000 real MNIST digits: 4,000 train, 1,000 test)",
  }


def _vision_verdict(report: dict) -> str:
  s, kd, ce = report["summary"], report["kd_student"], report["ce_student"]
  eq, t = report["ce_student_equal_time"], report["teacher"]
  pct = lambda m: f"{100 * m['accuracy']:.1f}%"
  if not s["teacher_beats_ce"]:
    return (
      f"The teacher ({pct(t)} test accuracy) is no better than the student trained on CE alone "
      f"({pct(ce)}), so there was nothing to distil; the KD student reached {pct(kd)}."
    )
  same_steps = (
    f"closed {100 * s['gap_closed']:.0f}% of the accuracy gap between the CE student and the "
    "teacher"
    if s["kd_beats_ce_same_steps"]
    else "did NOT beat the CE student"
  )
  same_time = ("still beat" if s["kd_beats_ce_same_time"] else "lost to") + (
    f" CE given the same wall time ({eq['steps']} CE steps reach {pct(eq)})"
  )
  return (
    f"At equal steps the KD student ({pct(kd)}) {same_steps} (CE {pct(ce)}, teacher {pct(t)}); "
    f"it {same_time}. A KD step also runs the teacher forward: it costs "
    f"{kd['train_s'] / ce['train_s']:.1f}x a CE step here."
  )


def verdict(report: dict) -> str:
  """One honest paragraph on what distillation bought."""
  if report["summary"].get("task") == "vision":
    return _vision_verdict(report)
  s, kd, ce = report["summary"], report["kd_student"], report["ce_student"]
  eq = report["ce_student_equal_time"]
  if not s["teacher_beats_ce"]:
    return (
      f"The teacher (val CE {report['teacher']['val_loss']:.3f}) is no better than the student "
      f"trained on CE alone ({ce['val_loss']:.3f}), so there was nothing to distil: the KD "
      f"student reached {kd['val_loss']:.3f}. Train the teacher longer."
    )
  same_steps = (
    f"closed {100 * s['gap_closed']:.0f}% of the gap between the CE student and the teacher"
    if s["kd_beats_ce_same_steps"]
    else "did NOT beat the CE student"
  )
  same_time = (
    "still beat" if s["kd_beats_ce_same_time"] else "lost to"
  ) + f" CE given the same wall time ({eq['steps']} CE steps reach {eq['val_loss']:.3f})"
  return (
    f"At equal steps the KD student ({kd['val_loss']:.3f}) {same_steps} "
    f"(CE {ce['val_loss']:.3f}, teacher {report['teacher']['val_loss']:.3f}); it "
    f"{same_time}. A KD step runs the teacher forward too, so it costs "
    f"{kd['train_s'] / ce['train_s']:.1f}x a CE step here; precomputed teacher targets would "
    "remove most of that cost."
  )


def _vision_table(report: dict) -> str:
  head = "| model | steps | params | test acc | top-5 | agree | KL(T‖S) | ECE | train img/s |"
  lines = [head, "|---|---|---|---|---|---|---|---|---|"]
  for name in ROWS:
    m = report[name]
    lines.append(
      f"| {name} | {m['steps']} | {m['params'] / 1e6:.3f}M | {100 * m['accuracy']:.1f}% | "
      f"{100 * m['top5_accuracy']:.1f}% | {m['agreement']:.3f} | {m['kl_to_teacher']:.3f} | "
      f"{m['ece']:.3f} | {m['images_per_s']:,.0f} |"
    )
  return "\n".join(lines)


def format_table(report: dict) -> str:
  """The report as a Markdown table (also what the command prints)."""
  if report["summary"].get("task") == "vision":
    return _vision_table(report)
  head = "| model | steps | params | val CE | val ppl | agree | KL(T‖S) | train tok/s |"
  lines = [head, "|---|---|---|---|---|---|---|---|"]
  for name in ROWS:
    m = report[name]
    lines.append(
      f"| {name} | {m['steps']} | {m['params'] / 1e6:.2f}M | {m['val_loss']:.3f} | "
      f"{m['val_ppl']:.1f} | {m['agreement']:.3f} | {m['kl_to_teacher']:.3f} | "
      f"{m['tokens_per_s']:,.0f} |"
    )
  return "\n".join(lines)


def _curve_caption(report: dict, run_dirs: dict[str, str], vision: bool) -> str:
  """Which batches the curves and the table's markers measure (they may differ)."""
  batches = set()
  for d in run_dirs.values():
    path = os.path.join(d, "config.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
      if cfg.get("eval", {}).get("every"):
        batches.add(cfg["eval"]["batches"])
  s = report["summary"]
  table = f"{s['test_images']:,} test images" if vision else f"{s['validation_tokens']:,} tokens"
  periodic = "/".join(str(b) for b in sorted(batches)) or "no"
  return (
    f"Lines: the periodic evaluation during training on the first {periodic} validation "
    f"batches (eval.batches). Markers: the table's measurement on {table}. When these differ "
    "a line's end need not meet its marker."
  )


def plot_curves(report: dict, run_dirs: dict[str, str], path: str, metric: str) -> None:
  """PNG of each run's ``metric`` rows (``eval/loss``, or ``eval/accuracy``) from its
  metrics.jsonl against the step, with the table's value marked at the run's last step."""
  from jaxdistill import report_plots
  from jaxdistill.metrics import read_jsonl

  curves, finals = {}, {}
  key = "accuracy" if metric == "eval/accuracy" else "val_loss"
  for name in ROWS:
    rows = [r for r in read_jsonl(os.path.join(run_dirs[name], "metrics.jsonl")) if metric in r]
    curves[name] = ([r["step"] for r in rows], [float(r[metric]) for r in rows])
    finals[name] = (report[name]["steps"], report[name][key])
  label = "test accuracy" if key == "accuracy" else "validation cross-entropy (nats)"
  report_plots.validation_curves(curves, finals, label, path)


def write_report(report: dict, workdir: str, run_dirs: dict[str, str]) -> None:
  """Writes report.json, val_loss.png and report.md into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  s = report["summary"]
  vision = s.get("task") == "vision"
  png = "test_accuracy.png" if vision else "val_loss.png"
  metric = "eval/accuracy" if vision else "eval/loss"
  plot_curves(report, run_dirs, os.path.join(workdir, png), metric)
  amount = (
    f"{s['test_images']:,} test images"
    if vision
    else (f"{s['validation_tokens']:,} validation tokens")
  )
  md = [
    "# jaxdistill quickstart report",
    "",
    f"Data: {s['corpus']}; {amount}. "
    f"Teacher {'loaded from the cache' if s['teacher_cached'] else 'trained in this run'} "
    f"({s['teacher_dir']}). Wall time {s['wall_s'] / 60:.1f} min"
    f"{' (jemalloc)' if s['jemalloc'] else ''}.",
    "",
    format_table(report),
    "",
    verdict(report),
    "",
    f"![the periodic evaluation over training and the table's measurement]({png})",
    "",
    _curve_caption(report, run_dirs, vision),
    "",
  ]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, sort_keys=True)
