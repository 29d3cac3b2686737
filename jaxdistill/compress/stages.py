"""A progressive compression pipeline's declaration: its stages, checked before anything runs.

A pipeline config file (``configs/progressive.py``) defines ``get_pipeline(arg="")`` returning::

  {
    "teacher": "teacher",        # the original teacher: a stage's name ("" = each distil
                                 # stage's own teacher section, e.g. a Hugging Face model)
    "batch_sizes": (1, 32),      # latency at one request and at a serving batch
    "stages": [stage, ...],      # run in order, each in its own workdir W/NN-name
  }

Each stage is a dict with a ``name`` (letters, digits, ``_``, ``-``; unique), an ``action`` and
that action's keys:

  train     ``config``: a run config (ConfigDict), trained as it is (e.g. the teacher on CE).
  distil    ``config``, plus the wiring the pipeline does: ``teacher`` = "original" (default),
            "previous" (the previous model stage: a teacher assistant) or a stage's name, whose
            student becomes this run's teacher (``teacher.source=workdir``, its shape keys);
            ``init`` = a stage whose student this one starts from (``student.init_from`` and
            that stage's shape keys; the config's ``student.policy`` is kept, so ``c=int8``
            makes the stage int8 QAT of it).
            ``generations`` = N (born-again networks, Furlanello et al. 2018): the stage
            becomes N distil stages ``name-g1`` .. ``name-gN``; g1 has the stage's teacher,
            each next one the previous generation's student. Each generation's student takes
            its teacher stage's shape keys (the same architecture: the config's student
            shape is overridden, its policy kept), starts from scratch (no ``init``) with
            seed = the config's seed + k, so generations differ from each other and from
            a teacher trained with the config's seed.
  prune     ``from`` (default: the previous model stage), ``targets`` (``prune_run``'s: e.g.
            {"d_ff": 0.5, "num_heads": 0.75}), ``method`` ("activation" | "gradient"),
            ``calibration_batches``.
  quantise  post-training int8 of ``from`` (``quantize.ptq_workdir``): ``act``
            ("symmetric" | "asymmetric"), ``calibration_batches``.
  export    ``from``: an int8 stage's int8 model + config + tokenizer (``format="int8"``, the
            default for int8 stages), or a Hugging Face directory (``format="hf"``).

Every stage but ``export`` is evaluated (``jaxdistill eval`` against the original teacher)
and timed. ``--config.KEY=VALUE`` overrides apply to every train / distil stage's config.
This module only checks the declaration (one-line ``ConfigError`` naming the stage and key);
``pipeline`` runs it.
"""

import copy
import re
from typing import Any, Sequence

import ml_collections

from jaxdistill import config as config_lib
from jaxdistill.errors import ConfigError

ACTIONS = ("train", "distil", "prune", "quantise", "export")
MODEL_ACTIONS = ("train", "distil", "prune", "quantise")  # stages that make a model
_KEYS = {
  "train": {"config"},
  "distil": {"config", "teacher", "init", "generations"},
  "prune": {"from", "targets", "method", "calibration_batches"},
  "quantise": {"from", "act", "calibration_batches"},
  "export": {"from", "format"},
}
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _fail(where: str, message: str) -> ConfigError:
  return ConfigError(where, message)


def _stage_ref(stages: list[dict], i: int, key: str, value: Any, where: str) -> str:
  """A stage name that refers to an earlier model stage ("previous" resolved)."""
  earlier = [s["name"] for s in stages[:i] if s["action"] in MODEL_ACTIONS]
  if value == "previous":
    if not earlier:
      raise _fail(f"{where}.{key}", "'previous' needs an earlier stage that makes a model")
    return earlier[-1]
  if value not in earlier:
    raise _fail(
      f"{where}.{key}", f"{value!r} is no earlier model stage; choose one of {earlier or 'none'}"
    )
  return value


