"""Config checks of several teachers (``teachers``, ``distill.ensemble``, the feature terms'
``teacher`` indices).

Every one-teacher check of ``validate`` runs once per teacher on that teacher's view of the
config (``views``): teacher 0's view is the config without the further teachers and without
the feature terms that read them; teacher k's (k >= 1) has ``teachers[k - 1]`` as ``teacher``
and only the feature terms that read it. An error found in teacher k's view names its keys
``teachers[k - 1].<key>`` (``renamed``). ``check_ensemble`` adds what only the whole
ensemble can get wrong.
"""

import copy
import re
from collections.abc import Mapping
from typing import Any, Iterator

from jaxdistill import config as config_lib
from jaxdistill import models, paths
from jaxdistill.config.checks import vision as validate_vision
from jaxdistill.distill import ensemble, sparse
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import precision

# Sources a further teacher may have: a model that runs (a cache is a whole ensemble's).
EXTRA_SOURCES = ("random", "pretrain", "workdir", "hf")
# The distill sections of feature terms; each names the teacher it reads (``teacher``).
FEATURE_SECTIONS = ("attention", "hidden", "embedding", "attention_transfer", "feature_map")


def _feature_off(section: Any) -> None:
  """Turns a feature term off (weight 0 under a constant schedule; MiniLM's value term too)."""
  section.weight, section.schedule = 0.0, "constant"
  if "value_weight" in section:
    section.value_weight = 0.0


def views(cfg: Any) -> Iterator[tuple[int, Any]]:
  """(k, teacher k's view of ``cfg``) for each teacher; just (0, cfg) with one teacher."""
  if not cfg.teachers:
    yield 0, cfg
    return
  sections = config_lib.teachers_of(cfg)
  for k, section in enumerate(sections):
    view = copy.deepcopy(cfg)
    view.teacher, view.teachers = copy.deepcopy(section), ()
    for name in FEATURE_SECTIONS:
      if view.distill[name].teacher != k:
        _feature_off(view.distill[name])
      view.distill[name].teacher = 0
    yield k, view


def renamed(error: ConfigError, k: int) -> ConfigError:
  """``error`` of teacher k's view (k >= 1) with its ``teacher.`` keys as ``teachers[k-1].``."""
  name = lambda text: re.sub(r"\bteacher\.", f"teachers[{k - 1}].", text)  # noqa: E731
  message = str(error)[len(error.key) + 2 :]
  return ConfigError(name(error.key), name(message))


def check_ensemble(cfg: Any) -> None:
  """What only several teachers can get wrong: the list itself, sources, weights, the
  ensemble kind against the head, one vocabulary (or class count), the feature indices."""
  n = 1 + len(cfg.teachers) if isinstance(cfg.teachers, (tuple, list)) else 0
  if not n:
    raise ConfigError("teachers", "must be a tuple of config.teacher_fields(...) dicts")
  for name in FEATURE_SECTIONS:
    k = cfg.distill[name].teacher
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < n:
      raise ConfigError(
        f"distill.{name}.teacher",
        f"must be a teacher index 0..{n - 1} (0 = teacher, i = teachers[i - 1]), got {k!r}",
      )
  if n == 1:
    return
  if cfg.distill.ensemble not in ensemble.KINDS:
    raise ConfigError(
      "distill.ensemble", f"unknown {cfg.distill.ensemble!r}; choose from {ensemble.KINDS}"
    )
  if cfg.teacher.source == "ema":
    raise ConfigError(
      "teachers", "an EMA teacher (teacher.source='ema') teaches alone; leave teachers empty"
    )
  if cfg.teacher.source in ("none", "cache"):
    raise ConfigError(
      "teachers",
      f"several teachers need teacher.source to be a model (not {cfg.teacher.source!r}); an "
      "ensemble's precomputed targets are read with teacher.source='cache' and no teachers",
    )
  for i, entry in enumerate(cfg.teachers):
    _check_entry(entry, i)
  sections = config_lib.teachers_of(cfg)
  _check_weights(sections)
  _check_head(cfg)
  key = "num_classes" if validate_vision.is_image(cfg) else "vocab_size"
  for i, section in enumerate(sections[1:]):
    if section[key] != cfg.teacher[key]:
      raise ConfigError(
        f"teachers[{i}].{key}",
        f"{section[key]} differs from teacher.{key}={cfg.teacher[key]}; an ensemble's logit "
        "targets need one vocabulary (one set of classes)",
      )


