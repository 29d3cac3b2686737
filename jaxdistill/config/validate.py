"""Config validation: every mistake a user can make becomes a ConfigError naming the key.

``validate(cfg)`` is the ONE entry point for every check that needs no devices: the CLI
calls it after ``config.load_config`` (which only loads), and ``loop.build_run`` calls it
again (it is cheap) so a library user cannot skip it. ``check_mesh(cfg, mesh)`` checks what
depends on the device mesh (called when a run starts).
"""

import os
from typing import Any

from jaxdistill import models, paths
from jaxdistill.config.checks import codistill as validate_codistill
from jaxdistill.config.checks import continual as validate_continual
from jaxdistill.config.checks import distill as validate_distill
from jaxdistill.config.checks import teachers as validate_teachers
from jaxdistill.data import image_sources
from jaxdistill.data.sources import DATA_SOURCES, TEXT_SOURCES
from jaxdistill.errors import ConfigError
from jaxdistill.models import surgery
from jaxdistill.parallel import placement, precision

TEACHER_SOURCES = ("none", "random", "pretrain", "workdir", "cache", "hf", "ema")
# Sources with no teacher model to run: its shape keys are not checked against the data/mesh.
NO_TEACHER_MODEL = ("none", "cache")
# data.interleave: every stream is a live grain iterator holding one open document.
MAX_INTERLEAVE = 4096


def _positive(cfg: Any, key: str) -> None:
  section, leaf = key.rsplit(".", 1)
  value = cfg[section][leaf]
  if not value > 0:
    raise ConfigError(key, f"must be > 0, got {value!r}")


def validate(cfg: Any) -> None:
  """Raises ConfigError for the first bad or inconsistent setting.

  With several teachers every check runs on each teacher's view of the config
  (``validate_teachers.views``), its errors naming that teacher's keys."""
  validate_teachers.check_ensemble(cfg)
  validate_codistill.check_codistill(cfg)
  validate_continual.check(cfg)
  for k, view in validate_teachers.views(cfg):
    try:
      _validate_one(view)
    except ConfigError as e:
      raise (validate_teachers.renamed(e, k) if k else e) from None


def _validate_one(cfg: Any) -> None:
  """``validate`` of one teacher's view of the config."""
  student_policy = precision.parse_policy(cfg.student.policy, "student.policy")
  if cfg.optim.loss_scale not in precision.LOSS_SCALES:
    raise ConfigError(
      "optim.loss_scale", f"unknown {cfg.optim.loss_scale!r}; choose from {precision.LOSS_SCALES}"
    )
  precision.check_trainable(
    student_policy, "student.policy", loss_scaling=cfg.optim.loss_scale == "dynamic"
  )
  models.build(cfg.student, student_policy, "student")  # a bad model key fails here
  check_execution(cfg.student, student_policy, "student")
  _check_teacher(cfg)
  t = cfg.teacher
  _check_precompute(cfg.precompute)
  if t.source == "workdir" and not paths.isdir(t.path):
    raise ConfigError(
      "teacher.path",
      f"{t.path!r} is not a directory; point it at the "
      "--workdir of a finished `jaxdistill train` run",
    )
  if cfg.data.source not in DATA_SOURCES:
    raise ConfigError("data.source", f"unknown {cfg.data.source!r}; choose from {DATA_SOURCES}")
  _check_data(cfg)
  for key in (
    "data.batch_size",
    "data.seq_len",
    "optim.steps",
    "optim.lr",
    "optim.grad_accum",
    "optim.loss_scale_init",
    "optim.loss_scale_period",
    "log.every",
  ):
    _positive(cfg, key)
  for side in ("student", "teacher") if t.source not in NO_TEACHER_MODEL else ("student",):
    if cfg.data.seq_len > cfg[side].max_len:
      raise ConfigError(
        "data.seq_len", f"{cfg.data.seq_len} exceeds {side}.max_len={cfg[side].max_len}"
      )
  if cfg.data.batch_size % cfg.optim.grad_accum:
    raise ConfigError(
      "optim.grad_accum",
      f"data.batch_size={cfg.data.batch_size} does "
      f"not split into {cfg.optim.grad_accum} micro-batches",
    )
  if cfg.optim.nan_policy not in ("stop", "skip"):
    raise ConfigError("optim.nan_policy", f"unknown {cfg.optim.nan_policy!r}; choose stop or skip")
  if cfg.ckpt.every < 0 or cfg.ckpt.max_to_keep < 0:
    raise ConfigError("ckpt.every", "ckpt.every and ckpt.max_to_keep must be >= 0")
  if cfg.ckpt.best_mode not in ("min", "max"):
    raise ConfigError("ckpt.best_mode", f"unknown {cfg.ckpt.best_mode!r}; choose min or max")
  if not isinstance(cfg.log.tensorboard, bool):
    raise ConfigError("log.tensorboard", f"must be true or false, got {cfg.log.tensorboard!r}")
  _check_hf(cfg)
  if cfg.student.init_from and not paths.isdir(cfg.student.init_from):
    raise ConfigError(
      "student.init_from",
      f"{cfg.student.init_from!r} is not a directory; "
      "point it at a run's final_params (or its workdir)",
    )
  if cfg.optim.lr_schedule not in ("cosine", "constant"):
    raise ConfigError(
      "optim.lr_schedule", f"unknown {cfg.optim.lr_schedule!r}; choose cosine or constant"
    )
  validate_distill.check_distill(cfg)
  _positive(cfg, "optim.eps")
  if cfg.teacher.source != "none":  # without a teacher the objective uses constants
    validate_distill.check_schedule_ranges(cfg)


