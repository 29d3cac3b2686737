"""``jaxdistill quickstart --task arithmetic``: token KD, sequence KD and on-policy side by side.

On the built-in arithmetic task (``data.source=task``; recipe ``configs/on_policy.py``):

  1. the teacher, trained on the reference solutions once and cached (as the LM quickstart's)
  2. the teacher writes solutions of the training problems; wrong answers are dropped
     (``precompute --generate`` with the ``tasks.check`` verifier) -> WORKDIR/teacher_data
  3. three students from the same init, the same steps: token KD (forward KL on the reference
     solutions), sequence KD (CE on the verified teacher-written set) and on-policy GKD
     (lmbda 0.5, JSD beta 0.5)
  4. ``jaxdistill eval`` of each against the teacher: held-out CE, exact match of greedy
     answers, agreement, the student's acceptance rate as the teacher's draft
  5. WORKDIR/report.md + report.json: the general report of the runs and this job's table
     (teacher first), with a few of each model's answers

A sequence-KD set that keeps no sample (a teacher that gets nothing right, e.g. at the test
size) leaves that student out, said in the report. The full study (six students, equal steps
and equal wall time) is ``benchmarks/sequence_kd.py``.
"""

import json
import os
import time
from typing import Any

from jaxdistill import config as config_lib
from jaxdistill import quickstart
from jaxdistill.errors import JaxdistillError

RECIPE = "on_policy"
STUDENTS = {"token_kd": "token_kd", "seq_kd": "seq_kd", "on_policy": "gkd"}


def _config(variant: str, size: str, cache_dir: str) -> Any:
  cfg = config_lib.load_config(f"{RECIPE}:{variant},{size}")
  cfg.cache_dir = cache_dir
  return cfg


def run(workdir: str, size: str = "full", cache_dir: str = "", log=print) -> dict:
  """The job (see the module docstring). Returns {"rows": name -> metrics, "data": the
  teacher-written set's counts, "wall_s"}.

  Args:
    workdir: where the runs, the set and the report go (must not hold a report).
    size: "full" or "test" (seconds; for tests).
    cache_dir: the cache directory ("" = the default).
  """
  from jaxdistill.precompute import generated
  from jaxdistill.report import write as report

  if os.path.exists(os.path.join(workdir, "report.json")):
    raise JaxdistillError(f"{workdir!r} already holds a quickstart report; pass a new --workdir")
  start = time.perf_counter()
  teacher_dir, _ = quickstart.get_teacher(_config("teacher", size, cache_dir), log)
  data_cfg = config_lib.load_config(f"seq_kd:data,{size}")
  data_cfg.cache_dir = cache_dir
  data_cfg.teacher.path = teacher_dir
  data_dir = os.path.join(workdir, "teacher_data")
  log(f"The teacher writes {data_cfg.precompute.generate.prompts} x 4 solutions (verified)")
  made = generated.run(data_cfg, data_dir)
  data = {"rows": made["rows"], **made["drops"]}
  runs, summaries = {}, {}
  for name, variant in STUDENTS.items():
    cfg = _config(variant, size, cache_dir)
    if cfg.teacher.source != "none":
      cfg.teacher.update(source="workdir", path=teacher_dir)
    if name == "seq_kd":
      if not data["rows"]:
        log("seq_kd: the teacher-written set kept no sample; this student is left out")
        continue
      cfg.data.task_train_files = os.path.join(data_dir, "shard-*.arrayrecord")
    runs[name] = os.path.join(workdir, name)
    summaries[name] = quickstart.train_stage(cfg, runs[name], name, log)
  log("Evaluating on the held-out problems")
  results = quickstart.evaluate_runs(runs, teacher_dir, 0)
  rows = {"teacher": results["teacher"]}
  rows.update({name: dict(results[name], train_s=summaries[name]["train_s"]) for name in runs})
  wall_s = time.perf_counter() - start
  extra = table_md(rows, data, wall_s)
  written = report.write(runs, workdir, extra_md=extra)
  with open(written["files"]["json"], encoding="utf-8") as f:
    merged = json.load(f)
  merged["task_quickstart"] = {"rows": rows, "data": data, "wall_s": wall_s}
  with open(written["files"]["json"], "w", encoding="utf-8") as f:
    json.dump(merged, f, indent=2, sort_keys=True)
  log(extra)
  log(f"Wrote {os.path.join(workdir, 'report.md')} and report.json")
  return {"rows": rows, "data": data, "wall_s": wall_s}


def table_md(rows: dict[str, dict], data: dict, wall_s: float) -> str:
  """This job's Markdown: the side-by-side table and each model's first answers."""
  fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
  lines = [
    "### Arithmetic: token KD vs sequence KD vs on-policy",
    "",
    "| model | held-out CE | exact match | agreement | draft acceptance | train s |",
    "|---|---|---|---|---|---|",
  ]
  for name, m in rows.items():
    cells = [name, fmt(m.get("val_loss"), ".3f"), fmt(m.get("exact_match"), ".1%")]
    cells += [fmt(m.get("agreement"), ".3f"), fmt(m.get("draft_acceptance"), ".3f")]
    cells += [fmt(m.get("train_s"), ".0f")]
    lines.append("| " + " | ".join(cells) + " |")
  drops = ", ".join(f"{k} {v}" for k, v in data.items() if k != "rows" and v) or "none"
  lines += [
    "",
    f"Teacher-written set: {data['rows']} verified samples kept (dropped: {drops}). "
    f"Exact match: greedy answers to held-out problems checked. Wall time {wall_s / 60:.1f} min.",
    "",
  ]
  for name, m in rows.items():
    for prompt, completion in m.get("samples", [])[:2]:
      lines.append(f"- {name}: `{prompt}` -> `{completion.strip()}`")
  return "\n".join(lines)
