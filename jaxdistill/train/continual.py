"""Continual distillation's host side: the teacher's refreshes and the evaluation of every window.

The stream (``data/continual.py``) feeds the student step by step; the snapshot term runs inside
the jitted step (``train/lwf.py``). What runs between steps is here, hooked into the loop
(``hooks``):

  refresh   every ``continual.refresh_every`` = N steps (at steps 0, N, 2N, ... updates
            applied) the teacher becomes the LOADED teacher fine-tuned for
            ``continual.teacher_steps`` CE steps (``continual.teacher_lr``, constant, fresh
            AdamW state) on batches drawn from the sliding window: the W * B training rows
            streamed just before (``continual.recent_batches``). Each refresh starts from the
            loaded teacher, not from the previous refresh: the teacher of step s is a function
            of the loaded teacher and the stream before the last refresh step <= s, so a resumed
            run recomputes it (one refresh) and nothing of the teacher is checkpointed; and the
            teacher cannot itself drift away from what it knew. It is its own jitted CE step
            (the teacher's model trained as a student, ``teacher.pretrain_config``): the
            student's step only ever reads the teacher's variables.
            With ``continual.teacher_dir`` a refresh instead picks up the teacher checkpoint
            of that directory that applies at the step (``pick``: DIR/<step>/ of the largest
            step <= the current one, a run's workdir or its final_params), listed afresh at
            each refresh so checkpoints written during the run are found; none yet: the loaded
            teacher. A resumed run picks the same one, unless the directory changed since.
  evaluate  at each ``eval.every`` (set it to ``continual.window_steps``: each window's end)
            the student's CE on the held-out rows of every window seen so far is logged as
            ``eval/window_<k>/loss``, with ``eval/loss`` their mean; the matrix so far (one row
            per evaluation) is written to WORKDIR/forgetting.json and, as a table with each
            window's forgetting (its last loss minus its loss at its own window's end), to
            WORKDIR/forgetting.md.
"""

import copy
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdistill import paths
from jaxdistill.data import continual as stream_lib
from jaxdistill.evaluation import evaluate as evaluate_lib
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import run as run_lib
from jaxdistill.train import teacher as teacher_lib


def hooks(run: run_lib.Run, workdir: str, periodic: Callable | None) -> tuple:
  """(evaluation, before_step) for the loop: ``periodic`` and None unless
  ``continual.domains`` > 0; then the per-window evaluation (if ``periodic`` was due at all)
  and the teacher's refresh (``Continual``)."""
  if not run.cfg.continual.domains:
    return periodic, None
  state = Continual(run, workdir)
  return (state.evaluate if periodic is not None else None), state.before_step


def tuning_config(cfg: Any) -> Any:
  """The config of a refresh: the teacher's model trained on CE (``pretrain_config``) for
  ``continual.teacher_steps`` steps at the constant ``continual.teacher_lr``; no stream, no
  evaluation, no checkpoints of its own."""
  t = teacher_lib.pretrain_config(cfg)
  c = cfg.continual
  t.optim.update(steps=c.teacher_steps, lr=c.teacher_lr, lr_schedule="constant", warmup_steps=0)
  t.eval.every = 0
  return t


