"""Where the teacher's params come from (``teacher.source``).

  none      no teacher: the student trains on CE alone
  random    random init (tests, smoke runs)
  pretrain  trained first on CE into WORKDIR/teacher/ (an explicit stage,
            ``loop.pretrain_teacher``, before the run is built), reused afterwards
  workdir   the final params of an earlier `jaxdistill train` run at teacher.path
  hf        a Hugging Face model directory at teacher.path (models/hf.py), loaded tensor by
            tensor into its shardings; the teacher.* model keys must describe it

Whatever the source, the params arrive sharded by the teacher's logical rules
(``teacher.rules``, see ``placement``: the student's by default; ``rules``), in the teacher
policy's param dtype, and are never checkpointed:
checkpoints record only the teacher's identity (``identity``). A c=fp8 teacher
also gets static FP8 scales, calibrated on a few training batches each run
(``calibrate_fp8``) and likewise never checkpointed.
"""

import copy
import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import config as config_lib
from jaxdistill import models, paths
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.evaluation import evaluate
from jaxdistill.models import fp8, quant, scan, surgery
from jaxdistill.parallel import placement, precision
from jaxdistill.train import checkpoint


def view(cfg: Any, k: int) -> Any:
  """``cfg`` as teacher ``k`` sees it: its section (``config.teachers_of``) as ``teacher``, so
  every one-teacher function here serves each teacher of an ensemble. ``cfg`` itself for 0."""
  if k == 0:
    return cfg
  out = copy.deepcopy(cfg)
  out.teacher = config_lib.teachers_of(cfg)[k]
  out.teachers = ()
  return out


