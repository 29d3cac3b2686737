"""``jaxdistill pipeline``: a progressive compression pipeline, run stage by stage, resumable.

``run(config_path, W)`` loads ``get_pipeline()`` from the config file (the declaration and the
actions are in ``pipeline_spec``), and runs each stage in its own workdir ``W/NN-name``:

  train / distil   ``loop.train`` (a killed stage resumes from its last checkpoint exactly,
                   as any ``jaxdistill train`` run does)
  prune            ``prune_run.prune_workdir`` into ``W/NN-name.partial``, renamed when done
  quantise         ``quantize.ptq_workdir`` (the same: written aside, then renamed)
  export           an int8 bundle (int8 weights + scales, int8.json, config.json, tokenizer)
                   or a Hugging Face directory (``models.hf_export``), written aside, renamed

then evaluates it (``eval_run.evaluate_workdir``, against the original teacher so every stage
is compared with the same model: ``W/NN-name/eval/pipeline.json``) and marks it done in
``W/pipeline.json``. A rerun skips done stages, so a killed pipeline picks up where it stopped.
``W`` may be remote (``gs://``): every file goes through ``paths``, and "renamed" is then
``paths.move_tree``'s copy that ends by deleting the ``.partial``.
When every stage is done, all models' forward latency is measured in one interleaved pass
(``latency.model_latency``: the machine's speed drifts, so models are timed side by side) and
written into their evaluations; ``W/report.md`` (+ ``report.json`` and PNGs:
``report.write``) then puts every stage on the accuracy-latency curve with the Pareto front.

``W/pipeline.json``: {"config", "arg", "stages": [{"name", "action", "dir", "status"
("pending" | "done"), "seconds", "from" / "teacher" / "init", "metrics" (the student's
evaluation, with its per-batch values), "size" (params, bytes), "latency_ms" {"batch_B":
median}, "latency_spread_ms" {"batch_B": half the interquartile range}, "arch" (stages with one
architecture share a latency), "pareto" {"bytes" / "batch_B": on the front of quality against
that cost, beyond the noise}}], "complete", "report"}.
"""

import hashlib
import json
import time
from typing import Any, Sequence

from jaxdistill import models, paths
from jaxdistill.compress import prune_job as prune_run
from jaxdistill.compress import ptq as quantize
from jaxdistill.compress import stages as pipeline_spec
from jaxdistill.config import config_module, resolve, validate
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.evaluation import job as eval_run
from jaxdistill.evaluation import latency
from jaxdistill.models import quant
from jaxdistill.report import noise
from jaxdistill.report import table as report_table
from jaxdistill.report import write as report
from jaxdistill.train import loop
from jaxdistill.train import run as run_lib
from jaxdistill.train import workdir as workdir_lib

STATE_FILE = "pipeline.json"
EVAL_NAME = "pipeline"
REPORT_FILES = ("report.md", "report.json", "validation.png", "training_curves.png")


def load(config_path: str, overrides: Sequence[tuple[str, str]] = ()) -> dict:
  """The checked pipeline of a config file (``FILE`` or ``FILE:ARG``, or a shipped config's
  name: ``progressive:test``, as ``config.load_config`` reads them; ``pipeline_spec.check``)."""
  path, args = resolve(config_path)
  arg = args[0] if args else ""
  module = config_module(path)
  if not hasattr(module, "get_pipeline"):
    raise ConfigError("--config", f"{path} defines no get_pipeline(); see configs/progressive.py")
  spec = pipeline_spec.check(module.get_pipeline(*((arg,) if arg else ())), overrides)
  spec.update(config=config_path, arg=arg)
  return spec


def _read_state(workdir: str, spec: dict) -> dict:
  """W/pipeline.json, or a fresh one; a pipeline with other stages is an error."""
  path = paths.join(workdir, STATE_FILE)
  names = [(s["name"], s["action"]) for s in spec["stages"]]
  if paths.isfile(path):
    state = json.loads(paths.read_text(path))
    if [(s["name"], s["action"]) for s in state["stages"]] != names:
      raise JaxdistillError(
        f"{path} records other stages {[s['name'] for s in state['stages']]}; use a new "
        "--workdir for a changed pipeline"
      )
    return state
  if paths.exists(workdir) and (not paths.isdir(workdir) or paths.listdir(workdir)):
    raise JaxdistillError(f"--workdir {workdir!r} is not empty and holds no {STATE_FILE}")
  stages = [
    {"name": n, "action": a, "dir": s["dir"], "status": "pending"}
    for (n, a), s in zip(names, spec["stages"])
  ]
  return {"config": spec["config"], "arg": spec["arg"], "stages": stages, "complete": False}