def check_execution(section: Any, policy: precision.Policy, key: str) -> None:
  """``scan_layers`` and ``remat`` of a model section (``key``: student or teacher).

  remat must be one of ``models.REMATS`` (decoders and encoders); scan_layers is a bool, and
  only a decoder with float matmuls scans its blocks: image classifiers, the BERT encoder and
  c=fp8 / c=int8 models (their per-block FP8 state and qwix quantisation are not stacked) are
  refused. Sections predating the keys (plain dicts) hold their defaults.
  """
  remat = section["remat"] if "remat" in section else "none"
  scan = section["scan_layers"] if "scan_layers" in section else False
  if remat not in models.REMATS:
    raise ConfigError(f"{key}.remat", f"unknown {remat!r}; choose from {models.REMATS}")
  if not isinstance(scan, bool):
    raise ConfigError(f"{key}.scan_layers", f"must be true or false, got {scan!r}")
  if models.is_vision(section):
    for name, value, default in (("scan_layers", scan, False), ("remat", remat, "none")):
      if value != default:
        raise ConfigError(
          f"{key}.{name}",
          f"applies to transformer blocks; {key}.arch={section['arch']!r} is an image "
          f"classifier: leave it {default!r}",
        )
    return
  if not scan:
    return
  if section["encoder"]:
    raise ConfigError(
      f"{key}.scan_layers", "scans the decoder's blocks only; the BERT encoder runs unrolled"
    )
  if policy.fp8 or policy.int8:
    mode = "c=fp8" if policy.fp8 else "c=int8"
    raise ConfigError(
      f"{key}.scan_layers",
      f"is not supported with {key}.policy {mode} (per-block quantisation state is not "
      "stacked); set it false",
    )


def _check_teacher(cfg: Any) -> None:
  """``teacher``: its source, its model and policy (when it has one), its pretraining steps and
  its cache directory."""
  t = cfg.teacher
  if t.source not in TEACHER_SOURCES:
    raise ConfigError("teacher.source", f"unknown {t.source!r}; choose from {TEACHER_SOURCES}")
  if t.source != "none":
    teacher_policy = precision.parse_policy(t.policy, "teacher.policy")
    n = t.fp8_calibration_batches
    if teacher_policy.fp8 and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
      raise ConfigError(
        "teacher.fp8_calibration_batches",
        f"must be an int >= 1 with teacher.policy c=fp8 (batches that calibrate the frozen "
        f"teacher's static FP8 scales), got {n!r}",
      )
    models.build(t, teacher_policy, "teacher")
    check_execution(t, teacher_policy, "teacher")
  if t.source == "ema":  # the student's own average (train/ema.py)
    validate_teachers.check_ema(cfg)
  if t.source not in NO_TEACHER_MODEL:
    placement.parse_rules(t.rules)  # its syntax; whether it splits the teacher: teacher.rules()
  if t.source == "pretrain" and t.pretrain_steps <= 0:
    raise ConfigError("teacher.pretrain_steps", "must be > 0 when teacher.source='pretrain'")
  if t.source == "cache" and not paths.isdir(t.path):
    raise ConfigError(
      "teacher.path",
      f"{t.path!r} is not a directory; point it at the --output of `jaxdistill precompute`",
    )


