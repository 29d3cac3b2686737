"""The quickstart: a real teacher distils into a real student on built-in real data.

``jaxdistill quickstart [--workdir DIR]`` (``--task text``, the default) runs, on the
Python-stdlib corpus:

  1. the teacher: a 4-layer LM trained on CE, cached under ``CACHE/teachers/<key>``
     (key = teacher config + corpus fingerprint + tokenizer hash), so the next
     quickstart loads it like a downloaded checkpoint;
  2. the KD student: a 2-layer LM distilled from it (KL + CE + MiniLM attention
     + hidden-state losses);
  3. the CE student: the same student on CE alone, run long enough to also say
     what CE reaches in the KD student's wall time;
  4. ``jaxdistill eval --latency`` of all three against the teacher on the validation split;
     for the LMs, the teacher's, the KD student's and the CE student's time to first token
     and decode tokens/s, timed together, and their greedy continuations of ``PROMPTS``
     (``generation``); and ``jaxdistill report`` of them with the quickstart's verdict and
     generation section
     (``jaxdistill.report.quickstart``: ``DIR/report.md`` and ``report.json``, the table,
     training, validation and accuracy-latency PNGs).

``--task vision`` runs the same four stages with the classic CNN pair on the built-in digits
(5,000 real MNIST digits; recipe ``configs/cnn_digits.py``): the teacher is keyed by its config
and the digits file's hash, and the report gives test accuracy, top-5, agreement, KL and
calibration error instead of CE / perplexity.

This module only orchestrates. Every hyper-parameter is in the recipe, the config file
``configs/quickstart.py`` (variants ``teacher``, ``distill``, ``baseline``, each also
``,test``), so each stage also runs with ``jaxdistill train``. ``size="test"`` shrinks
everything (a few stdlib files, tiny models) for the tests.

The recipe is one of the configs the package ships (``config.configs_dir``): the source
checkout's top-level ``configs/`` (an editable install, ``make setup``), or the
``jaxdistill/configs/`` a wheel installs (a plain ``pip install .``), so the quickstart runs
from any directory either way.
"""

import functools
import hashlib
import json
import os
import shutil
import time
from typing import Any

from jaxdistill.config import config_module, configs_dir
from jaxdistill.data import corpora
from jaxdistill.errors import JaxdistillError

# The recipe of each task: the text LM pair (the default) and the vision CNN pair.
RECIPES = {
  "text": os.path.join(configs_dir(), "quickstart.py"),
  "vision": os.path.join(configs_dir(), "cnn_digits.py"),
}
RECIPE = RECIPES["text"]
SIZES = ("full", "test")
TASKS = tuple(RECIPES)


def recipe(task: str = "text"):
  """The recipe module of ``task`` (``teacher_config``, ``student_config``, ``SIZES``):
  ``configs/quickstart.py`` (text) or ``configs/cnn_digits.py`` (vision); loaded once, so
  ``recipe()`` and ``recipe("text")`` are the same module.

  Raises:
    JaxdistillError: the file is missing (an install without the source checkout).
  """
  return _load_recipe(task)


@functools.cache
def _load_recipe(task: str):
  path = RECIPES[task]
  if not os.path.isfile(path):
    raise JaxdistillError(
      f"the quickstart's recipe {path} is missing: reinstall jaxdistill (`pip install .` ships "
      "the configs) or run from a source checkout (`pip install -e .`, `make setup`)"
    )
  return config_module(path)


def teacher_config(size: str = "full", task: str = "text") -> Any:
  """The recipe's teacher config (``configs/quickstart.py:teacher[,test]``), not validated."""
  return recipe(task).teacher_config(size)


def student_config(
  size: str = "full", kd: bool = True, teacher_path: str = "", task: str = "text"
) -> Any:
  """The recipe's student config, distilled (kd) or CE alone; not validated.

  Args:
    size: "full" or "test".
    kd: distil (True) or CE only (False).
    teacher_path: the teacher run's directory; empty: pretrain it inside the run.
    task: "text" or "vision".
  """
  return recipe(task).student_config(size, kd=kd, teacher_path=teacher_path)


