"""``jaxdistill eval``: a finished run's student, and its teacher, measured on a validation split.

``evaluate_workdir(W)`` rebuilds the run from ``W/config.json`` (keys added since the run was
made take their defaults), loads the student's final params (or step N's checkpoint) and the
teacher the run distilled from (same ``teacher.source``: a workdir, a Hugging Face directory,
the run's own pretrained teacher, or its seeded random init), and measures both with
``evaluate.evaluate`` on the run's validation split, or on any data the ``data.*`` overrides
describe (e.g. a folder of text files the run never saw). With ``latency=True`` it also times
the compiled forward at batch 1 and at a serving batch and reads its compiled memory
(``latency.model_latency``). Sizes (params, bytes per dtype) are always recorded.

The result is written to ``W/eval/<name>.json`` (the schema in ``docs/evaluation.md``), which
``jaxdistill report`` reads. Text data is always tokenised with the run's own
``W/tokenizer.json``: a ``data.tokenizer`` override that differs from it is an error, not a
silent mismatch between token ids and embeddings.
"""

import copy
import datetime
import hashlib
import json
import tempfile
from typing import Any, Sequence

import jax

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill import models, paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.data import text as text_data
from jaxdistill.evaluation import evaluate, latency, task_accuracy
from jaxdistill.generate import speculative
from jaxdistill.models import quant
from jaxdistill.train import checkpoint
from jaxdistill.train import run as run_lib
from jaxdistill.train import teacher as teacher_lib
from jaxdistill.train import workdir as workdir_lib

# Override sections ``eval`` accepts: the data to measure on, the mesh and the cache. The
# model, losses and optimizer are the run's.
OVERRIDABLE = ("data", "mesh", "cache_dir")
DEFAULT_BATCH_SIZES = (1, 32)
# Timed generation requests per decoder and batch size with --latency (after one untimed).
GENERATE_REPEATS = 5
# The student as its teacher's speculative draft: prompts cut from the first validation batch.
DRAFT_PROMPTS, DRAFT_PROMPT_TOKENS, DRAFT_NEW_TOKENS, DRAFT_K = 8, 16, 16, 4


def run_config(workdir: str, overrides: Sequence[tuple[str, str]] = ()) -> Any:
  """The run's config from ``W/config.json`` with ``overrides`` applied (not validated).

  Raises:
    JaxdistillError: ``workdir`` is no jaxdistill run, or an override outside ``OVERRIDABLE``.
  """
  path = paths.join(workdir, "config.json")
  if not workdir_lib.is_run_config(path):
    raise JaxdistillError(
      f"--workdir {workdir!r} is not a jaxdistill run (no config.json written by `jaxdistill "
      "train`)"
    )
  saved = json.loads(paths.read_text(path))
  cfg = config_lib.default_config()
  _update(cfg, saved)
  for key, raw in overrides:
    if key.split(".")[0] not in OVERRIDABLE:
      raise JaxdistillError(
        f"eval takes only data.* / mesh.* / cache_dir overrides (the model is the run's), "
        f"not {key!r}"
      )
    config_lib.apply_override(cfg, key, raw)
  return cfg


def _update(cfg: Any, saved: dict) -> None:
  """Sets every saved key the current schema knows (a key since removed is ignored)."""
  for key, value in saved.items():
    if key not in cfg:
      continue
    if hasattr(cfg[key], "items"):
      _update(cfg[key], value)
      continue
    if isinstance(cfg[key], tuple) and isinstance(value, list):
      value = tuple(value)
    with cfg.ignore_type():
      cfg[key] = value


