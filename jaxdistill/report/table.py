"""The report's table: one row per teacher and student, the Pareto front, the Markdown.

``rows_for`` turns runs read by ``jaxdistill.report.write`` (their config.json, summary.json and
``eval/<name>.json``) into plain row dicts; ``pareto_front`` marks the rows no other row beats
on both quality and cost, beyond the measured noise (``report.noise``: the quality's 95% bound
over the evaluated batches, the latency's interquartile range), and models of one architecture
share one latency, so timing noise alone cannot put one of them off the front;
``format_table`` renders them. Absent numbers are None in the rows and "—" in the table.
"""

import hashlib
import json
import math
from typing import Any, Sequence

from jaxdistill import models, paths
from jaxdistill.report import noise

# Per task: the quality column and whether higher is better.
QUALITY = {
  "text": ("val_loss", False),
  "vision": ("accuracy", True),
  "encoder": ("cosine_to_teacher", True),
}
QUALITY_LABEL = {
  "val_loss": "validation CE (nats)",
  "accuracy": "accuracy",
  "cosine_to_teacher": "cosine to the teacher",
}
DASH = "—"


def pareto_front(
  points: Sequence[tuple[float, float]],
  higher_is_better: bool,
  noise: Sequence[tuple[float | None, float | None]] | None = None,
) -> list[bool]:
  """Which points no other point dominates (lower cost and better quality, beyond the noise).

  Point j dominates point i when j is at least as good on both axes (cost <= i's, quality at
  least i's) and better beyond the noise on at least one: their difference there exceeds the
  two points' noise combined in quadrature (sqrt(n_i^2 + n_j^2), the noise of a difference of
  independent measurements). So exact duplicates, and two points that differ only within the
  noise, do not dominate each other; with no noise this is the classic strict front. Points
  with a None or NaN coordinate are never on the front and dominate nothing.

  Args:
    points: (cost, quality) per point, e.g. (latency in ms, validation CE).
    higher_is_better: the quality's direction (accuracy: True; a loss: False).
    noise: (cost noise, quality noise) per point, half-widths in the axes' units (e.g. half
      the latency's interquartile range, the quality's 95% bound); None: none.

  Returns:
    One bool per point, in order.
  """
  sign = 1.0 if higher_is_better else -1.0
  valid = [
    c is not None and q is not None and not (math.isnan(c) or math.isnan(q)) for c, q in points
  ]
  # Quality as "higher is better" throughout.
  pts = [(c, sign * q) if ok else (0.0, 0.0) for (c, q), ok in zip(points, valid)]
  noise = [(nc or 0.0, nq or 0.0) for nc, nq in noise] if noise else [(0.0, 0.0)] * len(pts)

  def dominates(j, i):
    (cj, qj), (ci, qi) = pts[j], pts[i]
    cheaper = ci - cj > math.hypot(noise[i][0], noise[j][0])
    better = qj - qi > math.hypot(noise[i][1], noise[j][1])
    return cj <= ci and qj >= qi and (cheaper or better)

  n = len(pts)
  return [
    valid[i] and not any(valid[j] and dominates(j, i) for j in range(n) if j != i) for i in range(n)
  ]


def _latency(block: dict | None, side: str) -> dict:
  """Median latencies (ms) at the smallest and the largest (serving) batch, and memory."""
  if not block or side not in block:
    keys = ("latency_small_ms", "latency_serve_ms", "batch_small", "batch_serve")
    keys += ("latency_small_spread_ms", "latency_serve_spread_ms") + GENERATE
    return dict.fromkeys(keys)
  sizes = block.get("batch_sizes") or sorted(
    int(k.split("_")[1]) for k in block[side] if k.startswith("batch_")
  )
  small, serve = min(sizes), max(sizes)
  ms = lambda b: 1e3 * block[side][f"batch_{b}"]["median_s"]
  spread = noise.latency_spread
  spread_ms = lambda b: _scaled(spread(block[side][f"batch_{b}"]), 1e3)
  memory = block[side].get("memory", {}).get("total_bytes")
  return {
    "latency_small_ms": ms(small),
    "latency_serve_ms": ms(serve),
    "latency_small_spread_ms": spread_ms(small),
    "latency_serve_spread_ms": spread_ms(serve),
    "batch_small": small,
    "batch_serve": serve,
    "memory_bytes": memory,
    **_generate(block[side].get("generate"), small, serve),
  }


# A decoder's generation speed (``eval --latency``'s "generate" block), None when not measured.
GENERATE = ("ttft_ms", "decode_small_tok_s", "decode_serve_tok_s")


