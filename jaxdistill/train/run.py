"""A run built from a config: mesh, models, objective, optimizer, state, teacher, jitted step.

``build_run`` turns a config (validated here: a library user cannot skip it) into a ``Run``.
Student or teacher variables may be given instead of initialised or loaded, which is how a
library user pairs the step with params of their own (``examples/pair_step.py``); the data
iterator is optional. ``loop.py`` drives a run (``run_steps``, ``train``).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax

from jaxdistill import data as data_lib
from jaxdistill import models
from jaxdistill.config import validate
from jaxdistill.data import sources
from jaxdistill.data import text as text_data
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.distill import objective as objective_lib
from jaxdistill.errors import JaxdistillError
from jaxdistill.evaluation import evaluate as evaluate_lib
from jaxdistill.models import flops as flops_lib
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import codistill as codistill_lib
from jaxdistill.train import ema as ema_lib
from jaxdistill.train import lwf as lwf_lib
from jaxdistill.train import on_policy as on_policy_lib
from jaxdistill.train import step as train_lib
from jaxdistill.train import teacher as teacher_lib


@dataclasses.dataclass
class Run:
  """Everything a training run needs, built once from the config.

  ``step_fn(state, teacher_vars, batch) -> (state, metrics)`` is the jitted
  ``train.distill_step``; ``teacher_vars`` is ``{"params": ...}`` plus a c=fp8 teacher's
  frozen FP8 scales (None without a teacher model). With several teachers (``teachers``)
  ``teacher`` and ``teacher_vars`` are tuples, teacher 0 (``teacher``) first.
  """

  cfg: Any
  mesh: jax.sharding.Mesh
  objective: objective_lib.Objective
  student: nn.Module  # models.build's: a decoder or an encoder
  teacher: nn.Module | tuple[nn.Module, ...] | None
  state: train_lib.TrainState
  teacher_vars: Any
  step_fn: Callable  # jitted distill_step
  data_iter: Any  # see jaxdistill.data: next() -> local batch; get_state/set_state; or None
  flops: models.StepFlops  # model FLOPs of one optimizer step: student / teacher / loss
  make_state: Callable[[], train_lib.TrainState]  # a fresh initial state
  teacher_path: str | None = None  # where the teacher's params came from
  on_policy: Callable | None = None  # on_policy.make's batch rewrite (None: lmbda 0)

  @property
  def flops_per_step(self) -> float:
    """Model FLOPs of one optimizer step, all parts together (``flops.total``)."""
    return self.flops.total

  @property
  def teachers(self) -> tuple[tuple[nn.Module, Any], ...]:
    """(module, variables) of every teacher model, teacher 0 first (() without one)."""
    if self.teacher is None:
      return ()
    if self.ema is not None:  # the student's module on the state's average, as it is now
      return ((self.teacher, ema_lib.teacher_vars(self.state)),)
    if isinstance(self.teacher, tuple):
      return tuple(zip(self.teacher, self.teacher_vars))
    return ((self.teacher, self.teacher_vars),)

  @property
  def ema(self) -> ema_lib.Schedule | None:
    """An EMA teacher's schedule (teacher.source='ema': its params are the state's
    ``ema_params``, ``teacher_vars`` None; ``teachers`` shows them), else None."""
    return ema_lib.schedule_of(self.cfg)

  @property
  def teacher_params(self) -> Any:
    """Teacher 0's params (None without a teacher model)."""
    return self.teachers[0][1]["params"] if self.teachers else None

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