def _pin_tokenizer(cfg: Any, workdir: str) -> None:
  """Text data is tokenised with the run's own tokenizer (``W/tokenizer.json``)."""
  own = paths.join(workdir, "tokenizer.json")
  if data_lib.is_image_model(cfg) or not paths.isfile(own):
    return
  if paths.is_remote(own):  # the tokenizers library opens local files only
    own = paths.download(own, tempfile.mkdtemp(prefix="jaxdistill-tokenizer-"))
  from jaxdistill.data import tokenizer as tok_lib

  if cfg.data.tokenizer and paths.abspath(cfg.data.tokenizer) != paths.abspath(own):
    given, trained = tok_lib.load(cfg.data.tokenizer), tok_lib.load(own)
    if tok_lib.digest(given) != tok_lib.digest(trained):
      raise JaxdistillError(
        f"data.tokenizer {cfg.data.tokenizer!r} is not the tokenizer the model was trained "
        f"with ({own}); drop the override to use the run's own"
      )
  cfg.data.tokenizer = own
  # Text from files needs a training split only to check the tokenizer: the files evaluated.
  if cfg.data.source in ("text", "array_record") and cfg.data.eval_files:
    cfg.data.train_files = cfg.data.train_files or cfg.data.eval_files


def _student(run: Any, workdir: str, step: int | None) -> tuple[Any, dict, str, int]:
  """(the student module, its variables, where they came from, their training step).

  An int8 run's final student (``c=int8``: QAT, or ``jaxdistill quantize``'s PTQ) is the int8
  model of ``W/int8``, run with integer matmuls; its checkpoints are the fake-quantised
  training model with the checkpointed activation scales."""
  cfg = run.cfg
  ckpt_dir = paths.join(workdir, checkpoint.CHECKPOINTS)
  steps = checkpoint.complete_steps(ckpt_dir)
  if step is None and quant.is_int8(run.student):
    path = paths.join(workdir, workdir_lib.INT8_DIR)
    if not paths.isfile(paths.join(path, quant.CONFIG_FILE)):
      raise JaxdistillError(
        f"{workdir!r} is an int8 (c=int8) run without {workdir_lib.INT8_DIR}/ (written when "
        "it finishes); finish it, or pass --step N for one of its checkpoints"
      )
    module, variables, _ = workdir_lib.load_int8(path, run.mesh)
    return module, variables, workdir_lib.INT8_DIR, _final_step(workdir, cfg)
  if step is None:
    path = paths.join(workdir, checkpoint.FINAL_PARAMS)
    if not paths.isdir(path):
      hint = f"pass --step N for one of its checkpoints {steps}" if steps else "train it first"
      raise JaxdistillError(
        f"{workdir!r} has no {checkpoint.FINAL_PARAMS}/ (the run has not finished); {hint}"
      )
    variables, _ = evaluate.load_variables(run.student, path, run.mesh, cfg.data.seq_len)
    return run.student, variables, checkpoint.FINAL_PARAMS, _final_step(workdir, cfg)
  if step not in steps:
    raise JaxdistillError(
      f"--step {step}: {ckpt_dir} has no checkpoint of that step; it holds {steps or 'none'}"
    )
  manager = checkpoint.make_manager(workdir, cfg.ckpt)
  try:
    state, _ = checkpoint.restore(manager, step, run.state, None)
  finally:
    manager.close()
  variables = {"params": state.params["student"], **(state.model_state or {})}
  return run.student, variables, f"{checkpoint.CHECKPOINTS}/{step}", step


def load_student(workdir: str, overrides: Sequence[tuple[str, str]] = ()) -> tuple[Any, Any, dict]:
  """(the run's config, its final student module, variables on the run's mesh): the model
  ``evaluate_workdir`` measures (an int8 run's: its ``int8/`` model)."""
  cfg = run_config(workdir, overrides)
  built = run_lib.build_run(cfg, workdir, create_state=False, data=False)
  module, variables, _, _ = _student(built, workdir, None)
  return cfg, module, variables


def _final_step(workdir: str, cfg: Any) -> int:
  try:
    return int(json.loads(paths.read_text(paths.join(workdir, "summary.json")))["last_step"])
  except (OSError, ValueError, KeyError):
    return int(cfg.optim.steps)


