"""Where the teacher's params come from (``teacher.source``).

  none      no teacher: the student trains on CE alone
  random    random init (tests, smoke runs)
  pretrain  trained here first on CE into WORKDIR/teacher/, reused afterwards
  workdir   the final params of an earlier `jaxdistill train` run at teacher.path

Whatever the source, the params arrive sharded by the same logical rules as the
student's, in the teacher policy's param dtype, and are never checkpointed:
checkpoints record only the teacher's identity (``identity``).
"""

import copy
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import checkpoint, precision, train as train_lib
from jaxdistill.errors import JaxdistillError


def pretrain_config(cfg: Any) -> Any:
  """The config that trains the teacher itself on CE (teacher.source='pretrain')."""
  t = copy.deepcopy(cfg)
  for key in checkpoint.MODEL_KEYS:
    t.student[key] = cfg.teacher[key]
  # The teacher trains in f32 params whatever its inference policy stores.
  compute = precision.parse_policy(cfg.teacher.policy, "teacher.policy").compute_dtype
  t.student.policy = f"p=f32,c={jnp.dtype(compute).name},o=f32"
  t.student.init_from = ""
  t.teacher.source = "none"
  for key in ("logit", "attention", "hidden"):
    t.distill[key].weight = 0.0
  t.optim.steps = cfg.teacher.pretrain_steps
  t.optim.lr = cfg.teacher.pretrain_lr
  t.optim.warmup_steps = max(1, cfg.teacher.pretrain_steps // 10)
  return t


def params_path(cfg: Any, workdir: str | None) -> str | None:
  """The final_params directory the teacher loads from (None for random/none)."""
  if cfg.teacher.source == "pretrain":
    if workdir is None:
      raise JaxdistillError("teacher.source='pretrain' needs a workdir to train the teacher in")
    return os.path.join(workdir, "teacher", checkpoint.FINAL_PARAMS)
  if cfg.teacher.source == "workdir":
    return final_params_dir(cfg.teacher.path)
  return None


def final_params_dir(path: str) -> str:
  """``path`` itself if it holds params, else ``path/final_params`` (a workdir)."""
  inner = os.path.join(path, checkpoint.FINAL_PARAMS)
  return inner if os.path.isdir(inner) else path


def load(cfg: Any, teacher: nn.Module, mesh, workdir: str | None, train_fn: Callable):
  """Teacher params by ``teacher.source``: (params, shardings, path or None).

  Args:
    cfg: the run's config.
    teacher: the teacher module.
    mesh: the device mesh.
    workdir: the run's workdir (pretrain trains into WORKDIR/teacher).
    train_fn: ``loop.train``, to pretrain the teacher.
  """
  seq_len = cfg.data.seq_len
  if cfg.teacher.source == "random":
    params, shardings = train_lib.init_params(teacher, jax.random.key(cfg.seed + 1), mesh, seq_len)
    return params, shardings, None
  path = params_path(cfg, workdir)
  if cfg.teacher.source == "pretrain" and not os.path.isdir(path):
    run_dir = os.path.dirname(path)
    if jax.process_index() == 0:
      print(f"Pretraining the teacher for {cfg.teacher.pretrain_steps} steps in {run_dir}")
    train_fn(pretrain_config(cfg), run_dir, devices=list(mesh.devices.flat))
  shardings = train_lib.param_shardings(teacher, mesh, seq_len)
  abstract = jax.eval_shape(
    lambda: teacher.init(jax.random.key(0), np.zeros((1, seq_len), np.int32))["params"]
  )
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
  )
  return checkpoint.load_params(path, target), shardings, path