def pretrain_config(cfg: Any, index: int = 0) -> Any:
  """The config that trains the teacher itself on CE (teacher.source='pretrain'); teacher
  ``index`` of an ensemble (``cfg`` its ``view``) trains from seed + index."""
  t = copy.deepcopy(cfg)
  t.seed = cfg.seed + index
  for key in (*models.MODEL_KEYS, *models.VISION_KEYS):  # whatever kind of model the teacher is
    t.student[key] = cfg.teacher[key]
  t.student.remat = cfg.teacher.remat  # it trains as the teacher's remat says
  # The teacher trains in f32 params whatever its inference policy stores. A
  # c=fp8 teacher trains in bf16 (its non-matmul dtype): its saved params carry
  # no FP8 state, its static scales are calibrated on the final weights anyway
  # (calibrate_fp8), and bf16 training is the better teacher for the same steps.
  compute = precision.parse_policy(cfg.teacher.policy, "teacher.policy").compute_dtype
  t.student.policy = f"p=f32,c={jnp.dtype(compute).name},o=f32"
  if compute == jnp.float16:  # float16 gradients need it (precision.check_trainable)
    t.optim.loss_scale = "dynamic"
  t.student.init_from = ""
  t.teacher.source, t.teachers = "none", ()
  for key in ("logit", "attention", "hidden", "embedding", "attention_transfer", "feature_map"):
    t.distill[key].weight = 0.0
    if key != "logit":
      t.distill[key].teacher = 0
  t.distill.attention.value_weight = 0.0
  t.distill.on_policy.lmbda = 0.0  # CE on the data: nothing to sample for
  t.continual.domains = 0  # a continual run's teacher trains on the corpus as a whole
  t.optim.steps = cfg.teacher.pretrain_steps
  t.optim.lr = cfg.teacher.pretrain_lr
  t.optim.warmup_steps = max(1, cfg.teacher.pretrain_steps // 10)
  return t


def params_path(cfg: Any, workdir: str | None, index: int = 0) -> str | None:
  """The final_params directory the teacher loads from (None for random/none); a pretrained
  teacher ``index`` of an ensemble lives in WORKDIR/teacher_<index> (teacher 0 in teacher)."""
  if cfg.teacher.source == "pretrain":
    if workdir is None:
      raise JaxdistillError("teacher.source='pretrain' needs a workdir to train the teacher in")
    name = f"teacher_{index}" if index else "teacher"
    return paths.join(workdir, name, checkpoint.FINAL_PARAMS)
  if cfg.teacher.source == "workdir":
    return final_params_dir(cfg.teacher.path)
  return None


def final_params_dir(path: str) -> str:
  """``path`` itself if it holds params, else ``path/final_params`` (a workdir)."""
  inner = paths.join(path, checkpoint.FINAL_PARAMS)
  return inner if paths.isdir(inner) else path


def rules(cfg: Any, teacher: nn.Module, mesh) -> Any:
  """The teacher's rules table (``placement.parse_rules`` of ``teacher.rules``; None: the
  student's), checked against ``mesh``: every param dimension it splits must divide.

  Raises:
    ConfigError: a bad ``teacher.rules`` or one that does not split the teacher on ``mesh``.
  """
  table = placement.parse_rules(cfg.teacher.rules)
  if table is not None:
    init = lambda r: models.init_variables(teacher, r, cfg.data.seq_len)  # noqa: E731
    abstract = jax.eval_shape(init, jax.random.key(0))
    placement.check_divisible(table, abstract, dict(mesh.shape))
  return table


def load(cfg: Any, teacher: nn.Module, mesh, workdir: str | None, index: int = 0):
  """Teacher variables by ``teacher.source``: (variables, shardings, path or None).

  ``variables`` is ``{"params": ...}``, plus a BatchNorm teacher's running averages
  ``"batch_stats"`` (it always runs in inference mode on them); ``shardings`` mirrors it.

  Args:
    cfg: the run's config.
    teacher: the teacher module.
    mesh: the device mesh.
    workdir: the run's workdir (a pretrained teacher lives in WORKDIR/teacher).
    index: which teacher of an ensemble ``cfg`` is the ``view`` of: a random one is
      initialised from seed + 1 + index.

  Raises:
    JaxdistillError: teacher.source='pretrain' and its stage has not run yet.
  """
  seq_len, table = cfg.data.seq_len, rules(cfg, teacher, mesh)
  if cfg.teacher.source == "hf":
    params, shardings, path = _load_hf(cfg, teacher, mesh, table)
    return {"params": params}, {"params": shardings}, path
  if cfg.teacher.source == "random":
    rng = jax.random.key(cfg.seed + 1 + index)
    abstract = jax.eval_shape(lambda r: models.init_variables(teacher, r, seq_len), rng)
    kept = tuple(k for k in ("params", "batch_stats") if k in abstract)
    variables, shardings = models.create_variables(teacher, rng, mesh, seq_len, kept, table)
    return variables, shardings, None
  path = params_path(cfg, workdir, index)
  if cfg.teacher.source == "pretrain" and not paths.isdir(path):
    raise JaxdistillError(
      f"teacher.source='pretrain': no pretrained teacher at {path}; run the pretraining stage "
      "first (loop.pretrain_teacher; `jaxdistill train` and `precompute` do it themselves)"
    )
  variables, shardings = evaluate.load_variables(teacher, path, mesh, seq_len, table)
  return variables, shardings, path


def identity(cfg: Any, variables: Any, path: str | None) -> dict:
  """What a precomputed cache records of its teacher: source and model keys, and the sha256
  of its final_params directory (``path``) or, for a random teacher, of its variables."""
  ident = {
    "source": cfg.teacher.source,
    # scan_layers / remat change how the teacher runs, never its outputs: not part of it
    "config": {
      k: cfg.teacher[k]
      for k in (*models.shape_keys(cfg.teacher), "policy")
      if k not in models.EXECUTION_KEYS
    },
  }
  if path:
    ident.update(path=path, sha256=checkpoint.content_hash(path))
    return ident
  digest = hashlib.sha256()  # a random teacher: hash the variables themselves (small)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
    digest.update(jax.tree_util.keystr(key_path).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return dict(ident, seed=cfg.seed + 1, sha256=digest.hexdigest())


def calibrate_fp8(cfg: Any, teacher: nn.Module, params: Any, mesh) -> tuple[Any, Any]:
  """Static FP8 scales of a c=fp8 teacher: (variables, shardings), see ``models.fp8.calibrate``.

  Calibrates on the first ``teacher.fp8_calibration_batches`` batches of a FRESH
  training iterator (the run's seed), never the run's own: a resumed run
  recalibrates to the same scales, and the run's data stream is untouched.
  """
  import itertools

  from jaxdistill import data as data_lib

  n = cfg.teacher.fp8_calibration_batches
  batches = itertools.islice(data_lib.make_iterator(cfg, "train"), n)
  return fp8.calibrate(teacher, params, batches, mesh, cfg.data.seq_len)


def calibrate_int8(cfg: Any, student: nn.Module, state: Any, mesh) -> Any:
  """``state`` with a c=int8 student's static activation scales (``models.quant.calibrate``).

  Like ``calibrate_fp8``: the first ``student.quant_calibration_batches`` batches of a FRESH
  training iterator, so the run's data stream is untouched; called before step 1 only (the
  scales are then part of the checkpointed state).
  """
  import itertools

  from jaxdistill import data as data_lib

  n = cfg.student.quant_calibration_batches
  batches = itertools.islice(data_lib.make_iterator(cfg, "train"), n)
  variables = {"params": state.params["student"], **state.model_state}
  stats = quant.calibrate(student, variables, batches, mesh)
  return state.replace(model_state={**state.model_state, quant.COLLECTION: stats})


def check_hf_config(cfg: Any) -> str:
  """A Hugging Face teacher's config.json must say what the run's teacher keys say; returns
  its path. Raises ConfigError naming the first key that differs."""
  from jaxdistill.models import hf

  path = cfg.teacher.path
  found = hf.read_config(path).config
  for key in checkpoint.MODEL_KEYS:
    if key in models.EXECUTION_KEYS:  # scan_layers / remat: the teacher's own (hf.load)
      continue
    want = getattr(found, key)
    if cfg.teacher[key] != want:
      raise ConfigError(
        f"teacher.{key}", f"is {cfg.teacher[key]!r} but {path}/config.json says {want!r}"
      )
  return path


def _load_hf(cfg: Any, teacher: nn.Module, mesh, table: Any):
  """(params, shardings, path) of a Hugging Face teacher; its config.json must match."""
  from jaxdistill.models import hf

  path = check_hf_config(cfg)
  hfm = hf.HFModel(hf.read_config(path).model_type, teacher.config)
  _, params = hf.load(path, hfm, mesh, table)
  shardings = models.variable_shardings(teacher, mesh, cfg.data.seq_len, table)["params"]
  return params, shardings, path


def student_from_teacher(cfg: Any, teacher_params: Any, student_params: Any) -> Any:
  """The student's params made of the teacher's blocks ``student.init_layers``.

  Embeddings, norms and head are the teacher's; block j is teacher block layers[j]
  (``surgery.select_layers``). Fresh copies in the student's shardings and dtype (the
  step donates the student's buffers; the teacher's must survive). Either may scan its blocks
  (``scan_layers``): the teacher's are picked unrolled, then laid out as the student's.
  """
  layers = surgery.select_layers(
    cfg.student.init_layers, cfg.teacher.num_layers, cfg.student.num_layers
  )
  picked = surgery.init_from_teacher(scan.unstack_blocks(teacher_params), layers)
  picked = scan.to_layout(picked, scan.layout(student_params) == "scanned")
  shardings = jax.tree.map(lambda a: a.sharding, student_params)
  dtypes = jax.tree.map(lambda a: a.dtype, student_params)
  copy = jax.jit(
    lambda tree: jax.tree.map(lambda a, d: jnp.array(a, dtype=d, copy=True), tree, dtypes),
    out_shardings=shardings,
  )
  return copy(picked)