def _teacher(cfg: Any, built: Any, workdir: str, teacher_dir: str) -> tuple | None:
  """(module, variables, where from) of the teacher to compare with, or None: the run's own
  teacher, or the student of the run ``teacher_dir`` (e.g. to give a CE baseline, which has
  no teacher, agreement and KL against the teacher its KD twin distilled from)."""
  # An ensemble's run is compared with its teacher 0 (``teacher``).
  module, variables = built.teachers[0] if built.teachers else (None, None)
  own = (module, variables, built.teacher_path or f"{cfg.teacher.source} init")
  if not teacher_dir:
    return own if module is not None else None
  wanted = paths.realpath(teacher_lib.final_params_dir(teacher_dir))
  if built.teacher_path and paths.realpath(built.teacher_path) == wanted:
    return own  # the run's own teacher: already loaded by build_run, not read twice
  other = run_config(teacher_dir)
  mine, theirs = (paths.join(d, "tokenizer.json") for d in (workdir, teacher_dir))
  if paths.isfile(mine) and paths.isfile(theirs):
    if paths.read_bytes(mine) != paths.read_bytes(theirs):
      raise JaxdistillError(
        f"--teacher {teacher_dir!r} was trained with another tokenizer than {workdir!r}; "
        "compare runs that share one"
      )
  t_cfg = copy.deepcopy(cfg)
  for key in (*models.MODEL_KEYS, *models.VISION_KEYS):
    t_cfg.teacher[key] = other.student[key]
  t_cfg.teacher.update(source="workdir", path=teacher_dir)
  module = run_lib.model_of(t_cfg, "teacher")
  variables, _, path = teacher_lib.load(t_cfg, module, built.mesh, workdir)
  return module, variables, path


def _entry(module, variables: dict) -> tuple:
  """``evaluate``'s (module, params, other collections or None)."""
  rest = {k: v for k, v in variables.items() if k != "params"}
  return module, variables["params"], rest or None


def _task(cfg: Any) -> str:
  if data_lib.is_image_model(cfg):
    return "vision"
  return "encoder" if cfg.student.encoder else "text"


def default_name(overrides: Sequence[tuple[str, str]], step: int | None) -> str:
  """``validation`` for the run's own split; ``data-<hash of the overrides>`` for other data;
  ``-stepN`` appended for a checkpoint."""
  name = "validation"
  if overrides:
    blob = json.dumps(sorted(overrides)).encode()
    name = "data-" + hashlib.sha256(blob).hexdigest()[:8]
  return name if step is None else f"{name}-step{step}"


