"""THE step, ``distill_step(state, teacher_vars, batch)``, with the optimizer and the state
(``TrainState`` and ``init_state`` live in ``train/state.py``; re-exported here).

The step is a pure function built once per run by ``make_distill_step`` and
jitted exactly once by ``jit_distill_step`` with in/out shardings and donation
of the old state. Inside it the teacher runs forward under ``stop_gradient``
(its params are an input, never differentiated, never in the state); the
student runs forward and backward; the objective combines the losses; optax
updates the student and its projection heads. ``teacher_vars`` is ONE pytree, the
teacher's Flax variables: ``{"params": ...}`` plus any frozen state (a c=fp8 teacher's
calibrated scales), read and never updated. With several teachers (an ensemble: the config's
``teachers``) it is a tuple of such pytrees, one per teacher, and ``teacher`` a tuple of
modules; each runs forward once, for what the terms read from it.

With no teacher (``Objective.uses_teacher`` False) the same step trains the
student from scratch on CE: that is how teachers are made here.

Batch: dict of [B, T] arrays ``inputs``, ``targets``, ``weights``,
``segment_ids``, ``positions`` (see data/synthetic.py), sharded over data x fsdp; for an
image classifier ``inputs`` [B, H, W, C], ``targets`` / ``weights`` [B] (data/images.py).

A BatchNorm student's running averages are ``state.model_state["batch_stats"]``: the
student's training forward normalises by the batch's own statistics (the global batch's, as
one jitted program over the mesh) and returns new averages, which replace the old ones like
FP8 state (never through optax; kept when a non-finite update is dropped). With gradient
accumulation each micro-batch is normalised by its own statistics and updates the averages in
turn. The teacher runs in inference mode on its stored statistics (in ``teacher_vars``).
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdistill import models
from jaxdistill.distill import objective as objective_lib
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import codistill as codistill_lib
from jaxdistill.train import ema as ema_lib
from jaxdistill.train import lwf as lwf_lib
from jaxdistill.train.optim import lr_schedule, make_optimizer
from jaxdistill.train.state import TrainState, init_state

__all__ = ["TrainState", "init_state", "jit_distill_step", "lr_schedule", "make_distill_step"]
__all__ += ["make_optimizer"]


def _micro_batches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B/num, ...] so every device keeps its own rows.

  Micro-batch a takes rows a, a+num, a+2*num...: each device's contiguous
  block of rows splits evenly, so no data moves between devices.
  """

  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


def _make_loss_fn(obj: objective_lib.Objective, student: nn.Module, teacher: Any, lwf: Any = None):
  """``loss_fn(params, model_state, teacher_vars, batch, step, denom, scale) -> (loss, (metrics,
  new batch_stats or None))`` of one (micro-)batch: both forwards, the objective, the loss
  scale. With ``lwf`` (a ``lwf.Snapshot``) ``teacher_vars`` is (teacher's, snapshot's)."""

  def loss_fn(params, model_state, teacher_vars, batch, step, denom, scale):
    student_vars = {"params": params["student"], **(model_state or {})}
    if lwf is not None:  # the snapshot's variables come beside the teacher's
      teacher_vars, snapshot_vars = teacher_vars
    # train=True: a BatchNorm student normalises by this batch's statistics and returns its
    # updated running averages ("batch_stats"); the teacher below runs in inference mode.
    student_out = models.apply(student, student_vars, batch, train=True, **obj.student_request())
    new_stats = student_out.pop("batch_stats", None)
    teacher_out = None
    if obj.uses_teacher:
      # The teacher is an input, not a parameter: no gradient is ever formed
      # for it (nor for its FP8 state: static scales), and stop_gradient keeps
      # its outputs constant for the losses.
      if isinstance(teacher, tuple):  # several teachers: one output dict each
        teacher_out = tuple(
          models.apply(m, v, batch, **obj.teacher_request(k))
          for k, (m, v) in enumerate(zip(teacher, teacher_vars))
        )
      else:
        teacher_out = models.apply(teacher, teacher_vars, batch, **obj.teacher_request())
      teacher_out = jax.lax.stop_gradient(teacher_out)
    loss, metrics = objective_lib.compute_loss(
      obj, step, params["proj"], student_out, teacher_out, batch, denom
    )
    if lwf is not None:
      args = (student, snapshot_vars, student_out, batch, step, denom)
      extra, extra_metrics = lwf_lib.term(lwf, *args)
      loss = loss + extra
      metrics = {**metrics, **extra_metrics, "train/loss": metrics["train/loss"] + extra}
    # The loss is float32; multiplying it by the loss scale scales every
    # backward activation, so small float16 gradients stay above underflow.
    return (loss if scale is None else loss * scale), (metrics, new_stats)

  return loss_fn