def model_of(cfg: Any, side: str) -> nn.Module:
  """The ``student`` or ``teacher`` model of ``cfg`` (its section and dtype policy)."""
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
  abstract: bool = False,
) -> Run:
  """Builds the mesh, models, state, teacher variables and the jitted step.

  Args:
    cfg: a config (``config.default_config()`` or a loaded file); validated here.
    workdir: the run's directory (only read for teacher.source='pretrain', whose stage
      ``loop.pretrain_teacher`` must have run).
    devices: the devices of the mesh (default: all).
    create_state: False leaves ``run.state`` abstract, to be restored from a checkpoint.
    student_vars: the student's Flax variables ``{"params": ...}`` to start from (no init).
    teacher_vars: the teacher's variables ``{"params": ...}``, used instead of
      ``teacher.source`` (which must still name a teacher model, e.g. 'random'); placed into
      the teacher's shardings. A c=fp8 teacher's scales are calibrated as usual.
    data: False builds no data iterator (``run.data_iter`` is None): feed ``run.step``.
    abstract: allocate and read nothing: state and teacher variables are ShapeDtypeStructs
      with shardings, no data iterator; ``devices`` may be a TPU topology's abstract ones
      (``_abstract_teacher_vars``; what ``jaxdistill compile`` compiles, ``preflight``).

  Returns:
    The Run. ``run.step(batch)`` trains one step; ``run.compile(batch)`` gives the compiled
    step; ``loop.run_steps`` drives it from ``run.data_iter``.
  """
  validate.validate(cfg)
  if not abstract:
    _check_generated_data(cfg, workdir)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  validate.check_mesh(cfg, dict(mesh.shape))
  obj, student, views, modules = _models(cfg, mesh)
  teacher = None if not modules else modules[0] if len(modules) == 1 else modules
  co = codistill_lib.of(cfg)  # models trained beside the student, or None
  tx = train_lib.make_optimizer(cfg.optim) if co is None else codistill_lib.optimizer(co, cfg.optim)
  make_state = functools.partial(
    train_lib.init_state,
    obj,
    student,
    tx,
    jax.eval_shape(lambda: jax.random.key(cfg.seed)) if abstract else jax.random.key(cfg.seed),
    mesh,
    cfg.data.seq_len,
    loss_scale=precision.init_loss_scale(cfg.optim),
    student_variables=student_vars,
    ema=cfg.teacher.source == ema_lib.SOURCE,  # the EMA teacher's average, in the state
    codistill=co,
    snapshot=lwf_lib.schedule_of(cfg) is not None,  # continual distillation's snapshot
  )
  state, state_shardings = make_state(create=create_state and not abstract)
  teacher_vars, teacher_shardings, teacher_path = (
    _abstract_teacher_vars(views, modules, mesh)
    if abstract
    else _all_teacher_vars(views, modules, mesh, workdir, teacher_vars)
  )
  rewrite = on_policy_lib.make(student, cfg.distill.on_policy, _stop_tokens(cfg), cfg.seed)
  lr = train_lib.lr_schedule(cfg.optim)
  args = (obj, student, teacher, tx, cfg.optim.grad_accum, lr, cfg.optim.loss_scale_period)
  hooks = (rewrite, ema_lib.schedule_of(cfg), lwf_lib.schedule_of(cfg), co)  # on-policy, EMA, LwF
  step = train_lib.make_distill_step(*args, *hooks)
  step_fn = train_lib.jit_distill_step(step, state_shardings, teacher_shardings, mesh)
  return Run(
    *(cfg, mesh, obj, student, teacher, state, teacher_vars, step_fn),
    data_lib.make_iterator(cfg, "train") if data and not abstract else None,
    _flops_per_step(cfg, obj, student, modules, co),
    lambda: make_state(create=True)[0],
    teacher_path,
    rewrite,
  )


def _models(cfg: Any, mesh) -> tuple:
  """(objective, student module, teacher config views, teacher modules); every teacher's
  placement rules are checked against the mesh before anything is initialised."""
  obj = objective_lib.make_objective(cfg)
  student = model_of(cfg, "student")
  if cfg.teacher.source == ema_lib.SOURCE:  # the student's own module, on its average
    return obj, student, [cfg], (student,)
  views = [teacher_lib.view(cfg, k) for k in range(obj.num_teachers)] if obj.uses_teacher else []
  modules = tuple(model_of(view, "teacher") for view in views)
  for view, module in zip(views, modules):
    teacher_lib.rules(view, module, mesh)
  return obj, student, views, modules


def _check_generated_data(cfg: Any, workdir: str | None) -> None:
  """Teacher-written training pairs must come from the teacher the run names (a
  ``teacher.source='workdir'`` run: its final_params' content hash against the set's)."""
  if not cfg.data.task_train_files or cfg.teacher.source != "workdir":
    return
  from jaxdistill.data import task_data
  from jaxdistill.train import checkpoint

  path = teacher_lib.params_path(cfg, workdir)
  task_data.check_writer(cfg.data.task_train_files, checkpoint.content_hash(path))