def _write_state(workdir: str, state: dict) -> None:
  paths.write_text(paths.join(workdir, STATE_FILE), json.dumps(state, indent=2, sort_keys=True))


def _dir(workdir: str, spec: dict, name: str) -> str:
  return paths.join(workdir, next(s["dir"] for s in spec["stages"] if s["name"] == name))


def _copy_shape(section: Any, src_workdir: str, skip: tuple = ()) -> None:
  """Sets ``section``'s model shape keys to the student's of run ``src_workdir``."""
  src = eval_run.run_config(src_workdir).student
  for key in models.shape_keys(src):
    if key not in skip:
      section[key] = src[key]


def _stage_config(stage: dict, workdir: str, spec: dict) -> Any:
  """A train / distil stage's run config with the pipeline's wiring applied."""
  cfg = stage["config"]
  if stage["action"] == "distil" and stage["teacher"]:
    t_dir = _dir(workdir, spec, stage["teacher"])
    _copy_shape(cfg.teacher, t_dir)
    cfg.teacher.update(source="workdir", path=t_dir)
    if stage.get("generation"):  # born-again: the teacher's architecture, from scratch
      _copy_shape(cfg.student, t_dir)
  if stage.get("init"):
    src = _dir(workdir, spec, stage["init"])
    _copy_shape(cfg.student, src)
    cfg.student.update(init_from=src, init_layers="")
  validate.validate(cfg)
  return cfg


def _aside(dst: str) -> str:
  """A clean ``dst.partial`` to write a stage into before moving it to ``dst``."""
  tmp = dst + ".partial"
  paths.rmtree(tmp, missing_ok=True)
  return tmp


def _finished(dst: str) -> bool:
  """Whether a stage written aside was moved into ``dst`` completely: in an object store the
  move is a copy that ends by deleting ``dst.partial`` (``paths.move_tree``)."""
  return paths.isdir(dst) and not paths.exists(dst + ".partial")


def _export(src: str, dst: str, fmt: str) -> None:
  cfg = eval_run.run_config(src)
  is_int8 = bool(quant.is_int8(run_lib.model_of(cfg, "student")))
  fmt = ("int8" if is_int8 else "hf") if fmt == "auto" else fmt
  tmp = _aside(dst)
  if fmt == "int8":
    if not is_int8:
      raise JaxdistillError(f"export format int8 needs an int8 stage; {src!r} is float")
    paths.copytree(paths.join(src, workdir_lib.INT8_DIR), tmp)
    for name in ("config.json", "tokenizer.json"):
      if paths.isfile(paths.join(src, name)):
        paths.copy(paths.join(src, name), paths.join(tmp, name))
  else:
    from jaxdistill.models import hf_export

    hfm, params = workdir_lib.load_workdir(src)
    hf_export.export(params, hfm, tmp, tokenizer_dir=src)
  paths.move_tree(tmp, dst)


def _run_action(stage: dict, workdir: str, spec: dict) -> None:
  out = paths.join(workdir, stage["dir"])
  action = stage["action"]
  if action in ("train", "distil"):
    summary = loop.train(_stage_config(stage, workdir, spec), out)
    if summary["preempted"]:
      raise JaxdistillError(f"stage {stage['name']} was preempted; rerun to resume it")
    return
  if _finished(out):  # prune / quantise / export finished: moved into place
    return
  paths.rmtree(out, missing_ok=True)  # a remote move cut short: an incomplete copy
  src = _dir(workdir, spec, stage["from"])
  if action == "prune":
    tmp = _aside(out)
    prune_run.prune_workdir(
      src,
      tmp,
      stage["targets"],
      calibration_batches=stage.get("calibration_batches", 8),
      method=stage.get("method", "activation"),
    )
    paths.move_tree(tmp, out)
  elif action == "quantise":
    paths.rmtree(out + ".partial", missing_ok=True)
    quantize.ptq_workdir(
      src, out, stage.get("calibration_batches", 8), stage.get("act", "symmetric")
    )
  else:
    _export(src, out, stage.get("format", "auto"))


def _evaluate(stage: dict, workdir: str, spec: dict) -> dict:
  """The stage's evaluation against the original teacher (``W/NN-name/eval/pipeline.json``)."""
  own = stage["name"] == spec["teacher"]  # the teacher itself: nothing to compare it with
  teacher = _dir(workdir, spec, spec["teacher"]) if spec["teacher"] and not own else ""
  out = paths.join(workdir, stage["dir"])
  result = eval_run.evaluate_workdir(out, name=EVAL_NAME, teacher_dir=teacher)
  return {"metrics": result["models"]["student"], "size": result["size"]["student"]}


