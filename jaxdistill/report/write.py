"""Reports over finished runs: ``jaxdistill report W1 W2 ... --output DIR`` (``write``).

Reads each run's workdir: ``config.json``, ``metrics.jsonl``, ``summary.json`` and the
evaluation ``eval/<name>.json`` that ``jaxdistill eval`` writes (default name "validation").
Writes into DIR:

  report.md, report.json   a table of the teacher(s) and the students: params, bytes, the
                           quality (val CE / perplexity for language models, accuracy for
                           classifiers, cosine to the teacher for encoders), agreement,
                           KL(T||S), training throughput, latency at batch 1 and at the serving
                           batch and compiled memory (with ``eval --latency``), and whether the
                           model is on the Pareto front of quality against serving latency
  training_curves.png      a panel per loss term logged in metrics.jsonl, a line per run
  validation.png           each run's periodic evaluation and, marked, the table's measurement
                           (they may use different batches; the caption says which)
  quality_latency.png      quality against latency at both batch sizes (against params when no
                           run has a latency block), the Pareto front ringed

Nothing here trains or evaluates. The teacher's row comes from the runs' evaluations (its
``teacher`` entry), once per distinct teacher; a run that is another run's teacher
(``teacher.path``) is that teacher's row.
"""

import dataclasses
import json
import math
import os
import tempfile
from typing import Any

from jaxdistill import paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.report import plots as report_plots
from jaxdistill.report import table as report_table

pareto_front = report_table.pareto_front  # (the table's; also reachable from here)

FILES = {
  "md": "report.md",
  "json": "report.json",
  "training": "training_curves.png",
  "validation": "validation.png",
  "scatter": "quality_latency.png",
}
# The periodic evaluation's metric (metrics.jsonl) and its label, per task.
CURVE = {
  "text": ("eval/loss", "validation cross-entropy (nats)"),
  "vision": ("eval/accuracy", "validation accuracy"),
  "encoder": ("eval/loss", "validation loss"),
}
# metrics.jsonl keys that are not loss terms.
NOT_LOSSES = ("train/lr", "train/grad_norm", "train/nonfinite", "train/overflow")
NOT_LOSSES += ("train/loss_scale", "distill/temperature")


@dataclasses.dataclass
class Run:
  """One run's files, read."""

  name: str
  workdir: str
  config: dict
  summary: dict
  evaluation: dict
  metrics: list[dict]

  @property
  def task(self) -> str:
    return self.evaluation.get("task") or (
      "text" if self.config["student"].get("arch", "transformer") == "transformer" else "vision"
    )


def _read_json(path: str, what: str) -> dict:
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise JaxdistillError(f"{path} is not valid JSON ({e}); {what}") from None


def _metrics(path: str) -> list[dict]:
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def load_run(name: str, workdir: str, eval_name: str = "validation") -> Run:
  """A run's config, summary, metrics and evaluation.

  Raises:
    JaxdistillError: ``workdir`` is not a run (no config.json) or has no eval/<eval_name>.json.
  """
  config_path = paths.join(workdir, "config.json")
  if not paths.isfile(config_path):
    raise JaxdistillError(f"{workdir!r} is not a run directory (no config.json)")
  eval_path = paths.join(workdir, "eval", f"{eval_name}.json")
  if not paths.isfile(eval_path):
    raise JaxdistillError(
      f"{workdir!r} has no eval/{eval_name}.json: run `jaxdistill eval --workdir {workdir}` "
      "first, or pass --eval_name"
    )
  summary_path = paths.join(workdir, "summary.json")
  summary = _read_json(summary_path, "rerun the training") if paths.isfile(summary_path) else {}
  return Run(
    name=name,
    workdir=workdir,
    config=_read_json(config_path, "is it a jaxdistill run?"),
    summary=summary,
    evaluation=_read_json(eval_path, f"rerun `jaxdistill eval --workdir {workdir}`"),
    metrics=_metrics(paths.join(workdir, "metrics.jsonl")),
  )


def load_runs(runs: dict[str, str], eval_name: str = "validation") -> list[Run]:
  """Every run, checked to be of one task (language model, classifier or encoder)."""
  if not runs:
    raise JaxdistillError("report needs at least one run workdir")
  loaded = [load_run(name, workdir, eval_name) for name, workdir in runs.items()]
  tasks = {r.task for r in loaded}
  if len(tasks) > 1:
    kinds = ", ".join(f"{r.name}: {r.task}" for r in loaded)
    raise JaxdistillError(f"cannot compare runs of different tasks in one report ({kinds})")
  return loaded


def check_output(output: str) -> None:
  """``output`` must be (or become) a directory without a report in it."""
  if paths.exists(output) and not paths.isdir(output):
    raise JaxdistillError(f"--output {output!r} is a file; pass a directory")
  if paths.exists(paths.join(output, FILES["md"])):
    raise JaxdistillError(f"{output!r} already holds a report.md; pass a new --output")