def evaluate_workdir(
  workdir: str,
  step: int | None = None,
  overrides: Sequence[tuple[str, str]] = (),
  name: str = "",
  batches: int = 0,
  with_latency: bool = False,
  batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
  repeats: int = 20,
  teacher_dir: str = "",
  generate_repeats: int = GENERATE_REPEATS,
) -> dict:
  """Evaluates a run's student (and teacher) and writes ``W/eval/<name>.json``.

  Args:
    workdir: a ``jaxdistill train`` run directory.
    step: a checkpointed step to evaluate instead of the final params.
    overrides: (dotted key, raw value) pairs of ``data.*`` / ``mesh.*`` / ``cache_dir``.
    name: the result's file stem ("" = ``default_name``).
    batches: validation batches to use (0 = the whole split; a synthetic token stream, which
      never ends, then uses ``eval.batches``, else 8).
    with_latency: also measure forward latency and compiled memory.
    batch_sizes: the latency batch sizes (batch 1 and a serving batch).
    repeats: timed repeats per model and batch size.
    teacher_dir: compare with the student of this run instead of the run's own teacher.
    generate_repeats: with ``with_latency``, timed generation requests per decoder and batch
      size (``latency.generation_latency``; 0: no generation timing).

  Returns:
    The result dict (also written): name, workdir, step, params_source, task, data, models,
    size, latency (with ``with_latency``), device, device_kind, date.
  """
  cfg = run_config(workdir, overrides)
  _pin_tokenizer(cfg, workdir)
  data_lib.check(cfg)
  built = run_lib.build_run(cfg, workdir, create_state=False, data=False)
  student, variables, source, trained_step = _student(built, workdir, step)
  entries = {"student": _entry(student, variables)}
  found = _teacher(cfg, built, workdir, teacher_dir)
  teacher = _entry(*found[:2]) if found else None
  if not batches and cfg.data.source == "synthetic" and not data_lib.is_image_model(cfg):
    batches = cfg.eval.batches or 8  # a synthetic token stream never ends
  results = evaluate.evaluate(
    entries, evaluate.validation_batches(cfg, batches), built.mesh, teacher=teacher
  )
  results["student"].update(_draft_acceptance(cfg, built.mesh, (student, variables), found))
  _task_accuracy(cfg, results, (student, variables), found)
  sizes = {"student": latency.size(variables)}
  if teacher is not None:
    sizes["teacher"] = latency.size(found[1])
  device = jax.devices()[0]
  out = {
    "name": name or default_name(overrides, step),
    "workdir": workdir,
    "step": trained_step,
    "params_source": source,
    "task": _task(cfg),
    "data": {
      "source": cfg.data.source,
      "split": "validation",
      "batches": batches,
      "overrides": [f"{k}={v}" for k, v in overrides],
    },
    "models": results,
    "teacher": {"from": found[2]} if found else None,
    "size": sizes,
    "device": device.platform,
    "device_kind": device.device_kind,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if with_latency:
    models = {"student": (student, variables), **({"teacher": found[:2]} if found else {})}
    out["latency"] = _latency(cfg, built, models, batch_sizes, repeats, generate_repeats)
  if jax.process_index() == 0:
    paths.makedirs(paths.join(workdir, "eval"))
    text = json.dumps(out, indent=2, sort_keys=True)
    paths.path(paths.join(workdir, "eval", out["name"] + ".json")).write_text(
      text, encoding="utf-8"
    )
  return out


def _task_accuracy(cfg: Any, results: dict, student: tuple, found: tuple | None) -> None:
  """A task's (``data.source=task``) exact match of greedy answers, into each model's
  results (one process: the sampler runs on this host's devices)."""
  if cfg.data.source != "task" or jax.process_count() > 1:
    return
  tokenizer = text_data.prepare(cfg).tokenizer
  for name, entry in (("student", student), ("teacher", found)):
    if entry is not None and name in results:
      results[name].update(task_accuracy.exact_match(*entry[:2], tokenizer, cfg))


def _latency(cfg, built, models: dict, batch_sizes, repeats: int, generate_repeats: int) -> dict:
  """The "latency" block: the compiled forward of ``models`` (name -> (module, variables)) at
  ``batch_sizes`` and, for decoders, generation (time to first token, decode tokens/s)."""
  batch_fn = lambda b: latency.example_batch(built.student, b, cfg.data.seq_len)
  out = latency.model_latency(models, batch_fn, tuple(batch_sizes), repeats=repeats)
  if generate_repeats:
    gen = latency.generation_latency(models, tuple(batch_sizes), repeats=generate_repeats)
    for name, block in gen.items():
      out[name]["generate"] = block
  return out


def _draft_acceptance(cfg: Any, mesh: Any, student: tuple, found: tuple | None) -> dict:
  """{"draft_acceptance": the greedy acceptance rate of the student as its teacher's
  speculative draft (``k`` = DRAFT_K) on DRAFT_PROMPTS prompts cut from the first validation
  batch}, or {} without a decoder teacher of the same vocabulary (or with several processes)."""
  if found is None or _task(cfg) != "text" or jax.process_count() > 1:
    return {}
  teacher = found[0]
  if teacher.config.vocab_size != student[0].config.vocab_size:
    return {}
  batch = next(iter(evaluate.validation_batches(cfg, 1)))
  cut = min(DRAFT_PROMPT_TOKENS, teacher.config.max_len - 1, student[0].config.max_len - 1)
  prompts = []
  for tokens, segments in zip(batch["inputs"], batch["segment_ids"]):
    first = segments[:cut] == segments[0]  # the row's first document only
    n = int(first.argmin()) if not first.all() else cut
    if segments[0] and n and len(prompts) < DRAFT_PROMPTS:
      prompts.append([int(t) for t in tokens[:n]])
  if not prompts:
    return {}
  rate = speculative.acceptance_rate(
    teacher, found[1], *student, prompts, DRAFT_NEW_TOKENS, DRAFT_K, mesh=mesh
  )
  return {"draft_acceptance": rate}


def _ms(block: dict | None, key: str) -> str:
  return f"{block[key]['median_s'] * 1e3:.2f}" if block and key in block else "—"


def _generated(lat: dict) -> bool:
  return any(isinstance(v, dict) and "generate" in v for v in lat.values())


def _fmt_gen(gen: dict, b: int, key: str, scale: float, spec: str) -> str:
  value = gen.get(f"batch_{b}", {}).get(key)
  return "—" if value is None else spec.format(scale * value)


def format_table(result: dict) -> str:
  """The result as a Markdown table: one row per model."""
  task = result["task"]
  lat = result.get("latency", {})
  sizes = lat.get("batch_sizes", [])
  lat_cols = [f"ms @ batch {b}" for b in sizes]
  gen_sizes = sorted({min(sizes), max(sizes)}) if _generated(lat) else []
  lat_cols += [f"TTFT ms @ batch {b}" for b in gen_sizes[:1]]
  lat_cols += [f"decode tok/s @ batch {b}" for b in gen_sizes]
  if task == "encoder":
    cols = ["model", "params", "MB", "cos to teacher", *lat_cols]
  elif task == "vision":
    cols = ["model", "params", "MB", "accuracy", "top-5", "agree", "KL(T‖S)", "ECE", *lat_cols]
  else:
    cols = ["model", "params", "MB", "val CE", "ppl", "top-1", "top-5", "agree", "KL(T‖S)", "ECE"]
    cols += ["draft acc"]
    cols += ["exact match"] if any("exact_match" in m for m in result["models"].values()) else []
    cols += lat_cols
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  fmt = lambda m, k, f="{:.3f}": f.format(m[k]) if k in m else "—"
  for name, m in result["models"].items():
    size = result["size"][name]
    row = [name, f"{size['params'] / 1e6:.3f}M", f"{size['bytes'] / 2**20:.1f}"]
    if task == "encoder":
      row.append(fmt(m, "cosine_to_teacher", "{:.4f}"))
    else:
      row += [fmt(m, "val_loss")] if task == "text" else []
      row += [fmt(m, "val_ppl", "{:.1f}")] if task == "text" else []
      row += [f"{100 * m['accuracy']:.1f}%", f"{100 * m['top5_accuracy']:.1f}%"]
      row += [fmt(m, "agreement"), fmt(m, "kl_to_teacher"), fmt(m, "ece")]
      row += [fmt(m, "draft_acceptance")] if task == "text" else []
      if "exact match" in cols:
        row.append(f"{100 * m['exact_match']:.1f}%" if "exact_match" in m else "—")
    row += [_ms(lat.get(name), f"batch_{b}") for b in sizes]
    gen = (lat.get(name) or {}).get("generate", {})
    if gen_sizes:
      row.append(_fmt_gen(gen, gen_sizes[0], "ttft_s", 1e3, "{:.2f}"))
    row += [_fmt_gen(gen, b, "decode_tokens_per_s", 1, "{:,.0f}") for b in gen_sizes]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)
