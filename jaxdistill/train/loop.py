"""The training loop: drive a run step by step, and ``train``: a whole run in a workdir.

``run_steps`` dispatches step n, then fetches step n-1's metrics while step n runs (the host
never blocks the device); every ``eval.every`` steps and at each due checkpoint it stops to
fetch, evaluate, then save. ``train`` prepares the workdir, pretrains the teacher if asked
(``pretrain_teacher``), builds the run (``run.build_run``, re-exported here), restores or
initialises the state and loops, writing ``metrics.jsonl`` (MFU and goodput: ``throughput``;
TensorBoard events with ``log.tensorboard``), checkpoints, ``summary.json`` and
``final_params/``. The teacher is loaded each run, never checkpointed.
"""

import json
import os
import signal
import statistics
import tempfile
import threading
import time
import warnings
from typing import Any, Callable

import jax

from jaxdistill import data as data_lib, paths, progress
from jaxdistill.config import validate
from jaxdistill.data import corpora
from jaxdistill.errors import JaxdistillError
from jaxdistill.evaluation import evaluate as evaluate_lib
from jaxdistill.models import count_params, quant
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import checkpoint, throughput
from jaxdistill.train import codistill as codistill_lib, continual as continual_lib
from jaxdistill.train import metrics as metrics_lib, on_policy as on_policy_lib
from jaxdistill.train import run as run_lib, teacher as teacher_lib, workdir as workdir_lib
from jaxdistill.train.run import Run, build_run  # noqa: F401 (entry points, re-exported)


def pretrain_teacher(cfg: Any, workdir: str, devices=None) -> str | None:
  """The explicit stage before a ``teacher.source='pretrain'`` run is built: trains the
  teacher on CE into WORKDIR/teacher/ unless it is there already (and each pretrained
  teacher k of an ensemble into WORKDIR/teacher_<k>/). Returns teacher 0's final_params
  directory (None for other sources); a killed pretraining resumes like any run."""
  found = []
  for k in range(1 + len(cfg.teachers)):
    view = teacher_lib.view(cfg, k)
    if view.teacher.source != "pretrain":
      found.append(None)
      continue
    found.append(teacher_lib.params_path(view, workdir, k))
    if not paths.isdir(found[-1]):
      run_dir = str(paths.path(found[-1]).parent)
      if jax.process_index() == 0:
        print(f"Pretraining teacher {k} for {view.teacher.pretrain_steps} steps in {run_dir}")
      train(teacher_lib.pretrain_config(view, k), run_dir, devices=devices)
  return found[0]