def _generate(gen: dict | None, small: int, serve: int) -> dict:
  get = lambda b, key: ((gen or {}).get(f"batch_{b}") or {}).get(key)
  values = (_scaled(get(small, "ttft_s"), 1e3), get(small, "decode_tokens_per_s"))
  return dict(zip(GENERATE, values + (get(serve, "decode_tokens_per_s"),)))


def _scaled(value: float | None, scale: float) -> float | None:
  return None if value is None else scale * value


METRICS = ("val_loss", "val_ppl", "accuracy", "top5_accuracy", "agreement", "kl_to_teacher")
METRICS += ("cosine_to_teacher", "ece")


def _row(name: str, role: str, evaluation: dict, side: str, model: dict) -> dict[str, Any]:
  """One model's row; ``model`` is what identifies its timed program besides its size and
  dtypes (``_model_identity``), for ``_share_latency``: rows with one "arch" share a latency."""
  m = evaluation["models"][side]
  size = evaluation.get("size", {}).get(side, {})
  row = {"name": name, "role": role, **{k: m.get(k) for k in METRICS}}
  # Each quality's standard error over the evaluated batches and its 95% bound (None: not
  # recorded, or a single batch).
  for key in QUALITY_SE:
    values, weights = m.get(f"batch_{key}"), m.get("batch_weights")
    row[f"{key}_se"] = noise.standard_error(values, weights) if values and weights else None
    row[f"{key}_bound"] = noise.bound(values, weights)
  row.update(params=size.get("params"), bytes=size.get("bytes"), memory_bytes=None)
  row.update(_latency(evaluation.get("latency"), side))
  # Same shape, dtypes, data shape, device and batch sizes: the same program, timed alike.
  latency = evaluation.get("latency") or {}
  source = evaluation.get("params_source") if side == "student" else "teacher"
  same = [model, size, source, evaluation.get("device_kind"), latency.get("batch_sizes")]
  digest = hashlib.sha1(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()
  row["arch"] = digest[:12]
  return row


QUALITY_SE = ("val_loss", "accuracy", "cosine_to_teacher")


def _model_identity(run, side: str) -> dict:
  """What fixes a run's timed forward besides its size: the student's shape keys and policy
  (a teacher's shape is not always in the config: its size and dtypes stand for it), and the
  sequence length of the timed batch (the run's data.seq_len, for both)."""
  seq_len = run.config.get("data", {}).get("seq_len")
  if side == "teacher":
    return {"side": "teacher", "seq_len": seq_len}
  section = run.config.get("student", {})
  keys = (*models.shape_keys(section), "policy")
  return {"seq_len": seq_len, **{k: section.get(k) for k in keys}}


def _teacher_identity(run) -> str:
  """What makes two runs' teachers the same model measured the same way."""
  t = run.config.get("teacher", {})
  source = t.get("source", "")
  given = (run.evaluation.get("teacher") or {}).get("from", "")
  if given and paths.exists(given):  # the teacher the evaluation used (`eval --teacher`)
    where = paths.realpath(given)
  elif source == "pretrain":  # trained inside this run
    where = paths.realpath(paths.join(run.workdir, "teacher"))
  elif t.get("path"):
    where = paths.realpath(t["path"])
  else:  # random: the run's own
    where = paths.realpath(run.workdir)
  return json.dumps([where, run.evaluation.get("data", {})], sort_keys=True)


def _is_path_of(path: str, workdir: str) -> bool:
  """Whether a teacher.path names the run in ``workdir`` (or its final_params)."""
  if not path:
    return False
  path, workdir = paths.realpath(path), paths.realpath(workdir)
  return path in (workdir, paths.join(workdir, "final_params"))


def _teacher_rows(runs) -> list[dict]:
  """The distinct teachers of the runs (their eval JSON's "teacher" entries), except a
  teacher that is itself one of the runs."""
  found = {}
  for r in runs:
    if "teacher" not in r.evaluation.get("models", {}):
      continue
    path = r.config.get("teacher", {}).get("path", "")
    if any(_is_path_of(path, other.workdir) for other in runs):
      continue
    found.setdefault(_teacher_identity(r), r)
  names = {r.name for r in runs}
  rows = []
  for r in found.values():
    name = "teacher" if len(found) == 1 and "teacher" not in names else f"teacher of {r.name}"
    row = _row(name, "teacher", r.evaluation, "teacher", _model_identity(r, "teacher"))
    teacher = r.config.get("teacher", {})
    path = (r.evaluation.get("teacher") or {}).get("from", "") or teacher.get("path", "")
    path = path or f"teacher.source={teacher.get('source', '?')}"
    row.update(workdir=path, step=None, params_source="", train_rate=None)
    row.update(agreement=None, kl_to_teacher=None)  # against itself: not a measurement
    rows.append(row)
  return rows


def _run_row(run, runs) -> dict:
  paths = [o.config.get("teacher", {}).get("path", "") for o in runs if o is not run]
  teaches = any(_is_path_of(path, run.workdir) for path in paths)
  role = "teacher" if teaches else "student"
  row = _row(run.name, role, run.evaluation, "student", _model_identity(run, "student"))
  s = run.summary
  row.update(
    workdir=run.workdir,
    step=run.evaluation.get("step", s.get("last_step")),
    params_source=run.evaluation.get("params_source", ""),
    train_rate=s.get("tokens_per_s", s.get("images_per_s")),
  )
  if row["params"] is None:
    row["params"] = s.get("student_params")
  return row


def rows_for(runs) -> tuple[list[dict], dict]:
  """The table's rows (teachers from the evaluations first, then the runs in order), each with
  its "pareto" flag, and the axes of the quality plot.

  Args:
    runs: ``report.Run``s of one task.

  Returns:
    (rows, axis): axis has "x" (the Pareto cost: "latency_serve_ms" or "params"), "quality",
    "higher_is_better", "ylabel", "panels" (for ``report_plots.quality_scatter``), "note"
    (the table's Pareto sentence) and "caption".
  """
  rows = _share_latency(_teacher_rows(runs) + [_run_row(r, runs) for r in runs])
  quality, higher = QUALITY[runs[0].task]
  timed = any(r["latency_serve_ms"] is not None for r in rows)
  x = "latency_serve_ms" if timed else "params"
  flags = _front(rows, x, quality, higher)
  for r, on in zip(rows, flags):
    r["pareto"] = on if r[x] is not None and r[quality] is not None else None
  ylabel = QUALITY_LABEL[quality] + (", higher is better" if higher else ", lower is better")
  point = lambda r, key, on: (r["name"], r[key], r[quality], r["role"] == "teacher", on)
  if timed:
    small = _batches(rows, "batch_small")
    serve = _batches(rows, "batch_serve")
    small_flags = _front(rows, "latency_small_ms", quality, higher)
    panels = [
      {"title": f"batch {small}", "xlabel": f"median latency at batch {small} (ms)",
       "points": [point(r, "latency_small_ms", on) for r, on in zip(rows, small_flags)]},
      {"title": f"serving batch {serve}", "xlabel": f"median latency at batch {serve} (ms)",
       "points": [point(r, "latency_serve_ms", on) for r, on in zip(rows, flags)]},
    ]  # fmt: skip
    note = (
      f"Pareto: on the front of {QUALITY_LABEL[quality]} against median latency at the serving "
      f"batch ({serve}): no other model is as fast or faster and as good or better, and "
      f"better beyond the noise in one. {NOISE_NOTE} Models of one architecture (shape, "
      "dtypes) share one latency: the median of their timings. — : no latency measured "
      "(`jaxdistill eval --latency`). Memory: the compiled forward's total. TTFT and decode "
      "tok/s (decoders): greedy generation, warm (docs/evaluation.md)."
    )
    caption = (
      f"{_upper(QUALITY_LABEL[quality])} (the table's) against the compiled forward's "
      f"median latency at batch {small} (left) and at the serving batch {serve} (right); "
      "stars: teachers; red rings: the Pareto front of each panel."
    )
  else:
    panels = [{"title": "params", "xlabel": "parameters",
               "points": [point(r, "params", on) for r, on in zip(rows, flags)]}]  # fmt: skip
    note = (
      f"Pareto: on the front of {QUALITY_LABEL[quality]} against parameter count (no run has "
      "a latency block: `jaxdistill eval --latency` measures one): no other model is as small "
      f"or smaller and as good or better, and better beyond the noise in one. {NOISE_NOTE}"
    )
    caption = (
      f"{_upper(QUALITY_LABEL[quality])} against the parameter count: no run was "
      "evaluated with --latency, so parameters stand in for latency. Stars: teachers; red "
      "rings: the Pareto front."
    )
  axis = dict(x=x, quality=quality, higher_is_better=higher, ylabel=ylabel, panels=panels)
  return rows, dict(axis, note=note, caption=caption)


NOISE_NOTE = (
  "Noise: the quality's 95% bound over the evaluated batches (Student's t x its standard "
  "error), half the interquartile range of a latency's timings; combined in quadrature for a "
  "difference."
)


def _share_latency(rows: list[dict]) -> list[dict]:
  """One latency per architecture (``noise.share``): rows with one "arch" get the median of
  their timings, and a spread that covers how far those timings lie apart; each row keeps its
  own timing as "latency_*_measured_ms" and names the rows it shares with."""
  groups = [r["arch"] if r["latency_serve_ms"] is not None else None for r in rows]
  for size in ("small", "serve"):
    key, spread = f"latency_{size}_ms", f"latency_{size}_spread_ms"
    values, spreads = noise.share([r[key] for r in rows], [r[spread] for r in rows], groups)
    for r, v, s in zip(rows, values, spreads):
      r[f"latency_{size}_measured_ms"] = r[key]
      r[key], r[spread] = v, (s if v is not None else None)
  for r, g in zip(rows, groups):
    same = [o["name"] for o, h in zip(rows, groups) if g is not None and h == g and o is not r]
    r["latency_shared_with"] = same
  return rows


def _front(rows: list[dict], x: str, quality: str, higher: bool) -> list[bool]:
  """``pareto_front`` of (x, quality) with each row's noise: its latency spread (none for
  params) and its quality's 95% bound."""
  spread = x.replace("_ms", "_spread_ms") if x.startswith("latency_") else None
  noise_of = [(r[spread] if spread else None, r.get(f"{quality}_bound")) for r in rows]
  return pareto_front([(r[x], r[quality]) for r in rows], higher, noise_of)


def _upper(text: str) -> str:
  return text[:1].upper() + text[1:]


def _batches(rows: list[dict], key: str) -> str:
  """The batch sizes of ``key`` over the timed rows, e.g. "32" or "32/64"."""
  return "/".join(str(b) for b in sorted({r[key] for r in rows if r[key] is not None}))


def _fmt(value, spec: str) -> str:
  return DASH if value is None else format(value, spec)


def _pct(value) -> str:
  return DASH if value is None else f"{100 * value:.1f}%"


def _count(n) -> str:
  """1234567 -> "1.23M" (params)."""
  if n is None:
    return DASH
  for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


def _bytes(n) -> str:
  if n is None:
    return DASH
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def format_table(rows: list[dict], task: str) -> str:
  """The rows as a Markdown table (what ``jaxdistill report`` prints).

  Args:
    rows: ``rows_for``'s rows.
    task: "text", "vision" or "encoder" (picks the quality columns).
  """
  small, serve = _batches(rows, "batch_small") or "1", _batches(rows, "batch_serve") or "N"
  quality = {
    "text": [("val CE", lambda r: _fmt(r["val_loss"], ".3f")),
             ("ppl", lambda r: _fmt(r["val_ppl"], ".1f"))],
    "vision": [("acc", lambda r: _pct(r["accuracy"])),
               ("top-5", lambda r: _pct(r["top5_accuracy"]))],
    "encoder": [("cos(T,S)", lambda r: _fmt(r["cosine_to_teacher"], ".4f"))],
  }[task]  # fmt: skip
  rate = "train img/s" if task == "vision" else "train tok/s"
  cols = [
    ("model", lambda r: r["name"]),
    ("role", lambda r: r["role"]),
    ("step", lambda r: _fmt(r["step"], "d")),
    ("params", lambda r: _count(r["params"])),
    ("bytes", lambda r: _bytes(r["bytes"])),
    *quality,
    ("agree", lambda r: _fmt(r["agreement"], ".3f")),
    ("KL(T‖S)", lambda r: _fmt(r["kl_to_teacher"], ".3f")),
    (rate, lambda r: _fmt(r["train_rate"], ",.0f")),
    (f"ms b={small}", lambda r: _fmt(r["latency_small_ms"], ".3g")),
    (f"ms b={serve}", lambda r: _fmt(r["latency_serve_ms"], ".3g")),
    ("memory", lambda r: _bytes(r["memory_bytes"])),
    *(_generate_cols(small, serve) if any(r.get("ttft_ms") is not None for r in rows) else []),
    ("Pareto", lambda r: DASH if r["pareto"] is None else ("yes" if r["pareto"] else "no")),
  ]
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(fn(r) for _, fn in cols) + " |")
  return "\n".join(lines)


def _generate_cols(small: str, serve: str) -> list:
  """The generation columns (decoders timed by ``eval --latency``)."""
  return [
    (f"TTFT ms b={small}", lambda r: _fmt(r.get("ttft_ms"), ".3g")),
    (f"decode tok/s b={small}", lambda r: _fmt(r.get("decode_small_tok_s"), ",.0f")),
    (f"decode tok/s b={serve}", lambda r: _fmt(r.get("decode_serve_tok_s"), ",.0f")),
  ]
