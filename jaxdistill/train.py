"""TrainState, the optimizer, and THE step: ``distill_step(state, teacher_params, batch)``.

The step is a pure function built once per run by ``make_distill_step`` and
jitted exactly once by ``jit_distill_step`` with in/out shardings and donation
of the old state. Inside it the teacher runs forward under ``stop_gradient``
(its params are an input, never differentiated, never in the state); the
student runs forward and backward; the objective combines the losses; optax
updates the student and its projection heads.

With no teacher (``Objective.uses_teacher`` False) the same step trains the
student from scratch on CE: that is how teachers are made here.

Batch: dict of [B, T] arrays ``inputs``, ``targets``, ``weights``,
``segment_ids``, ``positions`` (see data/synthetic.py), sharded over data x fsdp.
"""

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdistill import objective as objective_lib
from jaxdistill import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: int32 scalar, number of updates applied.
    params: {"student": flax params, "proj": {"layer_i": [Ds, Dt]}}.
    opt_state: optax state of ``params``.
    rng: PRNG key for stochastic losses, advanced every step.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def lr_schedule(optim: Any) -> optax.Schedule:
  """Linear warmup to ``optim.lr``, then cosine (or constant) to lr * min_lr_ratio."""
  if optim.lr_schedule == "constant":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1)),
        optax.constant_schedule(optim.lr),
      ],
      [max(optim.warmup_steps, 1)],
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.lr,
    warmup_steps=optim.warmup_steps,
    decay_steps=max(optim.steps, optim.warmup_steps + 1),
    end_value=optim.lr * optim.min_lr_ratio,
  )


def make_optimizer(optim: Any) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on vectors (norms)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
    optax.adamw(
      lr_schedule(optim), b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=decay_mask
    ),
  )


def _apply(model: nn.Module, params: Any, batch: dict, request: dict) -> dict:
  return model.apply(
    {"params": params},
    batch["inputs"],
    segment_ids_BxT=batch.get("segment_ids"),
    positions_BxT=batch.get("positions"),
    **request,
  )


def _micro_batches(batch: dict, num: int) -> dict:
  """[B, ...] -> [num, B/num, ...] so every device keeps its own rows.

  Micro-batch a takes rows a, a+num, a+2*num...: each device's contiguous
  block of rows splits evenly, so no data moves between devices.
  """

  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))

  return jax.tree.map(split, batch)


def make_distill_step(
  obj: objective_lib.Objective,
  student: nn.Module,
  teacher: nn.Module | None,
  tx: optax.GradientTransformation,
  grad_accum: int = 1,
  lr: optax.Schedule | None = None,
) -> Callable:
  """Builds the pure step function (not jitted: see ``jit_distill_step``).

  Args:
    obj: the objective (which losses, layers, weights).
    student, teacher: Flax modules (teacher None when obj.uses_teacher is False).
    tx: the optimizer.
    grad_accum: micro-batches per step; the batch size must divide by it.
    lr: the learning-rate schedule, only to report it as ``train/lr``.

  Returns:
    ``distill_step(state, teacher_params, batch) -> (state, metrics)``.
  """

  def loss_fn(params, teacher_params, batch, step, denom):
    student_out = _apply(student, params["student"], batch, obj.student_request())
    teacher_out = None
    if obj.uses_teacher:
      # The teacher is an input, not a parameter: no gradient is ever formed
      # for it, and stop_gradient keeps its outputs constant for the losses.
      teacher_out = jax.lax.stop_gradient(
        _apply(teacher, teacher_params, batch, obj.teacher_request())
      )
    return objective_lib.compute_loss(
      obj, step, params["proj"], student_out, teacher_out, batch, denom
    )

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def distill_step(state: TrainState, teacher_params: Any, batch: dict):
    # Normalise every term by the valid tokens of the WHOLE global batch, so
    # micro-batch gradients simply add up to the full-batch gradient.
    denom = jnp.maximum(batch["weights"].sum(), 1.0)
    if grad_accum == 1:
      (_, metrics), grads = grad_fn(state.params, teacher_params, batch, state.step, denom)
    else:

      def body(carry, micro):
        (_, m), g = grad_fn(state.params, teacher_params, micro, state.step, denom)
        return jax.tree.map(jnp.add, carry, (g, m)), None

      micro = _micro_batches(batch, grad_accum)
      first = jax.tree.map(lambda x: x[0], micro)
      (_, metrics_shape), grads_shape = jax.eval_shape(
        grad_fn, state.params, teacher_params, first, state.step, denom
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, metrics_shape))
      (grads, metrics), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, **objective_lib.schedule_metrics(obj, state.step))
    metrics["train/grad_norm"] = optax.tree.norm(grads)
    metrics["perf/valid_tokens"] = denom
    if lr is not None:
      metrics["train/lr"] = lr(state.step)
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      rng=jax.random.fold_in(state.rng, state.step),
    )
    return new_state, metrics

  return distill_step


def init_state(
  obj: objective_lib.Objective,
  student: nn.Module,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
  seq_len: int,
  d_student: int,
  d_teacher: int,
) -> tuple[TrainState, Any]:
  """Initialises the TrainState directly into its shardings.

  Returns:
    (state, state_shardings): the shardings come from the models' logical
    axis names through the rules table; the optimizer state mirrors params.
  """

  def init_fn(rng):
    model_rng, proj_rng, state_rng = jax.random.split(rng, 3)
    tokens_1xT = jnp.zeros((1, seq_len), jnp.int32)
    variables = student.init(model_rng, tokens_1xT)
    params = {
      "student": variables["params"],
      "proj": objective_lib.init_projections(obj, proj_rng, d_student, d_teacher),
    }
    return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )

  shardings = sharding_lib.shardings_of(jax.eval_shape(init_fn, rng), mesh)
  with sharding_lib.rules_context(mesh):
    state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return state, shardings


def init_params(
  model: nn.Module, rng: jax.Array, mesh: jax.sharding.Mesh, seq_len: int
) -> tuple[Any, Any]:
  """Random params of ``model`` created in their shardings: (params, shardings)."""
  init_fn = lambda r: model.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"]
  shardings = sharding_lib.shardings_of(jax.eval_shape(init_fn, rng), mesh)
  with sharding_lib.rules_context(mesh):
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return params, shardings


def param_shardings(model: nn.Module, mesh: jax.sharding.Mesh, seq_len: int) -> Any:
  """Shardings of ``model``'s params without creating them."""
  init_fn = lambda r: model.init(r, jnp.zeros((1, seq_len), jnp.int32))["params"]
  return sharding_lib.shardings_of(jax.eval_shape(init_fn, jax.random.key(0)), mesh)


def jit_distill_step(
  step_fn: Callable, state_shardings: Any, teacher_shardings: Any, mesh: jax.sharding.Mesh
) -> Callable:
  """The ONE jit of the step: explicit shardings, old state donated."""
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, teacher_shardings, sharding_lib.batch_sharding(mesh)),
    out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
    donate_argnums=(0,),
  )