def _stop_tokens(cfg: Any) -> tuple[int, ...]:
  """The data's end-of-text id (a text source's tokenizer), which ends an on-policy sample;
  none for synthetic data. Only read with ``distill.on_policy.lmbda`` > 0."""
  if cfg.distill.on_policy.lmbda == 0 or cfg.data.source not in sources.TEXT_SOURCES:
    return ()
  return (tok_lib.eos_id(text_data.prepare(cfg).tokenizer),)


def _flops_per_step(
  cfg: Any, obj: objective_lib.Objective, student: nn.Module, teachers: Any, co: Any = None
) -> models.StepFlops:
  """Model FLOPs of one step (``models.step_flops``): the student's forward + backward, the
  teachers' forwards only (none from a cache), the heads, projections and loss the objective
  runs. ``data.batch_size`` rows per step whatever ``optim.grad_accum`` (it splits them).
  Each further teacher adds its forward and head (an ensemble's divergence runs once, or
  once per teacher with ``distill.ensemble='losses'``). ``teachers``: a module, a tuple of
  them or None. Codistillation (``co``): ``codistill.step_flops``."""
  if co is not None:
    return codistill_lib.step_flops(co, cfg, student)
  s, seq_len = student.config, cfg.data.seq_len
  if not isinstance(teachers, tuple):
    teachers = () if teachers is None else (teachers,)
  teacher = teachers[0] if teachers else None
  head = next((t for t in obj.terms if t.name in ("dense", "fused", "sparse")), None)
  student_head = head is not None
  reads_head = bool(head and (head.teacher.logits or head.teacher.head))  # a teacher's logits
  divergence = 0  # entries per example a logit divergence runs over
  if head is not None and head.name == "sparse":
    per_token = cfg.precompute.samples if cfg.distill.logit.kind == "sampled" else cfg.precompute.k
    divergence = seq_len * per_token
  elif reads_head:
    divergence = flops_lib.logits_per_example(s, seq_len)
  projections = []
  for p in obj.projections:
    if p.conv:  # "stage_<i>_to_<j>": the maps are pooled to the smaller one, then projected
      i, j = (int(x) for x in p.name.removeprefix("stage_").split("_to_"))
      hs, ws, _ = s.stage_shapes[i - 1]
      ht, wt, _ = teachers[cfg.distill.feature_map.teacher].config.stage_shapes[j - 1]
      projections.append((min(hs, ht) * min(ws, wt), p.d_in, p.d_out))
    else:  # a hidden-state map, every token
      projections.append((seq_len, p.d_in, p.d_out))
  flops = models.step_flops(
    s,
    teacher.config if teacher is not None else None,
    batch_size=cfg.data.batch_size,
    seq_len=seq_len,
    student_head=student_head,
    teacher_head=teacher is not None and reads_head,
    divergence_entries=divergence,
    projections=projections,
  )
  for extra in teachers[1:]:
    more = models.step_flops(
      s,
      extra.config,
      batch_size=cfg.data.batch_size,
      seq_len=seq_len,
      student_head=False,
      teacher_head=reads_head,
      divergence_entries=divergence if cfg.distill.ensemble == "losses" else 0,
    )
    flops = dataclasses.replace(
      flops, teacher=flops.teacher + more.teacher, loss=flops.loss + more.loss
    )
  return flops


def _abstract_teacher_vars(views, modules, mesh) -> tuple:
  """An abstract run's teachers (its rng key is a shape too: not even 8 bytes allocated).

  (variables, shardings, None) of every teacher as ``jax.ShapeDtypeStruct``s with
  shardings: what ``teacher_lib.load`` would give, allocating and reading nothing (a Hugging
  Face teacher's tensor shapes are checked against its safetensors headers)."""
  if not modules or views[0].teacher.source == ema_lib.SOURCE:  # an EMA teacher: in the state
    return None, None, None
  got = []
  for view, module in zip(views, modules):
    table = teacher_lib.rules(view, module, mesh)
    if view.teacher.source == "hf":  # config.json and the safetensors headers, nothing more
      from jaxdistill.models import hf

      hf.check_shapes(teacher_lib.check_hf_config(view), module.config)
    shapes = models.abstract_variables(module, mesh, view.data.seq_len, table)
    fp8 = getattr(module.config, "fp8", False)  # its calibrated scales join its params
    shapes = {k: v for k, v in shapes.items() if fp8 or k in ("params", "batch_stats")}
    got.append((shapes, jax.tree.map(lambda a: a.sharding, shapes)))
  if len(got) == 1:
    return (*got[0], None)
  return tuple(g[0] for g in got), tuple(g[1] for g in got), None


