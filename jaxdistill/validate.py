"""Config validation: every mistake a user can make becomes a ConfigError naming the key.

``validate(cfg)`` checks what can be checked without devices (called by
``config.load_config``); ``check_mesh(cfg, mesh)`` checks what depends on the
device mesh (called when a run starts).
"""

import os
from typing import Any

from jaxdistill import models, objective, precision
from jaxdistill.errors import ConfigError

TEACHER_SOURCES = ("none", "random", "pretrain", "workdir")
DATA_SOURCES = ("synthetic",)


def _positive(cfg: Any, key: str) -> None:
  section, leaf = key.rsplit(".", 1)
  value = cfg[section][leaf]
  if not value > 0:
    raise ConfigError(key, f"must be > 0, got {value!r}")


def validate(cfg: Any) -> None:
  """Raises ConfigError for the first bad or inconsistent setting."""
  student_policy = precision.parse_policy(cfg.student.policy, "student.policy")
  precision.check_trainable(student_policy, "student.policy")
  models.transformer_config(cfg.student, student_policy, "student")
  t = cfg.teacher
  if t.source not in TEACHER_SOURCES:
    raise ConfigError("teacher.source", f"unknown {t.source!r}; choose from {TEACHER_SOURCES}")
  if t.source != "none":
    models.transformer_config(t, precision.parse_policy(t.policy, "teacher.policy"), "teacher")
  if t.source == "pretrain" and t.pretrain_steps <= 0:
    raise ConfigError("teacher.pretrain_steps", "must be > 0 when teacher.source='pretrain'")
  if t.source == "workdir" and not os.path.isdir(t.path):
    raise ConfigError(
      "teacher.path",
      f"{t.path!r} is not a directory; point it at the "
      "--workdir of a finished `jaxdistill train` run",
    )
  if cfg.data.source not in DATA_SOURCES:
    raise ConfigError("data.source", f"unknown {cfg.data.source!r}; choose from {DATA_SOURCES}")
  for key in (
    "data.batch_size",
    "data.seq_len",
    "optim.steps",
    "optim.lr",
    "optim.grad_accum",
    "log.every",
  ):
    _positive(cfg, key)
  for side in ("student", "teacher") if t.source != "none" else ("student",):
    if cfg.data.seq_len > cfg[side].max_len:
      raise ConfigError(
        "data.seq_len", f"{cfg.data.seq_len} exceeds {side}.max_len={cfg[side].max_len}"
      )
  if cfg.data.batch_size % cfg.optim.grad_accum:
    raise ConfigError(
      "optim.grad_accum",
      f"data.batch_size={cfg.data.batch_size} does "
      f"not split into {cfg.optim.grad_accum} micro-batches",
    )
  if cfg.optim.lr_schedule not in ("cosine", "constant"):
    raise ConfigError(
      "optim.lr_schedule", f"unknown {cfg.optim.lr_schedule!r}; choose cosine or constant"
    )
  objective.make_objective(cfg)


def check_mesh(cfg: Any, mesh_shape: dict[str, int]) -> None:
  """Checks that the batch and the models split evenly over the mesh."""
  rows = mesh_shape["data"] * mesh_shape["fsdp"]
  micro = cfg.data.batch_size // cfg.optim.grad_accum
  if micro % rows:
    raise ConfigError(
      "data.batch_size",
      f"each micro-batch of {micro} rows must split over mesh data*fsdp={rows} devices",
    )
  tensor = mesh_shape["tensor"]
  sides = ("student",) if cfg.teacher.source == "none" else ("student", "teacher")
  for side in sides:
    for key in ("vocab_size", "num_heads", "d_ff"):
      if cfg[side][key] % tensor:
        raise ConfigError(
          "mesh.tensor",
          f"{side}.{key}={cfg[side][key]} does not split over tensor={tensor} devices",
        )
    if cfg[side].d_model % mesh_shape["fsdp"]:
      raise ConfigError(
        "mesh.fsdp",
        f"{side}.d_model={cfg[side].d_model} does not split over fsdp={mesh_shape['fsdp']} devices",
      )