def _number(value) -> float:
  """A metrics.jsonl value as a float (non-finite values are stored as strings)."""
  return float(value)


def _series(rows: list[dict], key: str) -> report_plots.Curve:
  rows = [r for r in rows if key in r]
  return [r["step"] for r in rows], [_number(r[key]) for r in rows]


def loss_keys(runs: list[Run]) -> list[str]:
  """The loss terms logged by any run: train/loss first, then task/* and distill/*."""
  keys = {k for r in runs for row in r.metrics for k in row}
  terms = sorted(
    k for k in keys if k.split("/")[0] in ("task", "distill", "train") and k not in NOT_LOSSES
  )
  return sorted(terms, key=lambda k: (k != "train/loss", not k.startswith("task/"), k))


def _amount(runs: list[Run]) -> str:
  """How much the table's evaluation read, from its counts: "1,000 images", "" if unknown."""
  student = runs[0].evaluation.get("models", {}).get("student", {})
  for unit in ("images", "tokens", "sentences"):
    if student.get(unit):
      return f"{student[unit]:,} {unit}"
  return ""


def _whole_split(runs: list[Run], split: str) -> str:
  """ "the whole validation split (1,000 images)": what 0 batches means (eval.batches and
  ``eval --batches``: 0 = all of it)."""
  amount = _amount(runs)
  return f"the whole {split} split" + (f" ({amount})" if amount else "")


def _validation_caption(runs: list[Run], metric: str) -> str:
  """Says which batches the curves and the markers measure, and whether they differ."""
  evals = {r.name: r.config.get("eval", {}) for r in runs}
  periodic = {name: e.get("batches") for name, e in evals.items() if e.get("every")}
  data = runs[0].evaluation.get("data", {})
  n, overrides = data.get("batches", 0), data.get("overrides") or []
  split = data.get("split", "validation")
  counts = sorted(set(periodic.values()))
  if counts == [0]:  # the whole split: the same data as the table's when it reads it all too
    lines = _whole_split(runs, split) if n == 0 and not overrides else f"the whole {split} split"
  elif len(counts) == 1:
    lines = f"the first {counts[0]} {split} batches"
  else:
    each = ", ".join(f"{k}: {v or 'the whole split'}" for k, v in periodic.items())
    lines = f"the first N {split} batches ({each})"
  table = f"the first {n} batches" if n else _whole_split(runs, split)
  where = f"{data.get('source', '?')} {split}"
  where += f" with {', '.join(overrides)}" if overrides else ""
  caption = (
    f"Lines: the periodic `{metric}` during training on {lines} (config.json eval.batches). "
    f"Markers (◆): the table's measurement (eval JSON) on {table} of {where}, at the run's "
    "last step; dashed: a teacher's table value."
  )
  if not counts:
    return (
      "No run logged a periodic evaluation (eval.every = 0). Markers (◆): the table's "
      f"measurement (eval JSON) on {table} of {where}, at the run's last step; dashed: a "
      "teacher's table value."
    )
  # Equal counts read the same batches (0: all of them), unless the table's data was changed.
  if counts != [n] or overrides:
    caption += " They measure different batches, so a line's end need not meet its marker."
  return caption


def _data_note(runs: list[Run]) -> str:
  """A warning when the runs' evaluations read different data (their rows don't compare)."""
  seen = {json.dumps(r.evaluation.get("data", {}), sort_keys=True) for r in runs}
  if len(seen) == 1:
    return ""
  each = "; ".join(f"{r.name}: {json.dumps(r.evaluation.get('data', {}))}" for r in runs)
  return (
    f"**Warning**: the runs' evaluations read different data, so their rows do not compare "
    f"({each})."
  )


def _plots(runs: list[Run], rows: list[dict], axis: dict, output: str) -> dict[str, str]:
  """Draws the three PNGs; returns {kind: caption}."""
  task, color = runs[0].task, report_plots.colors([r["name"] for r in rows])
  keys = loss_keys(runs)
  series = {k: {r.name: _series(r.metrics, k) for r in runs if any(k in m for m in r.metrics)}
            for k in keys}  # fmt: skip
  path = os.path.join(output, FILES["training"])
  report_plots.training_curves(series, path, "Training losses", color)
  metric, label = CURVE[task]
  curves = {r.name: _series(r.metrics, metric) for r in runs}
  quality = axis["quality"] if axis["quality"] != "cosine_to_teacher" else "val_loss"
  measured = [r for r in rows if r.get(quality) is not None]
  # A teacher from the evaluations has no training step here: a horizontal reference line.
  finals = {r["name"]: (r["step"], r[quality]) for r in measured if r["step"] is not None}
  levels = {r["name"]: r[quality] for r in measured if r["step"] is None}
  path = os.path.join(output, FILES["validation"])
  report_plots.validation_curves(curves, finals, label, path, levels, color)
  path = os.path.join(output, FILES["scatter"])
  report_plots.quality_scatter(
    axis["panels"], axis["ylabel"], axis["higher_is_better"], path, color
  )
  return {
    "training": (
      "Training losses as logged in metrics.jsonl (every log.every steps): train/loss is the "
      "weighted total; the other panels are the unweighted terms (their weights are the "
      "weight/* keys)."
    ),
    "validation": _validation_caption(runs, metric),
    "scatter": axis["caption"],
  }


