"""A training run: build everything from the config, then loop over steps.

``build_run`` turns a config (validated here) into a ``Run``: mesh, models, objective,
optimizer, initial state, teacher variables, the jitted step and (optionally) the data.
Student or teacher variables may be given instead of initialised or loaded, which is how a
library user pairs the step with params of their own (``examples/pair_step.py``).
``train`` drives a run in a workdir: it dispatches step n, then fetches step n-1's metrics
while step n runs (the host never blocks the device), evaluates every ``eval.every`` steps,
checkpoints, shows a progress bar and writes ``WORKDIR/metrics.jsonl``. The teacher is
loaded each run, never checkpointed; a ``teacher.source='pretrain'`` teacher is trained by
an explicit stage first (``pretrain_teacher``).
"""

import dataclasses
import functools
import json
import os
import shutil
import signal
import statistics
import threading
import time
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import tqdm

from jaxdistill import checkpoint, metrics as metrics_lib, models, objective as objective_lib
from jaxdistill import precision, sharding as sharding_lib, train as train_lib, validate
from jaxdistill import data as data_lib, distributed, evaluate as evaluate_lib
from jaxdistill import teacher as teacher_lib
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import count_params, flops_per_token


@dataclasses.dataclass
class Run:
  """Everything a training run needs, built once from the config.

  ``step_fn(state, teacher_vars, batch) -> (state, metrics)`` is the jitted
  ``train.distill_step``; ``teacher_vars`` is ``{"params": ...}`` plus a c=fp8 teacher's
  frozen FP8 scales (None without a teacher model).
  """

  cfg: Any
  mesh: jax.sharding.Mesh
  objective: objective_lib.Objective
  student: nn.Module  # models.build's: a decoder or an encoder
  teacher: nn.Module | None
  state: train_lib.TrainState
  teacher_vars: Any
  step_fn: Callable  # jitted distill_step
  data_iter: Any  # see jaxdistill.data: next() -> local batch; get_state/set_state; or None
  flops_per_step: float
  make_state: Callable[[], train_lib.TrainState]  # a fresh initial state
  teacher_path: str | None = None  # where the teacher's params came from

  @property
  def teacher_params(self) -> Any:
    """The teacher's params (None without a teacher model)."""
    return None if self.teacher_vars is None else self.teacher_vars["params"]

  def step(self, batch: dict) -> dict:
    """Runs one step on a global batch (``sharding.shard_batch``); returns its metrics
    (on device: fetching them waits for the step)."""
    with sharding_lib.rules_context(self.mesh):
      self.state, metrics = self.step_fn(self.state, self.teacher_vars, batch)
    return metrics

  def compile(self, batch: dict) -> Any:
    """The compiled step for batches shaped like ``batch`` (a global batch or its
    ``jax.ShapeDtypeStruct``s): ``.memory_analysis()``, ``.cost_analysis()``, ``.as_text()``.
    Nothing runs and no buffer is donated."""
    with sharding_lib.rules_context(self.mesh):
      return self.step_fn.lower(self.state, self.teacher_vars, batch).compile()


def _model(cfg: Any, side: str) -> nn.Module:
  policy = precision.parse_policy(cfg[side].policy, f"{side}.policy")
  return models.build(cfg[side], policy, side)