def _all_teacher_vars(views, modules, mesh, workdir: str | None, given: Any) -> tuple:
  """``_teacher_vars`` of each teacher: (variables, shardings, teacher 0's path); one
  teacher's are its pytrees, several teachers' tuples of them."""
  if not modules:
    return None, None, None
  if views[0].teacher.source == ema_lib.SOURCE:  # its params are the state's average
    if given is not None:
      raise JaxdistillError("teacher.source='ema': the teacher's params are the state's average")
    return None, None, None
  if len(modules) == 1:
    return _teacher_vars(views[0], modules[0], mesh, workdir, given)
  if given is not None and (not isinstance(given, tuple) or len(given) != len(modules)):
    raise JaxdistillError(f"given teacher variables must be a tuple of {len(modules)} (teachers)")
  got = [
    _teacher_vars(view, module, mesh, workdir, None if given is None else given[k], index=k)
    for k, (view, module) in enumerate(zip(views, modules))
  ]
  return tuple(g[0] for g in got), tuple(g[1] for g in got), got[0][2]


def _teacher_vars(
  cfg: Any, teacher, mesh, workdir: str | None, given: Any, index: int = 0
) -> tuple:
  """(teacher_vars, their shardings, path or None): loaded by ``teacher.source`` or given;
  a c=fp8 teacher's calibrated FP8 scales join its params as further collections."""
  if teacher is None:
    return None, None, None
  if given is not None:
    table = teacher_lib.rules(cfg, teacher, mesh)
    all_shardings = models.variable_shardings(teacher, mesh, cfg.data.seq_len, table)
    want = {k for k in ("params", "batch_stats") if k in all_shardings}
    if set(given) != want:
      raise JaxdistillError(
        f"given teacher variables must have the keys {sorted(want)}, got {sorted(given)}"
      )
    var_shardings = {k: all_shardings[k] for k in want}
    variables, path = jax.device_put(dict(given), var_shardings), None
  else:
    variables, var_shardings, path = teacher_lib.load(cfg, teacher, mesh, workdir, index)
  if getattr(teacher.config, "fp8", False):
    fp8, fp8_shardings = teacher_lib.calibrate_fp8(cfg, teacher, variables["params"], mesh)
    variables.update(fp8)
    var_shardings.update(fp8_shardings)
  return variables, var_shardings, path


def fresh_state(run: Run) -> str:
  """A fresh ``run.state`` (random, teacher blocks or ``student.init_from``); returns how."""
  cfg = run.cfg
  run.state = run.make_state()
  if cfg.student.init_layers:  # blocks of the teacher (e.g. a Hugging Face one)
    student = teacher_lib.student_from_teacher(cfg, run.teacher_params, run.state.params["student"])
    run.state = run.state.replace(params=dict(run.state.params, student=student))
    return f"initialised the student from teacher blocks {cfg.student.init_layers!r}"
  if cfg.student.init_from:
    path = teacher_lib.final_params_dir(cfg.student.init_from)
    variables, _ = evaluate_lib.load_variables(run.student, path, run.mesh, cfg.data.seq_len)
    model_state = run.state.model_state
    if "batch_stats" in variables:  # a BatchNorm model's running averages come with it
      model_state = {**model_state, "batch_stats": variables["batch_stats"]}
    params = dict(run.state.params, student=variables["params"])
    run.state = run.state.replace(params=params, model_state=model_state)
    if run.ema is not None:  # the average starts at the student's starting point
      run.state = ema_lib.reset(run.state)
    return f"initialised the student from {path} (weights only)"
  return "started from scratch"
