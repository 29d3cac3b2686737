"""Self-distillation: an EMA "mean teacher" (``teacher.source='ema'``).

The teacher is the student's own module run on an exponential moving average of the
student's params. The average lives in the train state (``TrainState.ema_params``), a tree
like ``params["student"]`` with the same logical names, so the same shardings; it starts
equal to the student's initial params, is checkpointed and resumed with the state, and is
updated inside the one jitted step, after the optimizer update:

  ema <- d_t * ema + (1 - d_t) * new student params

computed in float32 and stored in the student params' dtype. The decay schedule:
``d_t = teacher.ema_decay * min(1, t / teacher.ema_warmup_steps)`` (a linear warmup from 0;
constant ``ema_decay`` with 0 warmup steps), where t is ``state.step`` before the update
(0 at the first step: with a warmup, the first update copies the student).

The step's teacher forward reads the average as it stood at the START of the step (before
this step's update): the teacher of step t averages the students of steps < t. It is an
input of the loss, never differentiated (not in ``params``, not in the optimizer state) and
its outputs are under ``stop_gradient`` like any teacher's. A step whose update is dropped
(non-finite loss or gradient, an overflowing loss scale) leaves the average as it was.
A BatchNorm student's teacher runs in inference mode on the student's running averages.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

SOURCE = "ema"


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The EMA's decay schedule: ``decay`` after ``warmup_steps`` steps of linear warmup."""

  decay: float
  warmup_steps: int = 0


def schedule_of(cfg: Any) -> Schedule | None:
  """The config's EMA schedule (``teacher.ema_decay``, ``teacher.ema_warmup_steps``), or
  None unless ``teacher.source='ema'``."""
  if cfg.teacher.source != SOURCE:
    return None
  return Schedule(float(cfg.teacher.ema_decay), int(cfg.teacher.ema_warmup_steps))


def decay_at(schedule: Schedule, step: jax.Array) -> jax.Array:
  """The decay d_t of the update at ``step`` (updates applied before it), float32."""
  decay = jnp.float32(schedule.decay)
  if schedule.warmup_steps <= 0:
    return decay
  ramp = jnp.asarray(step, jnp.float32) / jnp.float32(schedule.warmup_steps)
  return decay * jnp.minimum(jnp.float32(1.0), ramp)


def update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """``decay * ema + (1 - decay) * params`` leaf by leaf, in float32, in ``ema``'s dtypes."""

  def one(e, p):
    e32, p32 = e.astype(jnp.float32), p.astype(jnp.float32)
    return (decay * e32 + (1.0 - decay) * p32).astype(e.dtype)

  return jax.tree.map(one, ema, params)


def teacher_vars(state: Any) -> dict:
  """The EMA teacher's variables: the average as params, the student's other collections
  (a BatchNorm student's running averages) beside them."""
  return {"params": state.ema_params, **(state.model_state or {})}


def step_update(schedule: Schedule, old: Any, new: Any, metrics: dict) -> tuple[Any, dict]:
  """``new`` (the state after the optimizer update of ``old``) with its average updated
  toward the new student params; held when the update was dropped. Adds
  ``train/ema_decay``."""
  decay = decay_at(schedule, old.step)
  # 1 - finite whatever the loss scale: its overflow, else the non-finite flag.
  dropped = metrics.get("train/overflow", metrics["train/nonfinite"]) > 0
  moved = update(old.ema_params, new.params["student"], decay)
  ema = jax.tree.map(lambda m, e: jnp.where(dropped, e, m), moved, old.ema_params)
  return new.replace(ema_params=ema), dict(metrics, **{"train/ema_decay": decay})


def reset(state: Any) -> Any:
  """``state`` with its average restarted at (a fresh copy of) the student's params, in their
  shardings: after the student's params were replaced (``student.init_from``). The copy
  keeps the two trees in distinct buffers (the step donates the state)."""
  student = state.params["student"]
  copy = jax.jit(
    lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree),
    out_shardings=jax.tree.map(lambda a: a.sharding, student),
  )
  return state.replace(ema_params=copy(student))