def _markdown(report: dict, captions: dict, extra_md: str) -> str:
  data, amount = report["data"], report.get("amount", "")
  batches = data.get("batches", 0)
  runs = "\n".join(
    f"- **{r['name']}**: `{r['workdir']}` (step {r['step']}, {r['params_source']})"
    if r["step"] is not None
    else f"- **{r['name']}**: `{r['workdir'] or '?'}`, measured in the students' evaluations"
    for r in report["rows"]
  )
  md = [
    "# jaxdistill report",
    "",
    f"Evaluation `eval/{report['eval_name']}.json`: {data.get('source', '?')} "
    f"{data.get('split', 'validation')}, {f'{batches} batches' if batches else 'the whole split'}"
    f"{f' ({amount})' if amount else ''}; device {report.get('device', '?')}.",
    "",
    runs,
    "",
    *([report["data_note"], ""] if report["data_note"] else []),
    report["table"],
    "",
    report["pareto_note"],
    "",
  ]
  if extra_md:
    md += [extra_md.strip(), ""]
  for kind, title in (("training", "Training"), ("validation", "Validation"), ("scatter", "")):
    title = title or ("Quality and latency" if report["pareto"]["x"] != "params" else "Quality")
    md += [f"## {title}", "", f"![{kind}]({FILES[kind]})", "", captions[kind], ""]
  return "\n".join(md)


def build(runs: dict[str, str], eval_name: str = "validation") -> tuple[dict, list[Run], dict]:
  """The report dict (no files written), the runs read, and the quality plot's axes.

  Returns:
    ({"eval_name", "task", "data", "device", "rows": [row dicts, teachers first],
      "pareto": {"x", "quality", "higher_is_better"}, "pareto_note", "table"}, runs, axis).
  """
  loaded = load_runs(runs, eval_name)
  rows, axis = report_table.rows_for(loaded)
  first = loaded[0].evaluation
  report = {
    "eval_name": eval_name,
    "task": loaded[0].task,
    "data": first.get("data", {}),
    "amount": _amount(loaded),  # what the table's evaluation read, e.g. "1,000 images"
    "device": first.get("device_kind") or first.get("device", "?"),
    "rows": rows,
    "pareto": {k: axis[k] for k in ("x", "quality", "higher_is_better")},
    "pareto_note": axis["note"],
    "data_note": _data_note(loaded),
    "table": report_table.format_table(rows, loaded[0].task),
  }
  return report, loaded, axis


def write(
  runs: dict[str, str], output: str, eval_name: str = "validation", extra_md: str = ""
) -> dict:
  """Writes the report of ``runs`` into ``output`` (see the module docstring).

  Args:
    runs: display name -> run workdir, in the table's order.
    output: a new directory, or an existing one without a report.md.
    eval_name: which evaluation to read (``W/eval/<eval_name>.json``).
    extra_md: Markdown put under the table (e.g. the quickstart's verdict).

  Returns:
    The report dict (also in report.json), with "files": kind -> path written.

  Raises:
    JaxdistillError: a bad workdir, a missing evaluation, mixed tasks, or a bad ``output``.
  """
  check_output(output)
  report, loaded, axis = build(runs, eval_name)
  paths.makedirs(output)
  # matplotlib writes local files: a remote output's PNGs are drawn locally, then uploaded.
  with tempfile.TemporaryDirectory() as tmp:
    drawn = tmp if paths.is_remote(output) else output
    captions = _plots(loaded, report["rows"], axis, drawn)
    if drawn != output:
      paths.copytree(drawn, output)
  report["captions"] = captions
  report["files"] = {kind: paths.join(output, name) for kind, name in FILES.items()}
  paths.path(report["files"]["json"]).write_text(
    json.dumps(_finite(report), indent=2), encoding="utf-8"
  )
  paths.path(report["files"]["md"]).write_text(
    _markdown(report, captions, extra_md), encoding="utf-8"
  )
  return _finite(report)


def _finite(node: Any) -> Any:
  """NaN / inf -> None, so report.json is strict JSON and reads back equal."""
  if isinstance(node, dict):
    return {k: _finite(v) for k, v in node.items()}
  if isinstance(node, list):
    return [_finite(v) for v in node]
  if isinstance(node, float) and not math.isfinite(node):
    return None
  return node