def _check_hf(cfg: Any) -> None:
  """teacher.source='hf', student.init_layers and the embedding loss (models/hf.py)."""
  t, s = cfg.teacher, cfg.student
  if t.source == "hf" and not os.path.isfile(os.path.join(t.path, "config.json")):
    raise ConfigError(
      "teacher.path", f"{t.path!r} holds no config.json; point it at a Hugging Face model directory"
    )
  if s.init_layers:
    if t.source in NO_TEACHER_MODEL:
      raise ConfigError("student.init_layers", f"needs a teacher model, not {t.source!r}")
    if s.init_from:
      raise ConfigError("student.init_layers", "and student.init_from both set; choose one")
    try:
      surgery.select_layers(s.init_layers, t.num_layers, s.num_layers)
    except ValueError as e:
      raise ConfigError("student.init_layers", str(e)) from None
    for key in models.MODEL_KEYS:
      # scan_layers / remat: how each runs (teacher_lib.student_from_teacher converts layouts)
      if key not in ("num_layers", *models.EXECUTION_KEYS) and s[key] != t[key]:
        same = f"student.{key}={s[key]!r} must equal teacher.{key}={t[key]!r}"
        raise ConfigError("student.init_layers", f"copies teacher blocks, so {same}")
  if cfg.distill.embedding.weight and not (s.encoder and t.encoder):
    raise ConfigError(
      "distill.embedding.weight", "needs encoders (student.encoder and teacher.encoder true)"
    )


def _check_precompute(p: Any) -> None:
  """The ``precompute`` section (jaxdistill/precompute/text.py, data/cached.py)."""
  if p.targets not in ("topk", "sampled", "both"):
    raise ConfigError("precompute.targets", f"unknown {p.targets!r}; choose topk, sampled or both")
  if p.logprob_dtype not in ("bf16", "f16", "f32"):
    raise ConfigError(
      "precompute.logprob_dtype", f"unknown {p.logprob_dtype!r}; choose bf16, f16 or f32"
    )
  if p.k < 1 or not 1 <= p.samples <= 65535 or p.rows_per_shard < 1:
    raise ConfigError("precompute", "k >= 1, 1 <= samples <= 65535 and rows_per_shard >= 1")
  if p.rows < 0 or p.temperature < 0:
    raise ConfigError("precompute", "rows >= 0 (0 = all) and temperature >= 0 (0 = distill's)")