def build_run(
  cfg: Any,
  workdir: str | None = None,
  devices=None,
  create_state: bool = True,
  *,
  student_vars: Any = None,
  teacher_vars: Any = None,
  data: bool = True,
) -> Run:
  """Builds the mesh, models, state, teacher variables and the jitted step.

  Args:
    cfg: a config (``config.default_config()`` or a loaded file); validated here.
    workdir: the run's directory (only read for teacher.source='pretrain', whose stage
      ``pretrain_teacher`` must have run).
    devices: the devices of the mesh (default: all).
    create_state: False leaves ``run.state`` abstract (shapes + shardings), to
      be restored from a checkpoint without first allocating a fresh one.
    student_vars: the student's Flax variables ``{"params": ...}`` to start from; its
      random init is then never computed.
    teacher_vars: the teacher's variables ``{"params": ...}``, used instead of
      ``teacher.source`` (which must still name a teacher model, e.g. 'random'); placed into
      the teacher's shardings. A c=fp8 teacher's scales are calibrated as usual.
    data: False builds no data iterator (``run.data_iter`` is None): feed ``run.step``.

  Returns:
    The Run. ``run.step(batch)`` trains one step; ``run.compile(batch)`` gives the compiled
    step; ``run_steps`` drives it from ``run.data_iter``.
  """
  validate.validate(cfg)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  validate.check_mesh(cfg, dict(mesh.shape))
  obj = objective_lib.make_objective(cfg)
  student = _model(cfg, "student")
  teacher = _model(cfg, "teacher") if obj.uses_teacher else None
  tx = train_lib.make_optimizer(cfg.optim)
  make_state = functools.partial(
    train_lib.init_state,
    obj,
    student,
    tx,
    jax.random.key(cfg.seed),
    mesh,
    cfg.data.seq_len,
    cfg.student.d_model,
    cfg.teacher.d_model,
    loss_scale=precision.init_loss_scale(cfg.optim),
    student_variables=student_vars,
  )
  state, state_shardings = make_state(create=create_state)
  teacher_vars, teacher_shardings, teacher_path = _teacher_vars(
    cfg, teacher, mesh, workdir, teacher_vars
  )
  step = train_lib.make_distill_step(
    obj,
    student,
    teacher,
    tx,
    cfg.optim.grad_accum,
    lr=train_lib.lr_schedule(cfg.optim),
    loss_scale_period=cfg.optim.loss_scale_period,
  )
  step_fn = train_lib.jit_distill_step(step, state_shardings, teacher_shardings, mesh)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  flops = tokens * metrics_lib.distill_flops_per_token(
    flops_per_token(student.config, cfg.data.seq_len),
    flops_per_token(teacher.config, cfg.data.seq_len) if teacher else None,
  )
  return Run(
    cfg,
    mesh,
    obj,
    student,
    teacher,
    state,
    teacher_vars,
    step_fn,
    data_lib.make_iterator(cfg, "train") if data else None,
    flops,
    lambda: make_state(create=True)[0],
    teacher_path,
  )


def _teacher_vars(cfg: Any, teacher, mesh, workdir: str | None, given: Any) -> tuple:
  """(teacher_vars, their shardings, path or None): loaded by ``teacher.source`` or given;
  a c=fp8 teacher's calibrated FP8 scales join its params as further collections."""
  if teacher is None:
    return None, None, None
  if given is not None:
    if set(given) != {"params"}:
      raise JaxdistillError(
        f"given teacher variables must be {{'params': ...}}, got keys {sorted(given)}"
      )
    shardings = models.variable_shardings(teacher, mesh, cfg.data.seq_len)["params"]
    params, path = jax.device_put(given["params"], shardings), None
  else:
    params, shardings, path = teacher_lib.load(cfg, teacher, mesh, workdir)
  variables, var_shardings = {"params": params}, {"params": shardings}
  if getattr(teacher.config, "fp8", False):
    fp8, fp8_shardings = teacher_lib.calibrate_fp8(cfg, teacher, params, mesh)
    variables.update(fp8)
    var_shardings.update(fp8_shardings)
  return variables, var_shardings, path


def pretrain_teacher(cfg: Any, workdir: str, devices=None) -> str | None:
  """The explicit stage before a ``teacher.source='pretrain'`` run is built: trains the
  teacher on CE into WORKDIR/teacher/ unless it is there already. Returns its final_params
  directory (None for other sources); a killed pretraining resumes like any run."""
  if cfg.teacher.source != "pretrain":
    return None
  path = teacher_lib.params_path(cfg, workdir)
  if not os.path.isdir(path):
    run_dir = os.path.dirname(path)
    if jax.process_index() == 0:
      print(f"Pretraining the teacher for {cfg.teacher.pretrain_steps} steps in {run_dir}")
    train(teacher_lib.pretrain_config(cfg), run_dir, devices=devices)
  return path