def run_steps(
  run: Run,
  num_steps: int,
  on_metrics: Callable[[int, dict, float], None],
  save_due: Callable[[int], bool] = lambda step: False,
  save: Callable[[int], None] = lambda step: None,
  evaluate: Callable[[int], None] | None = None,
  eval_every: int = 0,
  goodput: throughput.Goodput | None = None,
  first_step: Callable[[dict], None] | None = None,
  before_step: Callable[[int], None] | None = None,
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
  A save due because of preemption ends the loop. ``goodput`` (default: a fresh one) times
  the phases: input (next batch + sharding), compile (the first dispatch), compute (dispatch
  and fetching metrics, ``on_metrics`` included), eval, checkpoint (``save``).
  ``first_step(batch)`` runs after the first dispatch, counted as compile (a time split);
  ``before_step(updates so far)`` before each dispatch (a continual run's teacher refresh).
  """
  pending, last = None, time.perf_counter()
  timer = goodput or throughput.Goodput()

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
      with timer.phase("input"):
        batch = sharding_lib.shard_batch(next(run.data_iter), run.mesh)
      with timer.phase("compile" if done == 1 else "compute"):
        if before_step is not None:
          before_step(step)
        run.state, step_metrics = run.step_fn(run.state, run.teacher_vars, batch)
        if done == 1 and first_step is not None:
          first_step(batch)
      with timer.phase("compute"):
        flush()
      step += 1
      pending = (step, step_metrics)
      eval_now = bool(evaluate and eval_every and step % eval_every == 0)
      save_now = save_due(step)  # always asked: it also notices preemption
      if eval_now or save_now:
        with timer.phase("compute"):
          flush()
        if eval_now:
          with timer.phase("eval"):
            evaluate(step)
      if save_now:
        with timer.phase("checkpoint"):
          save(step)
        if _PREEMPTED["flag"]:
          return done
    with timer.phase("compute"):
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


def _start(run: Run, manager, workdir: str, resume_from: str | None) -> str:
  """Restores or initialises ``run.state``; returns how the run started."""
  cfg = run.cfg
  source = checkpoint.resolve_resume(manager, resume_from)
  if source is not None:
    source_manager, step = source
    saved = checkpoint.read_meta(source_manager, step)
    where = paths.join(str(source_manager.directory), str(step))
    harmless = checkpoint.check_compatible(saved["config"], cfg.to_dict(), where)
    if harmless:
      warnings.warn(f"config differs from the checkpoint's in {harmless} (harmless)")
    run.state, _ = checkpoint.restore(source_manager, step, run.state, run.data_iter)
    if source_manager is manager:
      checkpoint.set_aside_newer(manager, step)
    workdir_lib.truncate_metrics(paths.join(workdir, "metrics.jsonl"), step)
    return f"resumed from step {step} ({where})"
  how = run_lib.fresh_state(run)
  if run.state.model_state and quant.COLLECTION in run.state.model_state:
    run.state = teacher_lib.calibrate_int8(run.cfg, run.student, run.state, run.mesh)
    how += f"; int8 activation scales from {cfg.student.quant_calibration_batches} batches"
  return how


class _Progress:
  """Each fetched step's metrics: progress bar, metrics.jsonl rows, the non-finite policy,
  and what the summary needs (step times, losses, the latest value of every metric)."""

  def __init__(self, run: Run, workdir: str, start: int, manager):
    cfg = run.cfg
    self.run, self.manager, self.steps, self.every = run, manager, cfg.optim.steps, cfg.log.every
    # Throughput in images for an image model, else in tokens.
    self.unit = "tokens" if cfg.student.arch == "transformer" else "images"
    self.tokens = cfg.data.batch_size * (cfg.data.seq_len if self.unit == "tokens" else 1)
    self.jsonl = paths.join(workdir, "metrics.jsonl")
    # The same rows as TensorBoard scalars; a resumed run's events from its first step on
    # replace the earlier files' (as metrics.jsonl's rows after the resumed step are dropped).
    self.tensorboard = None
    if cfg.log.tensorboard:
      logdir = paths.join(workdir, "tensorboard")
      self.tensorboard = metrics_lib.TensorBoardWriter(
        logdir, purge_step=start + 1 if start else None
      )
    self.writer = metrics_lib.MultiWriter(metrics_lib.JsonlWriter(self.jsonl), self.tensorboard)
    show = cfg.log.progress and jax.process_index() == 0
    self.bar = progress.bar(self.steps, unit="step", show=show, initial=start, every=self.every)
    self.step_times, self.losses, self.last = [], [], {}
    self.peak, self.peak_total = _peak(run)  # a CPU's probe runs here, before the clock starts
    self.goodput = throughput.Goodput()  # train() hands it to run_steps
    self.split: dict[str, float] = {}  # an on-policy run's time split (on_policy.time_split)

  def __call__(self, step: int, m: dict, seconds: float) -> None:
    self.step_times.append(seconds)
    self.losses.append(float(m["train/loss"]))
    self.last.update(m)
    perf = {
      "perf/step_s": seconds,
      f"perf/{self.unit}_per_s": self.tokens / seconds,
      "perf/tflops_per_s": self.run.flops_per_step / seconds / 1e12,
    }
    if self.peak_total:
      perf.update(throughput.mfu(self.run.flops.as_dict(), seconds, self.peak_total))
    m = dict(m, **perf, **self.split, **self.goodput.row())
    rate = {"tok_s" if self.unit == "tokens" else "img_s": f"{self.tokens / seconds:,.0f}"}
    if self.peak_total:
      rate["mfu"] = f"{perf['perf/mfu']:.1%}"
    self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}", **rate)  # before update: a log line
    self.bar.update(1)  # (off a terminal) prints at the update and must show this step
    if step % self.every == 0 or step in (1, self.steps) or m["train/nonfinite"]:
      self.writer.write({"step": step, **m})
    if m["train/nonfinite"] and self.run.cfg.optim.nan_policy == "stop":
      last = self.manager.latest_step()
      raise JaxdistillError(
        f"non-finite loss or gradient at step {step} (train/loss={m['train/loss']}); the update "
        f"was not applied and the run stopped. Last good checkpoint: "
        f"{'none' if last is None else paths.join(str(self.manager.directory), str(last))}. "
        "Lower optim.lr, check the data, or set optim.nan_policy=skip"
      )

  def write(self, step: int, m: dict) -> None:
    """An extra row (evaluation metrics), also kept as the latest values."""
    self.last.update(m)
    self.writer.write({"step": step, **m})

  def add_curve(self, step: int) -> None:
    """The loss curve of metrics.jsonl as an image in the TensorBoard events (at ``step``)."""
    if self.tensorboard is None or not self.tensorboard.enabled:
      return
    with tempfile.TemporaryDirectory() as tmp:
      png = os.path.join(tmp, "loss.png")
      if metrics_lib.plot_loss_curve(metrics_lib.read_jsonl(self.jsonl), png):
        self.tensorboard.add_image("curves/loss", png, step)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()

  def summary(self, start: int, ran: int) -> dict[str, Any]:
    steady = self.step_times[2:] or self.step_times or [float("nan")]
    run = self.run
    return {
      "steps": self.steps,
      "start_step": start,
      "preempted": start + ran < self.steps,
      "last_step": start + ran,
      "first_loss": self.losses[0] if self.losses else None,
      "final_loss": self.losses[-1] if self.losses else None,
      "median_step_s": statistics.median(steady),
      f"{self.unit}_per_s": self.tokens / statistics.median(steady),
      "student_params": count_params(run.state.params["student"]),
      "teacher_params": sum(count_params(v["params"]) for _, v in run.teachers),
      **self.throughput(statistics.median(steady)),
    }

  def throughput(self, step_s: float) -> dict[str, Any]:
    """The summary's FLOPs, peak, MFU at the median step time and the goodput shares."""
    out = {"flops_per_step": self.run.flops.as_dict(), "goodput": self.goodput.shares()}
    out["goodput_s"] = self.goodput.seconds()  # the phases' seconds and the loop's "wall"
    if self.split:
      out["on_policy_split"] = {k.removeprefix("perf/split_"): v for k, v in self.split.items()}
    if self.peak_total:
      mfu = throughput.mfu(self.run.flops.as_dict(), step_s, self.peak_total)
      out.update({k.removeprefix("perf/"): v for k, v in mfu.items()})
      out.update(peak_flops_per_s=self.peak_total, peak=self.peak.source)
    return out


def _peak(run: Run) -> tuple[throughput.Peak | None, float]:
  """The peak of one of the run's devices for the student's compute dtype, and the total the
  MFU divides by (0 for an accelerator not in the table: no MFU then)."""
  config = run.student.config
  dtype = throughput.peak_dtype(config.dtype, getattr(config, "fp8", False))
  device = run.mesh.devices.flat[0]
  cache = os.path.join(corpora.cache_dir(run.cfg.cache_dir), "peak_flops.json")
  peak = throughput.device_peak(device, dtype, cache)
  # A CPU probe measures the whole host (its matmul uses every core), whatever the number of
  # (virtual) CPU devices on it: one peak per process.
  count = jax.process_count() if device.platform == "cpu" else run.mesh.devices.size
  return peak, peak.flops_per_s * count if peak else 0.0


def _open(cfg: Any, workdir: str, devices) -> Run:
  """Everything checked before the disk is touched, then the workdir, the teacher's pretraining
  stage and the run (its state abstract: restored or initialised by ``_start``)."""
  validate.validate(cfg)
  validate.check_mesh(cfg, dict(sharding_lib.make_mesh(cfg.mesh, devices).shape))
  data_lib.check(cfg)  # data, tokenizer and vocabulary (builds into the cache, not the workdir)
  workdir_lib.prepare(cfg, workdir)
  data_lib.save_run_files(cfg, workdir)
  pretrain_teacher(cfg, workdir, devices)  # its own stage, before this run is built
  return build_run(cfg, workdir, devices, create_state=False)


def train(cfg: Any, workdir: str, devices=None, resume_from: str | None = None) -> dict[str, Any]:
  """Trains per ``cfg`` in ``workdir`` (resuming if it holds checkpoints).

  Writes ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json``
  and (``ckpt.save_final``) ``final_params/`` in ``workdir``.

  Returns:
    A summary dict; ``preempted`` is True when a signal ended the run early
    (after saving a checkpoint).
  """
  entered = time.perf_counter()
  run = _open(cfg, workdir, devices)
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
  steps, start = cfg.optim.steps, int(run.state.step)
  if jax.process_index() == 0:
    print(f"{started}; training steps {start + 1}..{steps}", flush=True)
  progress = _Progress(run, workdir, start, manager)

  def save_due(step):
    preempted = _PREEMPTED["flag"] or manager.reached_preemption(step)
    _PREEMPTED["flag"] = bool(preempted)
    every = cfg.ckpt.every
    return preempted or step == steps or (every > 0 and step % every == 0)

  def save(step):
    progress.writer.flush()  # a remote metrics.jsonl holds every row up to the checkpoint
    checkpoint.save(manager, step, run.state, run.data_iter, meta, force=True)
    if best is not None and cfg.ckpt.best_metric in progress.last:
      metric = {cfg.ckpt.best_metric: float(progress.last[cfg.ckpt.best_metric])}
      best.save(step, args=checkpoint.params_args(run.state.params["student"]), metrics=metric)

  peers = codistill_lib.peer_modules(cfg)  # codistilled peers: evaluated beside the student
  periodic = evaluate_lib.Periodic(cfg, run.student, run.mesh, peers) if cfg.eval.every else None
  periodic, before_step = continual_lib.hooks(run, workdir, periodic)  # as given unless continual

  def evaluate(step):  # validation of the student; its row precedes that step's checkpoint
    params, more = run.state.params, ((run.state.params["peers"],) if peers else ())
    progress.write(step, periodic(params["student"], run.state.model_state, *more))

  split = on_policy_lib.first_step_split(run, lambda found: setattr(progress, "split", found))
  startup_s = time.perf_counter() - entered
  goodput = progress.goodput
  try:
    with _PreemptionHandlers():
      hooks = (goodput, split, before_step)
      ran = run_steps(
        run, steps - start, progress, save_due, save, evaluate, cfg.eval.every, *hooks
      )
    if ran:
      progress.add_curve(start + ran)
  finally:
    progress.close()
    with goodput.phase("checkpoint"):  # the async saves' last writes
      manager.wait_until_finished()
    if best is not None:
      best.wait_until_finished()
  summary = dict(progress.summary(start, ran), startup_s=startup_s)
  if cfg.ckpt.save_final and not summary["preempted"] and start < steps:
    workdir_lib.save_final_params(workdir, run.state.params["student"], run.state.model_state)
    workdir_lib.save_int8(workdir, run.cfg, run.student, run.state)
  manager.close()
  if jax.process_index() == 0:
    paths.path(paths.join(workdir, "summary.json")).write_text(
      json.dumps(summary, indent=2), encoding="utf-8"
    )
  return summary