class Continual:
  """A run's continual state on the host: the loaded teacher, its tuner, the eval matrix."""

  def __init__(self, run: run_lib.Run, workdir: str):
    self.run, self.cfg, self.workdir = run, run.cfg, workdir
    self.layout = stream_lib.check(run.cfg)
    self.process = (jax.process_index(), jax.process_count())
    self.loaded = run.teacher_vars  # every refresh starts from it (never donated)
    self.tuner: run_lib.Run | None = None  # built at the first refresh that trains
    self.refreshed: int | None = None  # the refresh step the teacher is from
    self.picked: str | None = None  # continual.teacher_dir: the checkpoint now the teacher
    self.rows: list[dict] = []

  def before_step(self, step: int) -> None:
    """Before the step after ``step`` updates: the teacher of the last refresh step <= step."""
    every = self.cfg.continual.refresh_every
    if not every or self.run.teacher is None:
      return
    due = step - step % every
    if due != self.refreshed:
      self.run.teacher_vars = self.refresh(due)
      self.refreshed = due

  def refresh(self, step: int) -> Any:
    """The loaded teacher fine-tuned on the sliding window before ``step`` (the loaded
    teacher itself at step 0): its variables, in the loaded teacher's shardings."""
    c = self.cfg.continual
    if c.teacher_dir:
      return self.pick_up(step)
    batches = stream_lib.recent_batches(self.cfg, step, c.teacher_steps, self.process)
    if not batches:
      return self.loaded
    if self.tuner is None:
      self.tuner = run_lib.build_run(tuning_config(self.cfg), self.workdir, data=False)
    tuner = self.tuner
    tuner.state = tuner.make_state()  # fresh optimizer state, then the loaded teacher's params
    student = tuner.state.params["student"]
    copy = jax.jit(
      lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree),
      out_shardings=jax.tree.map(lambda a: a.sharding, student),
    )
    # A copy: the tuner's step donates its state, and the loaded teacher must outlive it.
    tuner.state = tuner.state.replace(
      params=dict(tuner.state.params, student=copy(self.loaded["params"]))
    )
    for batch in batches:
      tuner.step(sharding_lib.shard_batch(batch, tuner.mesh))
    shardings = jax.tree.map(lambda a: a.sharding, self.loaded["params"])
    tuned = jax.device_put(tuner.state.params["student"], shardings)
    return {**self.loaded, "params": tuned}

  def pick_up(self, step: int) -> Any:
    """The teacher checkpoint of ``continual.teacher_dir`` that applies at ``step`` (loaded
    into the loaded teacher's shardings; read again only when another one applies)."""
    path = pick(self.cfg.continual.teacher_dir, step)
    if path is None:
      self.picked = None
      return self.loaded
    if path != self.picked:
      view = copy.deepcopy(self.cfg)
      view.teacher.update(source="workdir", path=path)
      variables, _, _ = teacher_lib.load(view, self.run.teacher, self.run.mesh, None)
      self.picked, self.current = path, {**self.loaded, **variables}
    return self.current

  def evaluate(self, params: Any, model_state: Any = None) -> dict[str, float]:
    """The student's CE on every window seen so far (the loop's periodic evaluation)."""
    step = int(self.run.state.step)
    seen = min(self.layout.num_windows, -(-step // self.layout.window_steps))
    out = {}
    for k in range(seen):
      batches = stream_lib.window_batches(self.cfg, k, self.process)
      models = {"student": (self.run.student, params, model_state)}
      m = evaluate_lib.evaluate(models, batches, self.run.mesh)["student"]
      out[f"eval/window_{k}/loss"] = float(m["val_loss"])
    if out:
      out["eval/loss"] = sum(out.values()) / len(out)
    self.rows = [r for r in self.rows if r["step"] < step] + [{"step": step, **out}]
    if jax.process_index() == 0:
      self.write()
    return out

  def write(self) -> None:
    """WORKDIR/forgetting.json (the rows) and forgetting.md (the table)."""
    stream = stream_lib.stream_of(self.cfg)
    doc = {
      "window_steps": self.layout.window_steps,
      "domains": list(stream.names),
      "snapshot_weight": self.cfg.continual.snapshot_weight,
      "rows": self.rows,
    }
    paths.path(paths.join(self.workdir, "forgetting.json")).write_text(json.dumps(doc, indent=2))
    table = forgetting_table(self.rows, self.layout.window_steps)
    paths.path(paths.join(self.workdir, "forgetting.md")).write_text(table + "\n")


def pick(directory: str, step: int) -> str | None:
  """DIR/<n> for the largest integer n <= ``step`` among ``directory``'s subdirectories named
  by an integer, or None (other names are ignored)."""
  steps = [int(n) for n in paths.listdir(directory) if n.isdigit() and int(n) <= step]
  return paths.join(directory, str(max(steps))) if steps else None


def forgetting_table(rows: list[dict], window_steps: int) -> str:
  """Markdown: one line per evaluation (its step and window), the loss on each window seen,
  then each window's forgetting: its loss at the last evaluation minus its loss at the
  evaluation closing its own window (> 0: forgotten). ``rows``: ``{"step", "eval/window_<k>
  /loss"...}`` dicts, as the evaluations logged them."""
  windows = sorted(
    {int(k.split("/")[1].removeprefix("window_")) for r in rows for k in r if "window_" in k}
  )
  head = "| step | window | " + " | ".join(f"w{k}" for k in windows) + " |"
  lines = [head, "|" + "---|" * (len(windows) + 2)]
  for r in rows:
    cells = [
      f"{r[f'eval/window_{k}/loss']:.3f}" if f"eval/window_{k}/loss" in r else "" for k in windows
    ]
    lines.append(f"| {r['step']} | {(r['step'] - 1) // window_steps} | " + " | ".join(cells) + " |")
  forgot = []
  for k in windows:
    own = [r for r in rows if (r["step"] - 1) // window_steps == k and f"eval/window_{k}/loss" in r]
    if own and rows:
      key = f"eval/window_{k}/loss"
      forgot.append(f"{rows[-1][key] - own[-1][key]:+.3f}")
    else:
      forgot.append("")
  lines.append("| forgetting | | " + " | ".join(forgot) + " |")
  return "\n".join(lines)