# --- the job ---------------------------------------------------------------------------

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


def _cache_key(cfg: Any, data_identity: list) -> str:
  """Teacher cache key: its training settings and the data (corpus and tokenizer, or images)."""
  settings = {
    k: v
    for k, v in _flat(cfg).items()
    if k.split(".")[0] in _KEY_SECTIONS and k not in _RUNTIME_ONLY
  }
  blob = json.dumps([settings, *data_identity], sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _data_identity(cfg: Any) -> list:
  """What identifies the teacher's training data: the corpus and tokenizer hashes (text), the
  built-in digits file's hash (vision)."""
  if cfg.student.arch == "transformer":
    from jaxdistill.data import text as pipeline

    prepared = pipeline.prepare(cfg)
    return [prepared.train_fingerprint, prepared.tokenizer_hash]
  from jaxdistill.data import digits

  with open(digits.csv_path(), "rb") as f:
    return [cfg.data.source, hashlib.sha256(f.read()).hexdigest()]


def get_teacher(cfg: Any, log=print) -> tuple[str, bool]:
  """The teacher's run directory: trained into the cache once, reused afterwards.

  Args:
    cfg: ``teacher_config(...)`` with ``cache_dir`` set.

  Returns:
    (directory holding final_params, metrics.jsonl and summary.json; True if it was cached).
  """
  from jaxdistill.train import checkpoint, loop

  key = _cache_key(cfg, _data_identity(cfg))
  path = os.path.join(corpora.cache_dir(cfg.cache_dir), "teachers", key)
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
  from jaxdistill.train import loop

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


def evaluate_runs(runs: dict, teacher_dir: str, limit: int) -> dict:
  """``jaxdistill eval --latency --teacher TEACHER`` of every run: each writes its
  ``eval/validation.json`` (what ``jaxdistill report`` reads) against the same teacher, so
  the CE students also get agreement and KL.

  Args:
    runs: name -> run directory holding final_params.
    teacher_dir: the teacher's run directory.
    limit: validation batches (0 = the whole split).

  Returns:
    ``evaluate.evaluate``'s name -> metrics, plus "teacher".
  """
  from jaxdistill.evaluation import job as eval_run

  results = {}
  for name, d in runs.items():
    out = eval_run.evaluate_workdir(
      d, batches=limit, with_latency=True, teacher_dir=teacher_dir, generate_repeats=0
    )  # the forward's latency; generation is timed once for all models (``generation``)
    results[name] = out["models"]["student"]
    results["teacher"] = out["models"]["teacher"]
  return results


# The generation section: greedy continuations of PROMPTS by each LM, and its timing (few,
# short requests: it adds seconds to the job; docs/evaluation.md).
PROMPTS = ("def", "import", "class")
GENERATION_RUNS = ("kd_student", "ce_student")  # with the teacher
# 16-token prompts: the width (one prefill bucket) of the short sample prompts, so the samples
# reuse the programs the timing compiled.
GENERATE_PROMPT_TOKENS, GENERATE_NEW_TOKENS = 16, 32
GENERATE_REPEATS = 3


def generation(runs: dict[str, str]) -> dict:
  """Times the final model of each run generating and samples its continuations of
  ``PROMPTS``, all on one device (the teacher's run too: its model is that run's student).

  ``evaluation.latency.time_generation`` at batch 1 and 32 (``GENERATE_PROMPT_TOKENS``-token
  random prompts, ``GENERATE_NEW_TOKENS`` new tokens: 16 + 16 at the test size's 32
  positions), then each prompt alone through the same warm samplers, greedy, for as many new
  tokens and without stop tokens: the programs the timing compiled at batch 1 serve them.

  Returns:
    {"timed": name -> ``time_generation``'s block, "samples": name -> the continuations'
    texts in ``PROMPTS``' order, "new_tokens": name -> the new tokens of each}.
  """
  from jaxdistill.data import tokenizer as tokenizer_lib
  from jaxdistill.evaluation import job as eval_run
  from jaxdistill.evaluation import latency
  from jaxdistill.generate import timing

  entries, tokenizers = {}, {}
  for name, d in runs.items():
    entries[name] = eval_run.load_student(d)[1:]
    tokenizers[name] = tokenizer_lib.load(os.path.join(d, "tokenizer.json"))
  samplers = latency.samplers(entries, tokenizers)
  timed = latency.time_generation(
    samplers, (1, 32), GENERATE_PROMPT_TOKENS, GENERATE_NEW_TOKENS, GENERATE_REPEATS
  )
  out = {"timed": timed, "samples": {}, "new_tokens": {}}
  for name, s in samplers.items():
    n = timing.lengths(s.config, GENERATE_PROMPT_TOKENS, GENERATE_NEW_TOKENS)[1]
    done = [s.generate([p], max_new_tokens=n, stop_tokens=())[0] for p in PROMPTS]
    out["samples"][name] = [c.text for c in done]
    out["new_tokens"][name] = n
  return out


def run(
  workdir: str, size: str = "full", cache_dir: str = "", log=print, task: str = "text"
) -> dict:
  """The quickstart job (see the module docstring). Returns the report dict.

  Args:
    workdir: where the students' runs and the report go (must not hold a report).
    size: "full" (the real job) or "test" (seconds; for tests).
    cache_dir: the cache directory ("" = the default, see corpora.cache_dir).
    task: "text" (LMs on the built-in corpus) or "vision" (CNNs on the built-in digits).
  """
  from jaxdistill import data as data_lib
  from jaxdistill.report import quickstart as quickstart_report

  if os.path.exists(os.path.join(workdir, "report.json")):
    raise JaxdistillError(f"{workdir!r} already holds a quickstart report; pass a new --workdir")
  start, r = time.perf_counter(), recipe(task).SIZES[size]
  if "jemalloc" not in os.environ.get("LD_PRELOAD", ""):
    hint = (
      f"LD_PRELOAD={JEMALLOC} " if os.path.exists(JEMALLOC) else "(apt-get install libjemalloc2) "
    )
    log(
      "Note: on some CPUs runs are up to 2x faster with jemalloc (measured on an AMD EPYC, no "
      f"difference on an Intel Xeon): {hint}jaxdistill quickstart ..."
    )
  t_cfg = teacher_config(size, task)
  t_cfg.cache_dir = cache_dir
  data_lib.check(t_cfg)  # builds the corpus and the tokenizer into the cache (once)
  teacher_dir, cached = get_teacher(t_cfg, log)
  kd = student_config(size, kd=True, teacher_path=teacher_dir, task=task)
  ce = student_config(size, kd=False, task=task)
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
  eq = student_config(size, kd=False, task=task)
  eq.cache_dir = cache_dir
  eq.optim.steps = max(1, round(ce.optim.steps * ratio))
  eq.optim.warmup_steps = max(1, int(0.15 * eq.optim.steps))
  runs["ce_student_equal_time"] = os.path.join(workdir, "ce_student_equal_time")
  summaries["ce_student_equal_time"] = train_stage(
    eq, runs["ce_student_equal_time"], "CE student (same wall time as KD)", log
  )
  log("Evaluating on the validation split")
  results = evaluate_runs(runs, teacher_dir, r["final_eval_batches"])
  with open(os.path.join(teacher_dir, "summary.json"), encoding="utf-8") as f:
    summaries["teacher"] = json.load(f)
  gen = None
  if task == "text":  # the generation section: the LMs' speed and samples
    log("Timing generation and sampling greedy continuations")
    gen = generation({"teacher": teacher_dir, **{k: runs[k] for k in GENERATION_RUNS}})
  wall_s = time.perf_counter() - start
  summary = quickstart_report.build(results, summaries, kd, teacher_dir, cached, wall_s)
  if gen is not None:
    summary["generation"] = quickstart_report.generation(summary, gen, PROMPTS)
  written = quickstart_report.write(summary, workdir, runs)
  log(written["table"])
  log(f"Wrote {os.path.join(workdir, 'report.md')} and report.json")
  return summary