def _timed_stages(state: dict) -> list[dict]:
  return [s for s in state["stages"] if s["action"] != "export"]


def final_stage(state: dict) -> dict:
  """The pipeline's product: the stage the last export exports, else the last model stage."""
  exports = [s for s in state["stages"] if s["action"] == "export"]
  name = exports[-1]["from"] if exports else _timed_stages(state)[-1]["name"]
  return next(s for s in state["stages"] if s["name"] == name)


def _measure_latency(workdir: str, spec: dict, state: dict, repeats: int) -> None:
  """Every evaluated stage's forward, timed in one interleaved pass; written into each
  stage's evaluation (the ``latency`` block ``report`` reads) and into pipeline.json."""
  entries, seq_len, first = {}, None, None
  for s in _timed_stages(state):
    cfg, module, variables = eval_run.load_student(paths.join(workdir, s["dir"]))
    entries[s["name"]] = (module, variables)
    seq_len, first = seq_len or cfg.data.seq_len, first or module
    # Stages with one architecture (module config, sizes by dtype) share a latency.
    same = json.dumps([repr(module.config), latency.size(variables)], sort_keys=True)
    s["arch"] = hashlib.sha1(same.encode()).hexdigest()[:12]
  batch_fn = lambda b: latency.example_batch(first, b, seq_len)  # noqa: E731
  timed = latency.model_latency(entries, batch_fn, spec["batch_sizes"], repeats=repeats)
  for s in _timed_stages(state):
    path = paths.join(workdir, s["dir"], "eval", EVAL_NAME + ".json")
    result = json.loads(paths.read_text(path))
    result["latency"] = {"batch_sizes": timed["batch_sizes"], "student": timed[s["name"]]}
    paths.write_text(path, json.dumps(result, indent=2, sort_keys=True))
    stats = {f"batch_{b}": timed[s["name"]][f"batch_{b}"] for b in timed["batch_sizes"]}
    s["latency_ms"] = {b: 1e3 * st["median_s"] for b, st in stats.items()}
    # measure() records quartiles, so the spread is always there.
    s["latency_spread_ms"] = {b: 1e3 * noise.latency_spread(st) for b, st in stats.items()}


def _report(workdir: str, spec: dict, state: dict) -> str:
  """W/report.md (+ report.json, PNGs) of every evaluated stage, replacing an older one."""
  runs = {s["name"]: paths.join(workdir, s["dir"]) for s in _timed_stages(state)}
  tmp = _aside(paths.join(workdir, "report"))
  done = report.write(runs, tmp, EVAL_NAME, extra_md=_stage_table(state))
  for path in done["files"].values():
    paths.replace(path, paths.join(workdir, paths.path(path).name))
  paths.rmtree(tmp, missing_ok=True)
  return paths.join(workdir, "report.md")


def _quality(metrics: dict) -> tuple[str, bool]:
  """The headline metric of a stage's evaluation and whether higher is better."""
  return ("accuracy", True) if "val_loss" not in metrics else ("val_loss", False)


def shared_latency(state: dict) -> dict[str, dict[str, tuple[float, float]]]:
  """Per evaluated stage and batch key: (latency ms, spread ms), one latency per architecture
  (``noise.share``: stages of one "arch" get the median of their timings)."""
  rows = [s for s in state["stages"] if s.get("metrics") and s.get("latency_ms")]
  out = {s["name"]: {} for s in rows}
  for b in rows[0]["latency_ms"] if rows else []:
    values = [s["latency_ms"].get(b) for s in rows]
    spreads = [s.get("latency_spread_ms", {}).get(b) for s in rows]
    values, spreads = noise.share(values, spreads, [s.get("arch") for s in rows])
    for s, v, sp in zip(rows, values, spreads):
      out[s["name"]][b] = (v, sp)
  return out


