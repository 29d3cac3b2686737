"""A training run: build everything from the config, then loop over steps.

``build_run`` turns a validated config into a ``Run`` (mesh, models, objective,
optimizer, initial state, teacher params, the jitted step, the data). ``train``
drives it: it dispatches step n, then fetches step n-1's metrics while step n
runs (the host never blocks the device), shows a progress bar and writes
``WORKDIR/metrics.jsonl``. The teacher is loaded each run, never checkpointed.
"""

import copy
import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxdistill import checkpoint, metrics as metrics_lib, models, objective as objective_lib
from jaxdistill import precision, sharding as sharding_lib, train as train_lib, validate
from jaxdistill import data as data_lib
from jaxdistill.errors import JaxdistillError
from jaxdistill.models.transformer import Transformer, count_params, flops_per_token


@dataclasses.dataclass
class Run:
  """Everything a training run needs, built once from the config."""

  cfg: Any
  mesh: jax.sharding.Mesh
  objective: objective_lib.Objective
  student: Transformer
  teacher: Transformer | None
  state: train_lib.TrainState
  teacher_params: Any
  step_fn: Callable  # jitted distill_step
  data_iter: Any  # see jaxdistill.data: next() -> local batch; get_state/set_state
  flops_per_step: float


def _model(cfg: Any, side: str) -> Transformer:
  policy = precision.parse_policy(cfg[side].policy, f"{side}.policy")
  return Transformer(models.transformer_config(cfg[side], policy, side))


def pretrain_config(cfg: Any) -> Any:
  """The config that trains the teacher itself on CE (teacher.source='pretrain')."""
  t = copy.deepcopy(cfg)
  for key in (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "d_ff",
    "max_len",
    "norm",
    "pos",
    "tie_embeddings",
    "activation",
    "policy",
  ):
    t.student[key] = cfg.teacher[key]
  # The teacher trains in f32 params whatever its inference policy stores.
  compute = precision.parse_policy(cfg.teacher.policy, "teacher.policy").compute_dtype
  t.student.policy = f"p=f32,c={jnp.dtype(compute).name},o=f32"
  t.teacher.source = "none"
  for key in ("logit", "attention", "hidden"):
    t.distill[key].weight = 0.0
  t.optim.steps = cfg.teacher.pretrain_steps
  t.optim.lr = cfg.teacher.pretrain_lr
  t.optim.warmup_steps = max(1, cfg.teacher.pretrain_steps // 10)
  return t


def _teacher_params(cfg: Any, teacher: Transformer, mesh, workdir: str | None):
  """Teacher params by ``teacher.source``, in the teacher's shardings and dtype."""
  source, seq_len = cfg.teacher.source, cfg.data.seq_len
  if source == "random":
    return train_lib.init_params(teacher, jax.random.key(cfg.seed + 1), mesh, seq_len)
  shardings = train_lib.param_shardings(teacher, mesh, seq_len)
  if source == "pretrain":
    if workdir is None:
      raise JaxdistillError("teacher.source='pretrain' needs a workdir to train the teacher in")
    path = os.path.join(workdir, "teacher")
    if not os.path.isdir(os.path.join(path, checkpoint.FINAL_PARAMS)):
      print(f"Pretraining the teacher for {cfg.teacher.pretrain_steps} steps in {path}")
      train(pretrain_config(cfg), path, devices=list(mesh.devices.flat))
  else:
    path = cfg.teacher.path
  abstract = jax.eval_shape(
    lambda: teacher.init(jax.random.key(0), np.zeros((1, seq_len), np.int32))["params"]
  )
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
  )
  params = checkpoint.load_params(os.path.join(path, checkpoint.FINAL_PARAMS), target)
  return params, shardings