def run_steps(
  run: Run,
  num_steps: int,
  on_metrics: Callable[[int, dict, float], None],
  save_due: Callable[[int], bool] = lambda step: False,
  save: Callable[[int], None] = lambda step: None,
  evaluate: Callable[[int], None] | None = None,
  eval_every: int = 0,
) -> int:
  """Runs up to ``num_steps`` steps; returns how many ran.

  Step n+1 is dispatched before step n's metrics are fetched, so fetching them
  overlaps with device work; ``on_metrics(step, metrics, seconds)`` runs one
  step late (``seconds``: wall time between fetches) and may raise to stop.
  Every ``eval_every`` steps (0 = never) and whenever ``save_due(step)`` says so,
  the loop stops dispatching and fetches that step's metrics first, so
  ``run.state`` is exactly that step's: then ``evaluate(step)`` runs (if due),
  then ``save(step)`` (if due: after the evaluation, so an eval metric can pick
  the best checkpoint; never for a non-finite step, which ``on_metrics`` stops).
  A save due because of preemption ends the loop.
  """
  pending, last = None, time.perf_counter()

  def flush():
    nonlocal pending, last
    if pending is not None:
      fetched = jax.device_get(pending[1])
      now = time.perf_counter()
      step, pending = pending[0], None
      on_metrics(step, fetched, now - last)
      last = now

  with sharding_lib.rules_context(run.mesh):
    step = int(run.state.step)
    for done in range(1, num_steps + 1):
      batch = sharding_lib.shard_batch(next(run.data_iter), run.mesh)
      run.state, step_metrics = run.step_fn(run.state, run.teacher_vars, batch)
      flush()
      step += 1
      pending = (step, step_metrics)
      eval_now = bool(evaluate and eval_every and step % eval_every == 0)
      save_now = save_due(step)  # always asked: it also notices preemption
      if eval_now or save_now:
        flush()
        if eval_now:
          evaluate(step)
      if save_now:
        save(step)
        if _PREEMPTED["flag"]:
          return done
    flush()
  return num_steps


# --- preemption: SIGTERM / SIGINT finish the step, save, exit 0 -----------------

_PREEMPTED = {"flag": False}


def _on_signal(signum, frame):
  del frame
  if _PREEMPTED["flag"] and signum == signal.SIGINT:
    raise KeyboardInterrupt  # a second Ctrl-C stops at once
  _PREEMPTED["flag"] = True


class _PreemptionHandlers:
  """Installs the signal handlers for the duration of a run (main thread only)."""

  def __enter__(self):
    _PREEMPTED["flag"] = False
    self.old = {}
    # Several processes must stop at the SAME step, or the first to stop leaves
    # the others blocked in a collective. jax.distributed's preemption sync point
    # (manager.reached_preemption) agrees on that step; it hears SIGTERM through
    # its own handler, which a Python handler would replace. So with several
    # processes SIGTERM is left to JAX (SIGINT stops the job as usual).
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self.old[sig] = signal.signal(sig, _on_signal)
    return self

  def __exit__(self, *exc):
    for sig, handler in self.old.items():
      signal.signal(sig, handler)


# --- the driver ----------------------------------------------------------------


