"""The quickstart's report: its summary of what distillation bought and the verdict paragraph,
on top of the general ``jaxdistill report`` (``report.write``: the table, curves, the
accuracy-latency plot and its Pareto front), which draws the periodic evaluation's curve with
the table's measurement marked and says which batches each uses.

The quickstart-specific layer: its rows are the job's four runs (``ROWS``), each holding
``evaluate.evaluate``'s metrics plus the run's params, tokens/s, steps and training time.
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


def write(summary: dict, workdir: str, runs: dict[str, str]) -> dict:
  """The quickstart's report, made by ``jaxdistill report`` (``report.write``) of its three
  student runs (their ``eval/validation.json``, teacher included) with the data line and the
  verdict under the table; report.json holds the general report plus this job's rows
  (``build``'s name -> metrics) and its "summary".

  Args:
    summary: ``build``'s dict.
    workdir: the quickstart's directory (report.md, report.json and the PNGs go there).
    runs: name -> the student runs' directories, in the table's order.

  Returns:
    ``report.write``'s dict (its "table" is what the command prints).
  """
  from jaxdistill.report import write as report

  s = summary["summary"]
  vision = s.get("task") == "vision"
  amount = f"{s['test_images']:,} test images" if vision else f"{s['validation_tokens']:,} tokens"
  intro = (
    f"Quickstart. Data: {s['corpus']}; {amount}. Teacher "
    f"{'loaded from the cache' if s['teacher_cached'] else 'trained in this run'} "
    f"({s['teacher_dir']}). Wall time {s['wall_s'] / 60:.1f} min"
    f"{' (jemalloc)' if s['jemalloc'] else ''}."
  )
  written = report.write(runs, workdir, extra_md=f"{intro}\n\n{verdict(summary)}")
  with open(written["files"]["json"], encoding="utf-8") as f:
    merged = json.load(f)
  merged.update(summary)
  with open(written["files"]["json"], "w", encoding="utf-8") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
  return written