def _check_data(cfg: Any) -> None:
  """Data settings that contradict each other (files and datasets are checked when opened)."""
  d = cfg.data
  image_sources.check_keys(cfg)  # the image keys; a text model's data: below
  if d.packing not in ("pack", "pad"):
    raise ConfigError("data.packing", f"unknown {d.packing!r}; choose pack or pad")
  if d.stdlib_kind not in ("all", "code", "docstrings"):
    raise ConfigError(
      "data.stdlib_kind", f"unknown {d.stdlib_kind!r}; choose all, code, docstrings"
    )
  if d.source == "tfds" and not d.tfds_name:
    raise ConfigError("data.tfds_name", "is empty; name a prepared TFDS dataset")
  if d.source in ("array_record", "text") and not d.train_files:
    raise ConfigError("data.train_files", f"is empty; data.source={d.source!r} needs files")
  if d.source == "task":
    from jaxdistill.data import task_data

    if d.task not in task_data.TASKS:
      raise ConfigError("data.task", f"unknown task {d.task!r}; choose from {task_data.TASKS}")
    if isinstance(d.task_eval_problems, bool) or not d.task_eval_problems >= 1:
      raise ConfigError("data.task_eval_problems", f"must be >= 1, got {d.task_eval_problems!r}")
  if d.task_train_files and d.source != "task":
    if d.source not in TEXT_SOURCES or cfg.teacher.source == "cache":
      raise ConfigError(
        "data.task_train_files",
        f"(prompt, completion) training pairs need a text source, not data.source="
        f"{d.source!r}, and no logit cache (teacher.source='cache')",
      )
  if d.tokenizer and not paths.isfile(d.tokenizer):  # a run's own may be gs://
    raise ConfigError(
      "data.tokenizer",
      f"no such file {d.tokenizer!r}; point it at a tokenizer.json or leave it "
      "empty to train a BPE on the training split",
    )
  if min(d.num_threads, d.prefetch, d.shuffle_rows, cfg.eval.every, cfg.eval.batches) < 0:
    raise ConfigError("data", "num_threads, prefetch, shuffle_rows, eval.every, eval.batches: >= 0")
  if not isinstance(d.interleave, int) or not 0 <= d.interleave <= MAX_INTERLEAVE:
    raise ConfigError(
      "data.interleave",
      f"is {d.interleave!r}; give a whole number of document streams from 0 (one stream) to "
      f"{MAX_INTERLEAVE}",
    )
  text = cfg.student.arch == "transformer"  # synthetic images have a finite eval split
  if cfg.eval.every and text and d.source == "synthetic" and cfg.eval.batches == 0:
    raise ConfigError("eval.batches", "must be > 0 for synthetic data (its stream never ends)")
  if cfg.eval.every and d.source in ("array_record", "text") and not d.eval_files:
    raise ConfigError("data.eval_files", "is empty but eval.every > 0 needs a validation split")


def check_mesh(cfg: Any, mesh_shape: dict[str, int]) -> None:
  """Checks that the batch and the models (every teacher's) split evenly over the mesh."""
  for k, view in validate_teachers.views(cfg):
    try:
      _check_mesh_one(view, mesh_shape)
    except ConfigError as e:
      raise (validate_teachers.renamed(e, k) if k else e) from None


def _check_mesh_one(cfg: Any, mesh_shape: dict[str, int]) -> None:
  rows = mesh_shape["data"] * mesh_shape["fsdp"]
  micro = cfg.data.batch_size // cfg.optim.grad_accum
  if micro % rows:
    raise ConfigError(
      "data.batch_size",
      f"each micro-batch of {micro} rows must split over mesh data*fsdp={rows} devices",
    )
  tensor = mesh_shape["tensor"]
  sides = ("student",) if cfg.teacher.source in NO_TEACHER_MODEL else ("student", "teacher")
  for side in sides:
    if cfg[side].arch != "transformer":
      _check_image_mesh(cfg, side, tensor)
      continue
    for key in ("vocab_size", "num_heads", "d_ff"):
      if cfg[side][key] % tensor:
        raise ConfigError(
          "mesh.tensor",
          f"{side}.{key}={cfg[side][key]} does not split over tensor={tensor} devices",
        )
    if cfg[side].d_model % mesh_shape["fsdp"]:
      raise ConfigError(
        "mesh.fsdp",
        f"{side}.d_model={cfg[side].d_model} does not split over fsdp={mesh_shape['fsdp']} devices",
      )


def _check_image_mesh(cfg: Any, side: str, tensor: int) -> None:
  """An image model's channels (and a CNN's fc width) split over the tensor axis."""
  policy = precision.parse_policy(cfg[side].policy, f"{side}.policy")
  vc = models.vision_config_from_section(cfg[side], policy, side)
  widths = list(vc.stage_channels) + ([vc.cnn_fc] if vc.arch == "cnn" else [])
  for width in widths:
    if width % tensor:
      raise ConfigError(
        "mesh.tensor",
        f"{side} ({vc.arch}) has a layer of {width} channels, which does not split over "
        f"tensor={tensor} devices",
      )
