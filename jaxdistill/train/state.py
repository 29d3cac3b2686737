"""The train state: ``TrainState`` (everything that changes during training and is
checkpointed) and ``init_state``, which initialises it directly into its shardings.
``train.step`` re-exports both (``train.step.TrainState``, ``train.step.init_state``).
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdistill import models
from jaxdistill.distill import objective as objective_lib
from jaxdistill.errors import JaxdistillError
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import codistill as codistill_lib

__all__ = ["TrainState", "init_state"]


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: int32 scalar, number of updates applied.
    params: {"student": flax params, "proj": {"layer_i": [Ds, Dt]}}.
    opt_state: optax state of ``params``.
    rng: PRNG key for stochastic losses, advanced every step.
    loss_scale: ``precision.LossScale`` for float16 students, else None (no
      leaves: f32 / bf16 states and checkpoints are unchanged).
    model_state: the student's non-param variables, e.g. FP8 scales and amax
      histories ``{"_overwrite_with_gradient": ...}`` (c=fp8; their "gradients" are their
      new values) or BatchNorm's running averages ``{"batch_stats": ...}`` (returned by
      the student's training forward), or a c=int8 student's static activation statistics
      ``{"quant_stats": ...}`` (``models.quant.calibrate``, before step 1; constant after),
      else None: replaced each step, never optimised.
    ema_params: an EMA teacher's params (``teacher.source='ema'``, ``train/ema.py``), a tree
      like ``params["student"]`` in its shardings, else None (no leaves).
    snapshot_params: the student's snapshot of continual distillation's snapshot term
      (``train/lwf.py``), a tree like ``params["student"]``, else None (no leaves).
    peer_copies: codistillation's copies of every model's params (the student's first) as
      the others see them, refreshed every ``codistill.exchange_every`` steps
      (``train/codistill.py``), else None. The peers themselves are ``params["peers"]``.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  loss_scale: Any = None
  model_state: Any = None
  ema_params: Any = None
  snapshot_params: Any = None
  peer_copies: Any = None


def init_state(
  obj: objective_lib.Objective,
  student: nn.Module,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
  seq_len: int,
  create: bool = True,
  loss_scale: precision.LossScale | None = None,
  student_variables: Any = None,
  ema: bool = False,
  snapshot: bool = False,
  codistill: codistill_lib.Codistill | None = None,
) -> tuple[TrainState, Any]:
  """Initialises the TrainState directly into its shardings.

  Args:
    create: False returns the abstract state (``jax.ShapeDtypeStruct`` leaves
      with their shardings) without allocating anything: the restore target.
    loss_scale: the initial dynamic loss scale (``precision.init_loss_scale``)
      or None; replicated, like ``step``.
    student_variables: the student's Flax variables (``{"params": ...}`` plus any other
      collections) to start from instead of a random init; the student's init then only
      runs abstractly (for shapes and shardings), never as a computation. The projection
      heads and the optimizer state are initialised as usual.
    ema: keep an EMA of the student's params (``ema_params``), starting equal to them.
    snapshot: keep a snapshot of them (``snapshot_params``, continual distillation).
    codistill: models trained beside the student: their params in ``params["peers"]`` (and,
      with copies, ``peer_copies`` starting equal to every model's params).

  Returns:
    (state, state_shardings): the shardings come from the models' logical
    axis names through the rules table; the optimizer state mirrors params.
  """

  def init_fn(rng, given=None):
    model_rng, proj_rng, state_rng = jax.random.split(rng, 3)
    variables = models.init_variables(student, model_rng, seq_len) if given is None else given
    params = {
      "student": variables["params"],
      "proj": objective_lib.init_projections(obj, proj_rng),
    }
    if codistill is not None:  # keys folded from model_rng: other runs' params unchanged
      params["peers"] = codistill_lib.init_peers(codistill, model_rng, seq_len)
    use_copies = codistill is not None and codistill.use_copies
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      rng=state_rng,
      loss_scale=loss_scale,
      model_state={k: v for k, v in variables.items() if k != "params"} or None,
      ema_params=params["student"] if ema else None,
      snapshot_params=params["student"] if snapshot else None,
      peer_copies=codistill_lib.live_params(codistill, params) if use_copies else None,
    )

  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding_lib.shardings_of(abstract, mesh)
  if not create:
    shapes = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
    )
    return shapes, shardings
  if student_variables is not None:
    # The abstract state already traced the student's init: its shapes, no second trace.
    # (Unboxed here, outside the rules context, where unboxing adds no sharding constraint.)
    model_state = nn.unbox(abstract.model_state) or {}
    _check_given({"params": nn.unbox(abstract.params["student"]), **model_state}, student_variables)
  with sharding_lib.rules_context(mesh):
    if student_variables is None:
      state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    else:
      state = jax.jit(lambda r, g: nn.unbox(init_fn(r, g)), out_shardings=shardings)(
        rng, student_variables
      )
  return state, shardings


def _check_given(abstract: Any, given: Any) -> None:
  """Given variables must have the model's tree, shapes and dtypes (a clear error, not XLA's)."""
  want = jax.tree_util.tree_flatten_with_path(abstract)[0]
  got = dict(jax.tree_util.tree_flatten_with_path(given)[0])
  paths = {p for p, _ in want}
  if set(got) != paths:
    missing = sorted(jax.tree_util.keystr(p) for p in paths - set(got))[:3]
    extra = sorted(jax.tree_util.keystr(p) for p in set(got) - paths)[:3]
    raise JaxdistillError(
      f"given student variables do not match the model: missing {missing}, unknown {extra}"
    )
  for path, a in want:
    g = got[path]
    if tuple(g.shape) != tuple(a.shape) or g.dtype != a.dtype:
      raise JaxdistillError(
        f"given student variable {jax.tree_util.keystr(path)} is {g.dtype}{list(g.shape)}, "
        f"the model's is {a.dtype}{list(a.shape)}"
      )