def check(pipeline: Any, overrides: Sequence[tuple[str, str]] = ()) -> dict:
  """The pipeline with defaults filled in, references resolved and overrides applied.

  Args:
    pipeline: ``get_pipeline()``'s dict (see the module docstring).
    overrides: (dotted key, raw value) pairs applied to every train / distil config.
  Returns:
    {"teacher": stage name or "", "batch_sizes": tuple, "stages": [stage dicts with "index",
    "dir" (NN-name), "from" / "teacher" / "init" resolved to stage names]}.
  Raises:
    ConfigError: a malformed pipeline (the stage and key named).
  """
  if not isinstance(pipeline, dict) or not isinstance(pipeline.get("stages"), (list, tuple)):
    raise _fail("get_pipeline", "must return a dict with a 'stages' list")
  extra = set(pipeline) - {"teacher", "batch_sizes", "stages"}
  if extra:
    raise _fail("get_pipeline", f"unknown key(s) {sorted(extra)}; known: teacher, batch_sizes")
  sizes = tuple(pipeline.get("batch_sizes", (1, 32)))
  if not sizes or not all(isinstance(b, int) and b > 0 for b in sizes):
    raise _fail("batch_sizes", f"{sizes!r}: give positive integers, e.g. (1, 32)")
  stages: list[dict] = []
  for i, raw in enumerate(expand_generations(pipeline["stages"])):
    stages.append(_stage(raw, i, stages, overrides))
  if not stages:
    raise _fail("stages", "is empty; declare at least one stage")
  teacher = pipeline.get("teacher", "")
  if teacher:
    _stage_ref(stages, len(stages), "teacher", teacher, "pipeline")
  for s in stages:
    if s["action"] == "distil" and s["teacher"] == "original":
      s["teacher"] = teacher
      if teacher and stages.index(next(t for t in stages if t["name"] == teacher)) > s["index"]:
        raise _fail(f"stages[{s['name']}].teacher", f"the original teacher {teacher!r} comes later")
  return {"teacher": teacher, "batch_sizes": sizes, "stages": stages}


def expand_generations(raw_stages: Sequence[Any]) -> list[Any]:
  """The stages with each distil stage's ``generations: N`` unrolled into N born-again
  generations ``name-g1`` .. ``name-gN`` (g(k+1)'s teacher: gk; each marked with its
  ``generation`` k for the seed and the shape wiring)."""
  out: list[Any] = []
  for raw in raw_stages:
    if not isinstance(raw, dict) or raw.get("action") != "distil" or "generations" not in raw:
      out.append(raw)
      continue
    where, n = f"stages[{raw.get('name')}].generations", raw["generations"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
      raise _fail(where, f"{n!r}: give a whole number of generations >= 1")
    if raw.get("init"):
      raise _fail(f"stages[{raw.get('name')}].init", "born-again generations start from scratch")
    base = {k: v for k, v in raw.items() if k != "generations"}
    for k in range(1, n + 1):
      gen = {**base, "name": f"{raw.get('name')}-g{k}", "generation": k}
      if k > 1:
        gen["teacher"] = f"{raw.get('name')}-g{k - 1}"
      out.append(gen)
  return out


def _stage(raw: Any, i: int, stages: list[dict], overrides) -> dict:
  where = f"stages[{i}]"
  if not isinstance(raw, dict):
    raise _fail(where, f"must be a dict with name and action, not {type(raw).__name__}")
  name, action = raw.get("name"), raw.get("action")
  if not isinstance(name, str) or not _NAME.match(name):
    raise _fail(f"{where}.name", f"{name!r}: use letters, digits, '_' or '-'")
  where = f"stages[{name}]"
  if any(s["name"] == name for s in stages):
    raise _fail(f"{where}.name", "is used twice; stage names are unique")
  if action not in ACTIONS:
    raise _fail(f"{where}.action", f"{action!r}: choose one of {', '.join(ACTIONS)}")
  unknown = set(raw) - {"name", "action"} - _KEYS[action]
  unknown -= {"generation"} if action == "distil" else set()  # expand_generations' mark
  if unknown:
    raise _fail(
      where, f"unknown key(s) {sorted(unknown)} for {action}; known: {sorted(_KEYS[action])}"
    )
  stage = {**raw, "index": i, "dir": f"{i:02d}-{name}"}
  if action in ("train", "distil"):
    if not isinstance(raw.get("config"), ml_collections.ConfigDict):
      raise _fail(f"{where}.config", "must be a run config (ConfigDict, e.g. default_config())")
    cfg = copy.deepcopy(raw["config"])  # a copy the overrides change
    for key, value in overrides:
      config_lib.apply_override(cfg, key, value)
    cfg.seed += raw.get("generation", 0)  # born-again generations: their own init
    stage["config"] = cfg
  if action == "distil":
    teacher = raw.get("teacher", "original")
    stage["teacher"] = (
      teacher if teacher == "original" else _stage_ref(stages, i, "teacher", teacher, where)
    )
    if raw.get("init"):
      stage["init"] = _stage_ref(stages, i, "init", raw["init"], where)
  if action in ("prune", "quantise", "export"):
    stage["from"] = _stage_ref(stages, i, "from", raw.get("from", "previous"), where)
  if action == "prune" and not isinstance(raw.get("targets"), dict):
    raise _fail(f"{where}.targets", "must be a dict, e.g. {'d_ff': 0.5, 'num_heads': 0.75}")
  if action == "export" and raw.get("format", "auto") not in ("auto", "int8", "hf"):
    raise _fail(f"{where}.format", f"{raw['format']!r}: choose int8 or hf")
  return stage