def _check_entry(entry: Any, i: int) -> None:
  """``teachers[i]``: a dict of known keys with a source a further teacher may have."""
  if not isinstance(entry, Mapping):
    raise ConfigError(f"teachers[{i}]", "must be a dict: config.teacher_fields(source=..., ...)")
  known = config_lib.teacher_fields()
  for key in entry:
    if key not in known:
      raise ConfigError(f"teachers[{i}].{key}", f"unknown key; known keys: {sorted(known)}")
  section = config_lib.teacher_fields(**dict(entry))
  if section["source"] not in EXTRA_SOURCES:
    raise ConfigError(
      f"teachers[{i}].source",
      f"{section['source']!r}; a further teacher is one of {EXTRA_SOURCES} (a cache holds a "
      "whole ensemble's targets: read it with teacher.source='cache' and no teachers)",
    )
  if section["source"] == "workdir" and not paths.isdir(section["path"]):
    raise ConfigError(
      f"teachers[{i}].path",
      f"{section['path']!r} is not a directory; point it at the --workdir of a finished "
      "`jaxdistill train` run",
    )


def _check_weights(sections) -> None:
  for k, section in enumerate(sections):
    w = section.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
      key = "teacher.weight" if k == 0 else f"teachers[{k - 1}].weight"
      raise ConfigError(key, f"must be a number >= 0, got {w!r}")
  if sum(float(s.weight) for s in sections) <= 0:
    raise ConfigError("teacher.weight", "the teachers' weights are all 0; give one a weight > 0")


def _check_head(cfg: Any) -> None:
  """The head term's ensemble: "probs" mixes whole softmaxes, which the fused head never
  forms (the sparse head forms them per token chunk, the dense head whole)."""
  d = cfg.distill
  if d.ensemble != "probs" or (d.logit.weight == 0 and d.logit.schedule == "constant"):
    return
  if d.fused and not validate_vision.is_image(cfg) and d.logit.kind not in sparse.SPARSE_KINDS:
    raise ConfigError(
      "distill.ensemble",
      "'probs' mixes each teacher's whole softmax, which the fused head never forms; use "
      "distill.ensemble='logits' or 'losses', or distill.fused=False",
    )


def check_ema(cfg: Any) -> None:
  """``teacher.source='ema'`` (train/ema.py): a decay in (0, 1), warmup steps >= 0, the
  student's architecture in the teacher's model keys, a float student, no teacher blocks."""
  t, s = cfg.teacher, cfg.student
  d = t.ema_decay
  if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
    raise ConfigError("teacher.ema_decay", f"must be a number in (0, 1), got {d!r}")
  w = t.ema_warmup_steps
  if isinstance(w, bool) or not isinstance(w, int) or w < 0:
    raise ConfigError("teacher.ema_warmup_steps", f"must be an int >= 0, got {w!r}")
  for key in dict.fromkeys(("arch", *models.shape_keys(s))):
    if key not in models.EXECUTION_KEYS and t[key] != s[key]:
      raise ConfigError(
        f"teacher.{key}",
        f"is {t[key]!r} but student.{key} is {s[key]!r}: an EMA teacher is the student's "
        f"architecture; set teacher.{key}={s[key]!r} (or copy every model key)",
      )
  policy = precision.parse_policy(s.policy, "student.policy")
  if policy.fp8 or policy.int8:
    raise ConfigError(
      "student.policy", "c=fp8 / c=int8 students have no EMA teacher (teacher.source='ema')"
    )
  if s.init_layers:
    raise ConfigError("student.init_layers", "copies teacher blocks; an EMA teacher has none")
