"""Learning without forgetting: a KL term to the student's own snapshot (continual distillation).

With ``continual.domains`` > 0 and ``continual.snapshot_weight`` > 0 the train state keeps a
snapshot of the student's params (``TrainState.snapshot_params``, a tree like
``params["student"]``: same logical names, so same shardings; checkpointed and resumed with the
state). Inside the one jitted step, at the start of every step that opens a window
(``step % continual.window_steps == 0``) the snapshot becomes the student's params as they are
then, i.e. the student at the end of the previous window. The student's loss gains

  snapshot_weight * KL(snapshot || student) * tau^2     (tau = distill.temperature)

per valid token of the batch, the snapshot's predictions on the CURRENT window's rows under
``stop_gradient`` (Li & Hoiem, 2016): the student is pulled towards what it predicted before
the data drifted, which is what it forgets. The snapshot is an input of the loss, never
differentiated (not in ``params``, not in the optimizer state). In window 0 there is no
previous window: the term's weight is 0 there (the snapshot is then the initial params).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxdistill import models
from jaxdistill.distill import losses


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """The snapshot term: its ``weight``, the window length and the KL's temperature."""

  weight: float
  window_steps: int
  temperature: float = 1.0


def schedule_of(cfg: Any) -> Snapshot | None:
  """The config's snapshot term, or None (no continual stream, or a zero weight)."""
  c = cfg.continual
  if not c.domains or not c.snapshot_weight > 0:
    return None
  return Snapshot(float(c.snapshot_weight), int(c.window_steps), float(cfg.distill.temperature))


def take(snapshot: Snapshot, state: Any) -> Any:
  """``state`` with ``snapshot_params`` replaced by the student's params when ``state.step``
  opens a window, else unchanged (a select: the step's program is the same every step)."""
  opens = (state.step % snapshot.window_steps) == 0
  taken = jax.tree.map(
    lambda p, s: jnp.where(opens, p, s), state.params["student"], state.snapshot_params
  )
  return state.replace(snapshot_params=taken)


def variables(state: Any) -> dict:
  """The snapshot's variables: its params and the student's other collections."""
  return {"params": state.snapshot_params, **(state.model_state or {})}


def weight_at(snapshot: Snapshot, step: jax.Array) -> jax.Array:
  """The term's weight at ``step``: 0 in window 0 (nothing to remember yet), else the weight."""
  later = jnp.asarray(step) >= snapshot.window_steps
  return jnp.where(later, jnp.float32(snapshot.weight), jnp.float32(0.0))


def term(
  snapshot: Snapshot,
  student: Any,
  snapshot_vars: dict,
  student_out: dict,
  batch: dict,
  step: jax.Array,
  denom: jax.Array,
) -> tuple[jax.Array, dict]:
  """The weighted snapshot term of one (micro-)batch and its metric.

  Args:
    student: the student's module (the snapshot runs the same one).
    snapshot_vars: ``variables(state)``.
    student_out: the student's output on ``batch``: its "logits" [B, T, V], or (a fused
      head's request) "final_hidden" [B, T, D] and "head" [D, V], multiplied out here.
    batch: the batch contract's [B, T] arrays.
    step: updates applied before this step (for the window-0 weight).
    denom: valid tokens of the whole global batch (terms add up over micro-batches).

  Returns:
    (weight * mean KL, {"train/snapshot_kl": the unweighted KL}): scalars, float32.
  """
  if "logits" in student_out:
    student_logits_BxTxV = student_out["logits"]
  else:  # the fused head never forms the logits; this term needs them (a [B, T, V] array)
    hidden_BxTxD, head_DxV = student_out["final_hidden"], student_out["head"]
    student_logits_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, head_DxV)
  out = models.apply(student, snapshot_vars, batch, return_logits=True)
  snapshot_logits_BxTxV = jax.lax.stop_gradient(out["logits"])
  kl_BxT = losses.forward_kl_per_token(
    student_logits_BxTxV, snapshot_logits_BxTxV, snapshot.temperature
  )
  kl = (kl_BxT * batch["weights"]).sum() / denom
  return weight_at(snapshot, step) * kl, {"train/snapshot_kl": kl}