def pareto_flags(state: dict) -> dict[str, dict[str, bool]]:
  """Per evaluated stage: on the Pareto front of quality against bytes, and against the
  median latency at each batch size (``report_table.pareto_front`` with each stage's noise:
  its quality's 95% bound over the evaluated batches, half its latency's interquartile range;
  one latency per architecture, ``shared_latency``)."""
  rows = [s for s in state["stages"] if s.get("metrics")]
  if not rows:
    return {}
  key, higher = _quality(rows[0]["metrics"])
  shared = shared_latency(state)
  costs = {"bytes": [(s["size"]["bytes"], 0.0) for s in rows]}
  for b in rows[0].get("latency_ms", {}):
    costs[b] = [shared.get(s["name"], {}).get(b, (None, None)) for s in rows]
  quality = [s["metrics"][key] for s in rows]
  bounds = [noise.bound(s["metrics"].get(f"batch_{key}"), s["metrics"].get("batch_weights"))
            for s in rows]  # fmt: skip
  flags = {s["name"]: {} for s in rows}
  for cost, pairs in costs.items():
    points = [(c, q) for (c, _), q in zip(pairs, quality)]
    spread = [(sp, e) for (_, sp), e in zip(pairs, bounds)]
    front = report_table.pareto_front(points, higher, spread)
    for s, on in zip(rows, front):
      flags[s["name"]][cost] = on
  return flags


def _stage_table(state: dict) -> str:
  """The stages in order (Markdown): what each did, its size, quality, latency, Pareto."""
  flags, shared = pareto_flags(state), shared_latency(state)
  timed = [s for s in state["stages"] if s.get("metrics")]
  key = _quality(timed[0]["metrics"])[0] if timed else "val_loss"
  sizes = list(timed[0].get("latency_ms", {})) if timed else []
  head = ["stage", "action", "from", "teacher", "params", "bytes", key]
  head += [f"ms {b.replace('batch_', 'b=')}" for b in sizes]
  head += ["Pareto (bytes / " + " / ".join(b.replace("batch_", "b=") for b in sizes) + ")"]
  lines = ["## Stages", "", "| " + " | ".join(head + ["seconds"]) + " |"]
  lines.append("|" + "---|" * (len(head) + 1))
  for s in state["stages"]:
    cells = [s["name"], s["action"], s.get("from") or s.get("init") or "", s.get("teacher") or ""]
    if s.get("metrics"):
      cells += [f"{s['size']['params']:,}", f"{s['size']['bytes']:,}", f"{s['metrics'][key]:.4f}"]
      ms = {b: v for b, (v, _) in shared.get(s["name"], {}).items() if v is not None}
      cells += [f"{ms[b]:.3g}" if b in ms else "—" for b in sizes]
      on = flags.get(s["name"], {})
      cells.append(" / ".join("yes" if on.get(c) else "no" for c in ["bytes", *sizes]))
    else:
      cells += [""] * (4 + len(sizes))
    lines.append("| " + " | ".join(cells + [f"{s.get('seconds', 0):.0f}"]) + " |")
  note = (
    "\nPareto: no other stage is as good or better at a cost as low or lower, and better "
    "beyond the noise in one; costs: bytes of the weights (and scales), and median forward "
    "latency (one per architecture: the median of its stages' timings). "
    f"{report_table.NOISE_NOTE}\n"
  )
  return "\n".join(lines) + "\n" + note


def run(
  config_path: str,
  workdir: str,
  overrides: Sequence[tuple[str, str]] = (),
  repeats: int = 20,
  log=print,
) -> dict:
  """Runs (or resumes) the pipeline of ``config_path`` in ``workdir``.

  Args:
    config_path: a pipeline config file, ``FILE`` or ``FILE:ARG`` (``get_pipeline(ARG)``).
    workdir: the pipeline's directory (new, or one this pipeline ran in before); local or
      remote (``gs://``: every stage's files go through ``paths``).
    overrides: (dotted key, raw value) for every train / distil stage's config.
    repeats: timed forward repeats per model and batch size.
    log: where progress lines go.
  Returns:
    The state written to ``W/pipeline.json``.
  """
  spec = load(config_path, overrides)
  state = _read_state(workdir, spec)
  paths.makedirs(workdir)
  _write_state(workdir, state)
  for stage, record in zip(spec["stages"], state["stages"]):
    if record["status"] == "done":
      log(f"stage {stage['name']}: done before, skipped")
      continue
    log(f"stage {stage['name']}: {stage['action']} -> {paths.join(workdir, stage['dir'])}")
    started = time.perf_counter()
    _run_action(stage, workdir, spec)
    for key in ("from", "teacher", "init"):
      if stage.get(key):
        record[key] = stage[key]
    if stage["action"] != "export":
      record.update(_evaluate(stage, workdir, spec))
    record["seconds"] = record.get("seconds", 0.0) + time.perf_counter() - started
    record["status"] = "done"
    _write_state(workdir, state)
  log("timing every stage's forward, interleaved")
  _measure_latency(workdir, spec, state, repeats)
  flags = pareto_flags(state)
  for s in state["stages"]:
    s["pareto"] = flags.get(s["name"])
  state["report"] = _report(workdir, spec, state)
  state["complete"] = True
  _write_state(workdir, state)
  return state