def _make_gradients(loss_fn: Callable, grad_accum: int) -> Callable:
  """``gradients(state, teacher_vars, batch, denom) -> (metrics, param grads, new model
  state)`` of the whole batch, summed over ``grad_accum`` micro-batches."""
  grad_params = jax.value_and_grad(loss_fn, has_aux=True)
  # With FP8 the model state's "gradients" are its new values (Flax fp8_ops).
  grad_both = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  def gradients(state, teacher_vars, batch, denom):
    scale = None if state.loss_scale is None else state.loss_scale.scale

    def grads_of(model_state, b):
      args = (teacher_vars, b, state.step, denom, scale)
      if state.model_state is None:  # exactly the plain step's program
        (_, (m, _)), g = grad_params(state.params, None, *args)
        return m, g, None
      if "_overwrite_with_gradient" not in model_state:  # BatchNorm / int8 statistics
        (_, (m, stats)), g = grad_params(state.params, model_state, *args)
        # An int8 student's static "quant_stats" pass through unchanged (read, not mutable).
        return m, g, model_state if stats is None else {**model_state, "batch_stats": stats}
      (_, (m, stats)), (g, model_state) = grad_both(state.params, model_state, *args)
      if stats is not None:
        model_state = {**model_state, "batch_stats": stats}
      return m, g, model_state

    if grad_accum == 1:
      return grads_of(state.model_state, batch)

    def body(carry, micro):
      acc, model_state = carry
      m, g, model_state = grads_of(model_state, micro)
      # Param gradients add up; the FP8 state passes on from micro-batch to
      # micro-batch, so its amax histories see every one; so do BatchNorm's running
      # averages (each micro-batch is normalised by its own statistics).
      return (jax.tree.map(jnp.add, acc, (g, m)), model_state), None

    micro = _micro_batches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    metrics_shape, grads_shape, _ = jax.eval_shape(grads_of, state.model_state, first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
    ((grads, metrics), model_state), _ = jax.lax.scan(body, (zeros, state.model_state), micro)
    return metrics, grads, model_state

  return gradients


def _update(state: TrainState, grads, model_state, metrics: dict, tx, loss_scale_period: int):
  """The optimizer update of the gradients (unscaled first), dropped when the loss or the
  gradient is not finite: (new state, metrics + grad norm, non-finite and loss-scale ones)."""
  ls = state.loss_scale
  if ls is not None:
    # Unscale before anything reads the gradients (norm, clipping, Adam).
    grads = jax.tree.map(lambda g: (g.astype(jnp.float32) / ls.scale).astype(g.dtype), grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite loss or gradient never reaches the state: the update is
  # dropped here and the host decides (optim.nan_policy) to stop or go on.
  finite = jnp.isfinite(metrics["train/loss"]) & jnp.isfinite(grad_norm)
  params, opt_state, model_state = jax.tree.map(
    lambda new, old: jnp.where(finite, new, old),
    (params, opt_state, model_state),
    (state.params, state.opt_state, state.model_state),
  )
  metrics = dict(metrics)
  metrics["train/grad_norm"] = grad_norm
  metrics["train/nonfinite"] = 1.0 - finite.astype(jnp.float32)
  if ls is not None:
    # An overflowing gradient is the loss scale's normal business, not an
    # error: only a non-finite loss counts as non-finite for optim.nan_policy.
    metrics["train/nonfinite"] = 1.0 - jnp.isfinite(metrics["train/loss"]).astype(jnp.float32)
    metrics["train/overflow"] = 1.0 - finite.astype(jnp.float32)
    metrics["train/loss_scale"] = ls.scale
    ls = precision.update_loss_scale(ls, finite, loss_scale_period)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    rng=jax.random.fold_in(state.rng, state.step),
    loss_scale=ls,
    model_state=model_state,
  )
  return new_state, metrics


def make_distill_step(
  obj: objective_lib.Objective,
  student: nn.Module,
  teacher: Any,
  tx: optax.GradientTransformation,
  grad_accum: int = 1,
  lr: optax.Schedule | None = None,
  loss_scale_period: int = 2000,
  on_policy: Callable | None = None,
  ema: ema_lib.Schedule | None = None,
  lwf: lwf_lib.Snapshot | None = None,
  codistill: codistill_lib.Codistill | None = None,
) -> Callable:
  """Builds the pure step function (not jitted: see ``jit_distill_step``).

  Args:
    obj: the objective (which losses, layers, weights).
    student, teacher: Flax modules (teacher None when obj.uses_teacher is False, a tuple of
      modules with several teachers).
    tx: the optimizer.
    grad_accum: micro-batches per step; the batch size must divide by it.
    lr: the learning-rate schedule, only to report it as ``train/lr``.
    loss_scale_period: finite steps before a dynamic loss scale doubles; only
      used when ``state.loss_scale`` is not None.
    on_policy: ``train.on_policy.make``'s batch rewrite (the student samples the batch's
      continuations first, with probability lmbda), or None: the batch as given.
    ema: an EMA teacher's schedule (``ema.schedule_of``): the teacher runs on
      ``state.ema_params`` (``teacher_vars`` is not read), updated after the optimizer's.
    lwf: continual distillation's snapshot term (``lwf.schedule_of``): ``state.snapshot_params``
      is taken at each window's first step, and the student also learns from it.
    codistill: models trained together (``codistill.of``): the loss is theirs, ``obj`` and
      ``teacher`` are not read, nor is ``teacher_vars``.

  Returns:
    ``distill_step(state, teacher_vars, batch) -> (state, metrics)``; ``teacher_vars``: the
    teacher's variables ``{"params": ..., **frozen collections}`` (None without a teacher; a
    tuple of them, in the order of ``teacher``, with several).
  """
  if codistill is None:
    loss_fn = _make_loss_fn(obj, student, teacher, lwf)
  else:
    loss_fn = codistill_lib.make_loss_fn(codistill, student)
  gradients = _make_gradients(loss_fn, grad_accum)

  def distill_step(state: TrainState, teacher_vars: Any, batch: dict):
    policy_metrics = {}
    if ema is not None:  # the average as it stands before this step's update
      teacher_vars = ema_lib.teacher_vars(state)
    if lwf is not None:  # the snapshot as it stands at this step, beside the teacher(s)
      state = lwf_lib.take(lwf, state)
      teacher_vars = (teacher_vars, lwf_lib.variables(state))
    if codistill is not None:  # the copies the others are seen through (None: live)
      teacher_vars, exchanged = codistill_lib.exchange(codistill, state)
      policy_metrics["codistill/exchanged"] = exchanged
    if on_policy is not None:
      student_vars = {"params": state.params["student"], **(state.model_state or {})}
      batch, policy_metrics = on_policy(student_vars, batch, state.step)
    # Normalise every term by the valid tokens of the WHOLE global batch, so
    # micro-batch gradients simply add up to the full-batch gradient.
    denom = jnp.maximum(batch["weights"].sum(), 1.0)
    if codistill is not None:  # one per model, over its rows of the whole batch
      denom = codistill_lib.denominators(codistill, batch)
    metrics, grads, model_state = gradients(state, teacher_vars, batch, denom)
    metrics = dict(metrics, **objective_lib.schedule_metrics(obj, state.step), **policy_metrics)
    new_state, metrics = _update(state, grads, model_state, metrics, tx, loss_scale_period)
    if ema is not None:
      new_state, metrics = ema_lib.step_update(ema, state, new_state, metrics)
    if codistill is not None and codistill.use_copies:
      new_state = new_state.replace(peer_copies=teacher_vars)
    metrics["perf/valid_tokens"] = jnp.maximum(batch["weights"].sum(), 1.0)
    if lwf is not None:
      metrics["train/snapshot_weight"] = lwf_lib.weight_at(lwf, state.step)
    if lr is not None:
      metrics["train/lr"] = lr(state.step)
    return new_state, metrics

  return distill_step


def jit_distill_step(
  step_fn: Callable, state_shardings: Any, teacher_shardings: Any, mesh: jax.sharding.Mesh
) -> Callable:
  """The ONE jit of the step: explicit shardings, old state donated.

  ``teacher_shardings`` mirror ``teacher_vars`` (None without a teacher); the teacher's
  variables are an input that is never donated nor returned.
  """
  in_shardings = (state_shardings, teacher_shardings, sharding_lib.batch_sharding(mesh))
  return jax.jit(
    step_fn,
    in_shardings=in_shardings,
    out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
