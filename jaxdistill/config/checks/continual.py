"""Config checks of the ``continual`` section (continual distillation, ``data/continual.py``).

What the config alone can tell: the keys' types and ranges, a stream the data can be, a
teacher a refresh can fine-tune, and a window no larger than the run's stream of
``optim.steps`` steps. Whether a window fits in the stream's rows needs the data: that is
``data.continual.check`` (run with ``data.check`` before a run writes anything).
"""

from typing import Any

from jaxdistill import paths
from jaxdistill.data.sources import TEXT_SOURCES
from jaxdistill.errors import ConfigError

# A refresh fine-tunes one teacher model that the run loads.
REFRESHABLE = ("random", "pretrain", "workdir", "hf")


def _int_at_least(c: Any, key: str, low: int) -> int:
  value = c[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ConfigError(f"continual.{key}", f"must be an int >= {low}, got {value!r}")
  return value


def check(cfg: Any) -> None:
  """Raises ConfigError for the first bad ``continual`` setting (nothing when it is off)."""
  c = cfg.continual
  if _int_at_least(c, "domains", 0) == 0:
    return
  if cfg.student.arch != "transformer" or cfg.data.source not in TEXT_SOURCES:
    raise ConfigError(
      "continual.domains",
      f"a continual stream is made of text documents: data.source={cfg.data.source!r} with "
      f"student.arch={cfg.student.arch!r} has none (use a text source and a transformer)",
    )
  if cfg.data.source == "task" or cfg.teacher.source == "cache":
    raise ConfigError(
      "continual.domains",
      "the continual stream replaces the training rows: not with data.source='task' (prompt + "
      "completion rows) nor teacher.source='cache' (the cache's rows)",
    )
  if cfg.data.packing != "pack":
    raise ConfigError("data.packing", "a continual stream packs its documents: use 'pack'")
  window = _int_at_least(c, "window_steps", 1)
  _int_at_least(c, "eval_rows", 0)
  if window > cfg.optim.steps:
    raise ConfigError(
      "continual.window_steps",
      f"a window of {window} steps is larger than the stream this run trains on "
      f"(optim.steps={cfg.optim.steps})",
    )
  if not c.snapshot_weight >= 0:
    raise ConfigError("continual.snapshot_weight", f"must be >= 0, got {c.snapshot_weight!r}")
  if _int_at_least(c, "refresh_every", 0) == 0:
    return
  if c.teacher_dir and not paths.isdir(c.teacher_dir):
    raise ConfigError(
      "continual.teacher_dir",
      f"{c.teacher_dir!r} is not a directory (of teacher checkpoints named by step: DIR/<step>/)",
    )
  if not c.teacher_dir:  # fine-tuned on the window
    _int_at_least(c, "teacher_steps", 1)
    if not c.teacher_lr > 0:
      raise ConfigError("continual.teacher_lr", f"must be > 0, got {c.teacher_lr!r}")
  if cfg.teacher.source not in REFRESHABLE or cfg.teachers:
    raise ConfigError(
      "continual.refresh_every",
      f"a refresh fine-tunes the one teacher model the run loads (teacher.source one of "
      f"{REFRESHABLE}, no further teachers); got teacher.source={cfg.teacher.source!r}"
      + (f" and {len(cfg.teachers)} further teachers" if cfg.teachers else ""),
    )