def build_run(cfg: Any, workdir: str | None = None, devices=None) -> Run:
  """Builds the mesh, models, state, teacher params and the jitted step."""
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  validate.check_mesh(cfg, dict(mesh.shape))
  obj = objective_lib.make_objective(cfg)
  student = _model(cfg, "student")
  teacher = _model(cfg, "teacher") if obj.uses_teacher else None
  tx = train_lib.make_optimizer(cfg.optim)
  state, state_shardings = train_lib.init_state(
    obj,
    student,
    tx,
    jax.random.key(cfg.seed),
    mesh,
    cfg.data.seq_len,
    cfg.student.d_model,
    cfg.teacher.d_model,
  )
  teacher_params, teacher_shardings = (None, None)
  if teacher is not None:
    teacher_params, teacher_shardings = _teacher_params(cfg, teacher, mesh, workdir)
  step = train_lib.make_distill_step(
    obj, student, teacher, tx, cfg.optim.grad_accum, lr=train_lib.lr_schedule(cfg.optim)
  )
  step_fn = train_lib.jit_distill_step(step, state_shardings, teacher_shardings, mesh)
  data_iter = data_lib.make_iterator(cfg, "train")
  tokens = cfg.data.batch_size * cfg.data.seq_len
  flops = (
    metrics_lib.distill_flops_per_token(
      flops_per_token(student.config, cfg.data.seq_len),
      flops_per_token(teacher.config, cfg.data.seq_len) if teacher else None,
    )
    * tokens
  )
  return Run(cfg, mesh, obj, student, teacher, state, teacher_params, step_fn, data_iter, flops)


def run_steps(run: Run, num_steps: int, on_metrics: Callable[[int, dict, float], None]) -> None:
  """Runs ``num_steps`` steps, calling ``on_metrics(step, metrics, seconds)`` one step late.

  Step n+1 is dispatched before step n's metrics are fetched, so fetching them
  overlaps with device work. ``seconds`` is the wall time between fetches.
  """
  pending, last = None, time.perf_counter()
  with sharding_lib.rules_context(run.mesh):
    for _ in range(num_steps):
      index = int(run.state.step) if pending is None else pending[0]
      batch = sharding_lib.shard_batch(next(run.data_iter), run.mesh)
      run.state, step_metrics = run.step_fn(run.state, run.teacher_params, batch)
      if pending is not None:
        fetched = jax.device_get(pending[1])
        now = time.perf_counter()
        on_metrics(pending[0], fetched, now - last)
        last = now
      pending = (index + 1, step_metrics)
    if pending is not None:
      fetched = jax.device_get(pending[1])
      on_metrics(pending[0], fetched, time.perf_counter() - last)


def _prepare_workdir(cfg: Any, workdir: str) -> None:
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    raise JaxdistillError(
      f"workdir {workdir!r} already holds a run (metrics.jsonl); "
      "pass a new --workdir or delete that one"
    )
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))


def train(cfg: Any, workdir: str, devices=None) -> dict[str, Any]:
  """Trains per ``cfg`` in ``workdir``; returns a summary dict.

  Writes ``config.json``, ``metrics.jsonl`` and (``ckpt.save_final``)
  ``final_params/`` in ``workdir``.
  """
  # Everything that can be checked before touching the disk is checked first.
  validate.check_mesh(cfg, dict(sharding_lib.make_mesh(cfg.mesh, devices).shape))
  _prepare_workdir(cfg, workdir)
  run = build_run(cfg, workdir, devices)
  steps, every = cfg.optim.steps, cfg.log.every
  tokens = cfg.data.batch_size * cfg.data.seq_len
  writer = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  show = cfg.log.progress and jax.process_index() == 0
  bar = tqdm.tqdm(total=steps, disable=not show, unit="step", dynamic_ncols=True)
  step_times, losses = [], []

  def on_metrics(step, m, seconds):
    step_times.append(seconds)
    losses.append(float(m["train/loss"]))
    m = dict(
      m,
      **{
        "perf/step_s": seconds,
        "perf/tokens_per_s": tokens / seconds,
        "perf/tflops_per_s": run.flops_per_step / seconds / 1e12,
      },
    )
    bar.update(1)
    bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / seconds:,.0f}")
    if step % every == 0 or step in (1, steps):
      writer.write({"step": step, **m})

  try:
    run_steps(run, steps, on_metrics)
  finally:
    bar.close()
    writer.close()
  if cfg.ckpt.save_final:
    checkpoint.save_params(
      os.path.join(workdir, checkpoint.FINAL_PARAMS), run.state.params["student"]
    )
  steady = step_times[2:] or step_times
  summary = {
    "steps": steps,
    "first_loss": losses[0],
    "final_loss": losses[-1],
    "median_step_s": statistics.median(steady),
    "tokens_per_s": tokens / statistics.median(steady),
    "student_params": count_params(run.state.params["student"]),
    "teacher_params": count_params(run.teacher_params) if run.teacher_params else 0,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return summary