def _is_run_config(path: str) -> bool:
  """Whether ``path`` is a config.json that ``_prepare_workdir`` wrote (a run's, not a user's)."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {"student", "optim", "distill"} <= set(saved)


def _prepare_workdir(cfg: Any, workdir: str) -> None:
  """Checks ``workdir`` is new, empty or an earlier run's (to resume), then writes config.json.

  Never writes into a directory a user filled: only one holding checkpoints/ or the
  config.json of a run (an earlier run stopped before its first checkpoint) is resumed.
  """
  existing = os.path.abspath(workdir)  # the workdir, or the ancestor it would be made in
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise JaxdistillError(f"--workdir {workdir!r} is no directory ({existing!r} is a file)")
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINTS)
  if (
    os.path.isdir(workdir)
    and os.listdir(workdir)
    and not os.path.isdir(ckpt_dir)
    and not _is_run_config(os.path.join(workdir, "config.json"))
  ):
    raise JaxdistillError(
      f"workdir {workdir!r} is not empty and holds no jaxdistill run (checkpoints/ or its "
      "config.json); pass a new or empty --workdir"
    )
  has_checkpoints = bool(checkpoint.complete_steps(ckpt_dir))
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and not has_checkpoints:
    raise JaxdistillError(
      f"workdir {workdir!r} already holds a run (metrics.jsonl) with no checkpoint to resume; "
      "pass a new --workdir or delete that one"
    )
  # Every process judges the workdir as it was, before process 0 writes to it.
  distributed.barrier("jaxdistill:workdir-checked")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))


def _truncate_metrics(path: str, step: int) -> None:
  """Drops rows after ``step``: a resumed run rewrites them identically."""
  if jax.process_index() == 0 and os.path.exists(path):
    rows = [r for r in metrics_lib.read_jsonl(path) if r["step"] <= step]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def _start(run: Run, manager, workdir: str, resume_from: str | None) -> str:
  """Restores or initialises ``run.state``; returns how the run started."""
  cfg = run.cfg
  source = checkpoint.resolve_resume(manager, resume_from)
  if source is not None:
    source_manager, step = source
    saved = checkpoint.read_meta(source_manager, step)
    where = os.path.join(str(source_manager.directory), str(step))
    harmless = checkpoint.check_compatible(saved["config"], cfg.to_dict(), where)
    if harmless:
      warnings.warn(f"config differs from the checkpoint's in {harmless} (harmless)")
    run.state, _ = checkpoint.restore(source_manager, step, run.state, run.data_iter)
    if source_manager is manager:
      checkpoint.set_aside_newer(manager, step)
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), step)
    return f"resumed from step {step} ({where})"
  run.state = run.make_state()
  if cfg.student.init_layers:  # blocks of the teacher (e.g. a Hugging Face one)
    student = teacher_lib.student_from_teacher(cfg, run.teacher_params, run.state.params["student"])
    run.state = run.state.replace(params=dict(run.state.params, student=student))
    return f"initialised the student from teacher blocks {cfg.student.init_layers!r}"
  if cfg.student.init_from:
    path = teacher_lib.final_params_dir(cfg.student.init_from)
    target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      run.state.params["student"],
    )
    run.state = run.state.replace(
      params=dict(run.state.params, student=checkpoint.load_params(path, target))
    )
    return f"initialised the student from {path} (weights only)"
  return "started from scratch"


def train(cfg: Any, workdir: str, devices=None, resume_from: str | None = None) -> dict[str, Any]:
  """Trains per ``cfg`` in ``workdir`` (resuming if it holds checkpoints).

  Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json``
  and (``ckpt.save_final``) ``final_params/`` in ``workdir``.

  Returns:
    A summary dict; ``preempted`` is True when a signal ended the run early
    (after saving a checkpoint).
  """
  # Everything that can be checked before touching the disk is checked first.
  validate.validate(cfg)
  validate.check_mesh(cfg, dict(sharding_lib.make_mesh(cfg.mesh, devices).shape))
  data_lib.check(cfg)  # data, tokenizer and vocabulary (builds into the cache, not the workdir)
  _prepare_workdir(cfg, workdir)
  data_lib.save_run_files(cfg, workdir)
  pretrain_teacher(cfg, workdir, devices)  # its own stage, before this run is built
  run = build_run(cfg, workdir, devices, create_state=False)
  manager = checkpoint.make_manager(workdir, cfg.ckpt)
  best = checkpoint.make_best_manager(workdir, cfg.ckpt)
  try:
    started = _start(run, manager, workdir, resume_from)
  except BaseException:
    # Close Orbax's background threads before the error reaches the user, so
    # the interpreter's shutdown adds nothing after the one-line message.
    manager.close()
    if best is not None:
      best.close()
    raise
  meta = checkpoint.metadata(cfg, run.mesh, run.teacher_path)
  steps, every, start = cfg.optim.steps, cfg.log.every, int(run.state.step)
  tokens = cfg.data.batch_size * cfg.data.seq_len
  writer = metrics_lib.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
  show = cfg.log.progress and jax.process_index() == 0
  if jax.process_index() == 0:
    print(f"{started}; training steps {start + 1}..{steps}", flush=True)
  bar = tqdm.tqdm(total=steps, initial=start, disable=not show, unit="step", dynamic_ncols=True)
  step_times, losses, last_metrics = [], [], {}

  def on_metrics(step, m, seconds):
    step_times.append(seconds)
    losses.append(float(m["train/loss"]))
    last_metrics.update(m)
    perf = {
      "perf/step_s": seconds,
      "perf/tokens_per_s": tokens / seconds,
      "perf/tflops_per_s": run.flops_per_step / seconds / 1e12,
    }
    m = dict(m, **perf)
    bar.update(1)
    bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{tokens / seconds:,.0f}")
    if step % every == 0 or step in (1, steps) or m["train/nonfinite"]:
      writer.write({"step": step, **m})
    if m["train/nonfinite"] and cfg.optim.nan_policy == "stop":
      last = manager.latest_step()
      raise JaxdistillError(
        f"non-finite loss or gradient at step {step} (train/loss={m['train/loss']}); the update "
        f"was not applied and the run stopped. Last good checkpoint: "
        f"{'none' if last is None else os.path.join(str(manager.directory), str(last))}. "
        "Lower optim.lr, check the data, or set optim.nan_policy=skip"
      )

  def save_due(step):
    every_ckpt = cfg.ckpt.every
    preempted = _PREEMPTED["flag"] or manager.reached_preemption(step)
    _PREEMPTED["flag"] = bool(preempted)
    return preempted or step == steps or (every_ckpt > 0 and step % every_ckpt == 0)

  def save(step):
    checkpoint.save(manager, step, run.state, run.data_iter, meta, force=True)
    if best is not None and cfg.ckpt.best_metric in last_metrics:
      best.save(
        step,
        args=checkpoint.params_args(run.state.params["student"]),
        metrics={cfg.ckpt.best_metric: float(last_metrics[cfg.ckpt.best_metric])},
      )

  periodic = evaluate_lib.Periodic(cfg, run.student, run.mesh) if cfg.eval.every else None

  def evaluate(step):  # validation of the student; its row precedes that step's checkpoint
    m = periodic(run.state.params["student"], run.state.model_state)
    last_metrics.update(m)
    writer.write({"step": step, **m})

  try:
    with _PreemptionHandlers():
      ran = run_steps(run, steps - start, on_metrics, save_due, save, evaluate, cfg.eval.every)
  finally:
    bar.close()
    writer.close()
    manager.wait_until_finished()
    if best is not None:
      best.wait_until_finished()
  preempted = start + ran < steps
  if cfg.ckpt.save_final and not preempted and start < steps:
    final = os.path.join(workdir, checkpoint.FINAL_PARAMS)
    if os.path.isdir(final) and jax.process_index() == 0:  # a finished run resumed
      shutil.rmtree(final)
    distributed.barrier("jaxdistill:final-params-removed")  # all save into a clean dir
    checkpoint.save_params(final, run.state.params["student"])
  manager.close()
  steady = step_times[2:] or step_times or [float("nan")]
  summary = {
    "steps": steps,
    "start_step": start,
    "preempted": preempted,
    "last_step": start + ran,
    "first_loss": losses[0] if losses else None,
    "final_loss": losses[-1] if losses else None,
    "median_step_s": statistics.median(steady),
    "tokens_per_s": tokens / statistics.median(steady),
    "student_params": count_params(run.state.params["student"]),
    "teacher_params": count_params(run.teacher_params) if run.teacher_params else 0,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
  return summary
