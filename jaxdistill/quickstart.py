"""The quickstart: a real teacher distils into a real student on the built-in corpus.

``jaxdistill quickstart [--workdir DIR]`` runs, on the Python-stdlib corpus:

  1. the teacher: a 4-layer LM trained on CE, cached under ``CACHE/teachers/<key>``
     (key = teacher config + corpus fingerprint + tokenizer hash), so the next
     quickstart loads it like a downloaded checkpoint;
  2. the KD student: a 2-layer LM distilled from it (KL + CE + MiniLM attention
     + hidden-state losses);
  3. the CE student: the same student on CE alone, run long enough to also say
     what CE reaches in the KD student's wall time;
  4. evaluation of all three on the validation split, a table, ``DIR/report.json``,
     ``DIR/report.md`` and ``DIR/val_loss.png``.

The three stages are ordinary configs (``configs/lm_teacher.py``,
``configs/lm_distill.py``, ``configs/lm_baseline.py``) built by the functions
below, so each also runs with ``jaxdistill train``. ``size="test"`` shrinks
everything (a few stdlib files, tiny models) for the tests.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any

from jaxdistill.config import default_config
from jaxdistill.data import corpora
from jaxdistill.errors import JaxdistillError

# The recipe. Measured on 2 CPU cores (REFERENCE.md section 9 and BENCHMARKS.md): the
# teacher must be trained well past what the student reaches alone before KD pays.
FULL = dict(
  vocab=4096,
  seq_len=128,
  batch=16,
  # Rows shuffled within one window covering the whole training split (29,768 rows of 128
  # tokens; measured: +0.3 GB RSS, and filling it tokenises the split once, 5.7 s). The default
  # 1024-row window left each batch drawn from a few long stdlib files: the CE student reached
  # 5.469 val CE in 150 steps with it, 4.964 with 8192 rows, 4.713 with the whole split.
  shuffle_rows=32768,
  teacher=dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024),
  teacher_steps=560,
  teacher_lr=3e-3,
  student=dict(d_model=128, num_layers=2, num_heads=4, d_ff=512),
  student_steps=150,
  student_lr=3e-3,
  eval_every=25,  # the teacher evaluates every 2 * eval_every steps (its forward is dearer)
  eval_batches=8,
  final_eval_batches=48,  # ~98k validation tokens for the final table
  stdlib=dict(stdlib_max_files=0, stdlib_max_file_bytes=0),
)
TEST = dict(
  vocab=384,
  seq_len=32,
  batch=8,
  shuffle_rows=1024,
  teacher=dict(d_model=32, num_layers=2, num_heads=2, d_ff=64),
  teacher_steps=6,
  teacher_lr=1e-2,
  student=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32),
  student_steps=4,
  student_lr=1e-2,
  eval_every=2,
  eval_batches=2,
  final_eval_batches=0,
  stdlib=dict(stdlib_max_files=8, stdlib_max_file_bytes=6000),
)
SIZES = {"full": FULL, "test": TEST}


def _base(size: str) -> Any:
  r = SIZES[size]
  cfg = default_config()
  cfg.data.update(source="stdlib", batch_size=r["batch"], seq_len=r["seq_len"], **r["stdlib"])
  cfg.data.shuffle_rows = r["shuffle_rows"]
  cfg.optim.update(b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0)
  cfg.eval.update(every=r["eval_every"], batches=r["eval_batches"])
  cfg.log.every = 10
  return cfg


def _model(section: Any, r: dict, side: str) -> None:
  section.update(vocab_size=r["vocab"], max_len=r["seq_len"], **r[side])


def _ce_only(cfg: Any) -> None:
  cfg.teacher.source = "none"
  cfg.distill.ce.weight = 1.0
  for key in ("logit", "attention", "hidden"):
    cfg.distill[key].weight = 0.0


def teacher_config(size: str = "full") -> Any:
  """The teacher, trained from scratch on CE (it is the student of its own run)."""
  r, cfg = SIZES[size], _base(size)
  _model(cfg.student, r, "teacher")
  _ce_only(cfg)
  cfg.eval.every = 2 * r["eval_every"]
  steps = r["teacher_steps"]
  cfg.optim.update(steps=steps, lr=r["teacher_lr"], warmup_steps=max(1, int(0.15 * steps)))
  return cfg


def student_config(size: str = "full", kd: bool = True, teacher_path: str = "") -> Any:
  """The student: distilled from a teacher (kd) or trained on CE alone.

  Args:
    size: "full" or "test".
    kd: distil (True) or CE only (False).
    teacher_path: the teacher run's directory; empty: pretrain it inside the run.
  """
  r, cfg = SIZES[size], _base(size)
  _model(cfg.student, r, "student")
  _model(cfg.teacher, r, "teacher")
  steps = r["student_steps"]
  cfg.optim.update(steps=steps, lr=r["student_lr"], warmup_steps=max(1, int(0.15 * steps)))
  d = cfg.distill
  if not kd:
    _ce_only(cfg)
    return cfg
  if teacher_path:
    cfg.teacher.update(source="workdir", path=teacher_path)
  else:  # standalone: train the teacher first in WORKDIR/teacher (cosine, 10% warmup)
    cfg.teacher.update(source="pretrain", pretrain_steps=r["teacher_steps"])
    cfg.teacher.pretrain_lr = r["teacher_lr"]
  # Low temperature, most weight on the teacher: what worked on this corpus.
  d.temperature = 1.0
  d.logit.update(kind="kl", weight=0.9)
  d.ce.weight = 0.1
  d.attention.update(weight=0.1, value_weight=0.1, layer_map="last")
  # Cosine, not MSE: the teacher's residual stream grows to norms where a 0.1-weighted MSE
  # (~70 here) outweighs every other term and eats the clipped gradient; KD then did no better
  # than CE at 150 steps (5.34 vs 5.11 val CE), with cosine it reached 4.49.
  d.hidden.update(kind="cosine", weight=0.1, layer_map="uniform", project=True)
  return cfg


# --- the job ---------------------------------------------------------------------------

REPORT_KEYS = ("val_loss", "val_ppl", "agreement", "kl_to_teacher", "params", "tokens_per_s")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _flat(node: Any, prefix: str = "") -> dict:
  out = {}
  for key, value in node.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# Keys that change the trained teacher. Every value counts, defaults included: a default
# that changes in a later jaxdistill must not reuse a teacher trained under the old one (a new
# config key retrains the teacher once, which is the safe direction).
_KEY_SECTIONS = ("seed", "student", "optim", "data", "distill")
_RUNTIME_ONLY = ("data.num_threads", "data.prefetch")


def _cache_key(cfg: Any, prepared: Any) -> str:
  """Teacher cache key: its training settings, the corpus and the tokenizer."""
  settings = {
    k: v
    for k, v in _flat(cfg).items()
    if k.split(".")[0] in _KEY_SECTIONS and k not in _RUNTIME_ONLY
  }
  blob = json.dumps(
    [settings, prepared.train_fingerprint, prepared.tokenizer_hash], sort_keys=True, default=str
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def get_teacher(cfg: Any, log=print) -> tuple[str, bool]:
  """The teacher's run directory: trained into the cache once, reused afterwards.

  Args:
    cfg: ``teacher_config(...)`` with ``cache_dir`` set.

  Returns:
    (directory holding final_params, metrics.jsonl and summary.json; True if it was cached).
  """
  from jaxdistill import checkpoint, loop
  from jaxdistill.data import pipeline

  prepared = pipeline.prepare(cfg)
  path = os.path.join(corpora.cache_dir(cfg.cache_dir), "teachers", _cache_key(cfg, prepared))
  if os.path.isdir(os.path.join(path, checkpoint.FINAL_PARAMS)):
    log(f"Using the cached teacher {path}")
    return path, True
  # Train into a scratch directory and rename it when complete: an interrupted run leaves
  # no half-trained "cached" teacher behind, and the next quickstart resumes it from its
  # last checkpoint.
  partial = path + ".partial"
  log(f"Training the teacher ({cfg.optim.steps} steps; cached afterwards in {path})")
  if loop.train(cfg, partial).get("preempted"):
    raise Interrupted(partial)
  # Finished: only final_params is needed from now on, not the resumable training state.
  shutil.rmtree(os.path.join(partial, checkpoint.CHECKPOINTS), ignore_errors=True)
  os.replace(partial, path)
  return path, False


class Interrupted(Exception):
  """A stage was stopped by a signal after saving a checkpoint; rerunning resumes it."""


def train_stage(cfg: Any, workdir: str, what: str, log) -> dict:
  """Trains one stage into ``workdir``, or returns its summary if it already finished there.

  Args:
    cfg: a validated training config.
    workdir: the stage's run directory (a rerun after an interruption resumes it).
    what: the stage's name for the log.
    log: a print-like function.

  Returns:
    ``loop.train``'s summary plus ``train_s`` (median step time x steps; what equal-time
    comparisons use) and, when it ran here, ``wall_s``.

  Raises:
    Interrupted: the run was stopped by a signal after saving a checkpoint.
  """
  from jaxdistill import loop

  done = os.path.join(workdir, "summary.json")
  if os.path.exists(done):  # a rerun after an interruption: keep the stages that finished
    with open(done, encoding="utf-8") as f:
      summary = json.load(f)
    if not summary.get("preempted") and summary.get("last_step") == cfg.optim.steps:
      log(f"{what}: already done in {workdir}")
      summary["train_s"] = summary["median_step_s"] * cfg.optim.steps
      return summary
  log(f"{what}: {cfg.optim.steps} steps in {workdir}")
  start = time.perf_counter()
  summary = loop.train(cfg, workdir)
  if summary.get("preempted"):
    raise Interrupted(workdir)
  summary["train_s"] = summary["median_step_s"] * cfg.optim.steps
  summary["wall_s"] = time.perf_counter() - start
  return summary


def evaluate_runs(runs: dict, teacher_dir: str, cfg: Any, limit: int) -> dict:
  """Loads every run's final params and evaluates them (and the teacher) together.

  Args:
    runs: name -> run directory holding final_params (students of ``cfg.student``'s shape).
    teacher_dir: the teacher's run directory.
    cfg: a student config (model shapes, policies, data, mesh).
    limit: validation batches (0 = the whole split).

  Returns:
    ``evaluate.evaluate``'s name -> metrics, plus "teacher".
  """
  from jaxdistill import checkpoint, evaluate, models, precision, sharding

  def module(side):
    policy = precision.parse_policy(cfg[side].policy, f"{side}.policy")
    return models.build(cfg[side], policy, side)

  mesh = sharding.make_mesh(cfg.mesh)
  seq_len = cfg.data.seq_len
  teacher, student = module("teacher"), module("student")
  load = lambda module, d: evaluate.load_params(
    module, os.path.join(d, checkpoint.FINAL_PARAMS), mesh, seq_len
  )
  students = {name: (student, load(student, d)) for name, d in runs.items()}
  batches = evaluate.validation_batches(cfg, limit)
  return evaluate.evaluate(students, batches, mesh, teacher=(teacher, load(teacher, teacher_dir)))


def run(workdir: str, size: str = "full", cache_dir: str = "", log=print) -> dict:
  """The quickstart job (see the module docstring). Returns the report dict.

  Args:
    workdir: where the students' runs and the report go (must not hold a report).
    size: "full" (the real job) or "test" (seconds; for tests).
    cache_dir: the cache directory ("" = the default, see corpora.cache_dir).
  """
  from jaxdistill import data as data_lib

  if os.path.exists(os.path.join(workdir, "report.json")):
    raise JaxdistillError(f"{workdir!r} already holds a quickstart report; pass a new --workdir")
  start, r = time.perf_counter(), SIZES[size]
  if "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
    hint = (
      f"LD_PRELOAD={JEMALLOC} " if os.path.exists(JEMALLOC) else "(apt-get install libjemalloc2) "
    )
    log(
      "Note: on some CPUs runs are up to 2x faster with jemalloc (measured on an AMD EPYC, no "
      f"difference on an Intel Xeon): {hint}jaxdistill quickstart ..."
    )
  t_cfg = teacher_config(size)
  t_cfg.cache_dir = cache_dir
  data_lib.check(t_cfg)  # builds the corpus and the tokenizer into the cache (once)
  teacher_dir, cached = get_teacher(t_cfg, log)
  kd = student_config(size, kd=True, teacher_path=teacher_dir)
  ce = student_config(size, kd=False)
  for cfg in (kd, ce):
    cfg.cache_dir = cache_dir
  runs = {"kd_student": os.path.join(workdir, "kd_student")}
  summaries = {"kd_student": train_stage(kd, runs["kd_student"], "KD student", log)}
  runs["ce_student"] = os.path.join(workdir, "ce_student")
  summaries["ce_student"] = train_stage(ce, runs["ce_student"], "CE student (same steps)", log)
  # CE alone in the KD student's training time (teacher forward included, teacher training not).
  # A KD step does a CE step's work plus the teacher forward: clamp noisy timings (tiny runs)
  # to a plausible range.
  ratio = summaries["kd_student"]["train_s"] / summaries["ce_student"]["train_s"]
  ratio = min(max(ratio, 1.0), 4.0)
  eq = student_config(size, kd=False)
  eq.cache_dir = cache_dir
  eq.optim.steps = max(1, round(ce.optim.steps * ratio))
  eq.optim.warmup_steps = max(1, int(0.15 * eq.optim.steps))
  runs["ce_student_equal_time"] = os.path.join(workdir, "ce_student_equal_time")
  summaries["ce_student_equal_time"] = train_stage(
    eq, runs["ce_student_equal_time"], "CE student (same wall time as KD)", log
  )
  log("Evaluating on the validation split")
  results = evaluate_runs(runs, teacher_dir, kd, r["final_eval_batches"])
  with open(os.path.join(teacher_dir, "summary.json"), encoding="utf-8") as f:
    summaries["teacher"] = json.load(f)
  report = _report(results, summaries, kd, teacher_dir, cached, time.perf_counter() - start)
  write_report(report, workdir, {**runs, "teacher": teacher_dir})
  log(format_table(report))
  log(f"Wrote {os.path.join(workdir, 'report.md')} and report.json")
  return report


def _report(results, summaries, cfg, teacher_dir, cached, wall_s) -> dict:
  report = {}
  for name, m in results.items():
    s = summaries[name]
    row = dict(m, params=s["student_params"], tokens_per_s=s["tokens_per_s"], steps=s["steps"])
    row.setdefault("agreement", 1.0)  # the teacher against itself
    row.setdefault("kl_to_teacher", 0.0)
    if "train_s" in s:
      row["train_s"] = s["train_s"]
    report[name] = row
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


def verdict(report: dict) -> str:
  """One honest paragraph on what distillation bought."""
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


ROWS = ("teacher", "kd_student", "ce_student", "ce_student_equal_time")


def format_table(report: dict) -> str:
  """The report as a Markdown table (also what the command prints)."""
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


def plot_curves(run_dirs: dict[str, str], path: str) -> None:
  """PNG of each run's ``eval/loss`` rows from its metrics.jsonl, against the step."""
  import matplotlib

  matplotlib.use("Agg")  # no display needed
  import matplotlib.pyplot as plt

  from jaxdistill.metrics import read_jsonl

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in ROWS:
    rows = [
      r for r in read_jsonl(os.path.join(run_dirs[name], "metrics.jsonl")) if "eval/loss" in r
    ]
    if rows:
      ax.plot([r["step"] for r in rows], [r["eval/loss"] for r in rows], marker=".", label=name)
  ax.set(xlabel="training step", ylabel="validation cross-entropy (nats)", title="Validation loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_report(report: dict, workdir: str, run_dirs: dict[str, str]) -> None:
  """Writes report.json, val_loss.png and report.md into ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  plot_curves(run_dirs, os.path.join(workdir, "val_loss.png"))
  s = report["summary"]
  md = [
    "# jaxdistill quickstart report",
    "",
    f"Corpus: {s['corpus']}; {s['validation_tokens']:,} validation tokens. "
    f"Teacher {'loaded from the cache' if s['teacher_cached'] else 'trained in this run'} "
    f"({s['teacher_dir']}). Wall time {s['wall_s'] / 60:.1f} min"
    f"{' (jemalloc)' if s['jemalloc'] else ''}.",
    "",
    format_table(report),
    "",
    verdict(report),
    "",
    "![validation loss](val_loss.png)",
    "",
  ]
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md))
  with open(os.path.join(workdir, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, sort_keys=True)
