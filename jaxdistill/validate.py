"""Config validation: every mistake a user can make becomes a ConfigError naming the key.

``validate(cfg)`` checks what can be checked without devices (called by
``config.load_config``); ``check_mesh(cfg, mesh)`` checks what depends on the
device mesh (called when a run starts).
"""

import os
from typing import Any

from jaxdistill import losses, models, precision, schedules, sparse
from jaxdistill.errors import ConfigError

TEACHER_SOURCES = ("none", "random", "pretrain", "workdir", "cache", "hf")
# Sources with no teacher model to run: its shape keys are not checked against the data/mesh.
NO_TEACHER_MODEL = ("none", "cache")
# Text sources are tokenised and packed by jaxdistill/data/pipeline.py.
TEXT_SOURCES = ("stdlib", "tfds", "array_record", "text")
DATA_SOURCES = ("synthetic",) + TEXT_SOURCES


def _positive(cfg: Any, key: str) -> None:
  section, leaf = key.rsplit(".", 1)
  value = cfg[section][leaf]
  if not value > 0:
    raise ConfigError(key, f"must be > 0, got {value!r}")


def validate(cfg: Any) -> None:
  """Raises ConfigError for the first bad or inconsistent setting."""
  student_policy = precision.parse_policy(cfg.student.policy, "student.policy")
  if cfg.optim.loss_scale not in precision.LOSS_SCALES:
    raise ConfigError(
      "optim.loss_scale", f"unknown {cfg.optim.loss_scale!r}; choose from {precision.LOSS_SCALES}"
    )
  precision.check_trainable(
    student_policy, "student.policy", loss_scaling=cfg.optim.loss_scale == "dynamic"
  )
  models.transformer_config(cfg.student, student_policy, "student")
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
    models.transformer_config(t, teacher_policy, "teacher")
  if t.source == "pretrain" and t.pretrain_steps <= 0:
    raise ConfigError("teacher.pretrain_steps", "must be > 0 when teacher.source='pretrain'")
  if t.source == "cache" and not os.path.isdir(t.path):
    raise ConfigError(
      "teacher.path",
      f"{t.path!r} is not a directory; point it at the --output of `jaxdistill precompute`",
    )
  _check_precompute(cfg.precompute)
  if t.source == "workdir" and not os.path.isdir(t.path):
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
  _check_hf(cfg)
  if cfg.student.init_from and not os.path.isdir(cfg.student.init_from):
    raise ConfigError(
      "student.init_from",
      f"{cfg.student.init_from!r} is not a directory; "
      "point it at a run's final_params (or its workdir)",
    )
  if cfg.optim.lr_schedule not in ("cosine", "constant"):
    raise ConfigError(
      "optim.lr_schedule", f"unknown {cfg.optim.lr_schedule!r}; choose cosine or constant"
    )
  _check_distill(cfg)


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
    from jaxdistill.models import hf_export

    try:
      hf_export.select_layers(s.init_layers, t.num_layers, s.num_layers)
    except ValueError as e:
      raise ConfigError("student.init_layers", str(e)) from None
    for key in models.MODEL_KEYS:
      if key != "num_layers" and s[key] != t[key]:
        same = f"student.{key}={s[key]!r} must equal teacher.{key}={t[key]!r}"
        raise ConfigError("student.init_layers", f"copies teacher blocks, so {same}")
  if cfg.distill.embedding.weight and not (s.encoder and t.encoder):
    raise ConfigError(
      "distill.embedding.weight", "needs encoders (student.encoder and teacher.encoder true)"
    )


def _check_fused(cfg: Any) -> None:
  """distill.fused / token_chunk / vocab_chunk (the fused loss head, jaxdistill/fused.py)."""
  d = cfg.distill
  if not isinstance(d.fused, bool):
    raise ConfigError("distill.fused", f"must be true or false, got {d.fused!r}")
  for key in ("token_chunk", "vocab_chunk"):
    if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < 0:
      raise ConfigError(f"distill.{key}", f"must be an int >= 0 (0 = off), got {d[key]!r}")
  # A logit term runs (a teacher, and not weight 0 under a constant schedule) through a
  # chunked head (fused, or sparse, which is never dense): only forward KL streams.
  kind = d.logit.kind
  logit_on = cfg.teacher.source != "none" and not _off(d.logit, "weight")
  chunked = d.fused or kind in sparse.SPARSE_KINDS
  if chunked and d.vocab_chunk and logit_on and kind != "kl":
    raise ConfigError(
      "distill.vocab_chunk",
      f"vocabulary chunks stream only logit.kind='kl', not {kind!r}; set "
      "distill.vocab_chunk=0 (token chunks fuse every kind) or distill.fused=False",
    )


def _off(section: Any, key: str) -> bool:
  """The weight turns its term off (as objective.make_objective reads it): 0 under a constant
  schedule; a secondary weight (attention.value_weight) is off at 0 whatever the schedule."""
  return section[key] == 0 and (key != "weight" or section.schedule == "constant")


def _check_weight(section: Any, name: str, steps: int) -> None:
  """``<name>.weight`` >= 0 and ``<name>.schedule`` parses (nothing to check when off)."""
  if _off(section, "weight"):
    return
  if section.weight < 0:
    raise ConfigError(f"{name}.weight", f"must be >= 0, got {section.weight}")
  try:
    schedules.parse_schedule(section.schedule, section.weight, steps)
  except ValueError as e:
    raise ConfigError(f"{name}.schedule", str(e)) from None


def _check_pairs(cfg: Any, key: str, allow_embeddings: bool) -> None:
  """``distill.<key>.layer_map`` names layers of both models (layer 0 only if allowed)."""
  spec = cfg.distill[key].layer_map
  try:
    pairs = losses.layer_map(spec, cfg.student.num_layers, cfg.teacher.num_layers)
  except ValueError as e:
    raise ConfigError(f"distill.{key}.layer_map", str(e)) from None
  if not allow_embeddings and any(0 in p for p in pairs):
    raise ConfigError(
      f"distill.{key}.layer_map",
      f"{spec!r} maps layer 0 (the embeddings), which has no attention; use layers 1..L",
    )


def _check_distill(cfg: Any) -> None:
  """The ``distill`` section (everything ``objective.make_objective`` reads): the losses, then
  the fused head's settings."""
  _check_losses(cfg)
  _check_fused(cfg)


def _check_losses(cfg: Any) -> None:
  """Kinds, weights, schedules and layer maps, against the models and the teacher source."""
  d, t = cfg.distill, cfg.teacher
  if t.source == "none":
    for key in ("logit", "attention", "hidden", "embedding"):
      if d[key].weight != 0:
        raise ConfigError(
          f"distill.{key}.weight",
          "is non-zero but there is no "
          "teacher (teacher.source='none'); set it to 0 or configure a teacher",
        )
    return
  try:
    schedules.parse_schedule(d.temperature_schedule, d.temperature, cfg.optim.steps)
  except ValueError as e:
    raise ConfigError("distill.temperature_schedule", str(e)) from None
  if d.temperature <= 0:
    raise ConfigError("distill.temperature", f"must be > 0, got {d.temperature}")
  kinds = sorted(losses.LOGIT_DIVERGENCES) + list(sparse.SPARSE_KINDS)
  if d.logit.kind not in kinds:
    raise ConfigError("distill.logit.kind", f"unknown {d.logit.kind!r}; choose from {kinds}")
  if t.source == "cache":
    _check_cache_distill(cfg)
  else:
    _check_online_distill(cfg)


def _check_cache_distill(cfg: Any) -> None:
  """teacher.source='cache': a sparse logit loss (+ CE) from stored targets, no teacher model."""
  d = cfg.distill
  for key in ("attention", "hidden", "embedding"):
    if key in d and (d[key].weight != 0 or (key == "attention" and d.attention.value_weight)):
      raise ConfigError(
        f"distill.{key}.weight",
        "is non-zero, but a cache (teacher.source='cache') stores only logit targets: "
        "there are no teacher attentions, hidden states or embeddings; set it to 0",
      )
  _check_weight(d.logit, "distill.logit", cfg.optim.steps)
  if d.logit.kind not in sparse.SPARSE_KINDS or _off(d.logit, "weight"):
    raise ConfigError(
      "distill.logit.kind",
      f"a cache needs a sparse kind {sparse.SPARSE_KINDS} with a non-zero weight, "
      f"not {d.logit.kind!r} (weight {d.logit.weight})",
    )
  _check_weight(d.ce, "distill.ce", cfg.optim.steps)


def _check_online_distill(cfg: Any) -> None:
  """A teacher model runs: the logit kind it can serve, the feature terms' layers and widths."""
  d, s, t, steps = cfg.distill, cfg.student, cfg.teacher, cfg.optim.steps
  if d.logit.kind == "sampled" and d.logit.weight:
    raise ConfigError(
      "distill.logit.kind",
      "'sampled' reads sampled targets from a cache: set teacher.source='cache' and "
      "teacher.path to a `jaxdistill precompute` output (or use topk_tail online)",
    )
  if d.logit.kind in sparse.TOPK_KINDS and cfg.precompute.k > t.vocab_size:
    raise ConfigError(
      "precompute.k", f"{cfg.precompute.k} (the online top-k) exceeds teacher.vocab_size"
    )
  if not 0.0 <= d.logit.beta <= 1.0:
    raise ConfigError("distill.logit.beta", f"must be in [0, 1], got {d.logit.beta}")
  if d.hidden.kind not in ("mse", "cosine"):
    raise ConfigError("distill.hidden.kind", f"unknown {d.hidden.kind!r}; choose mse or cosine")
  _check_weight(d.attention, "distill.attention", steps)
  if d.attention.value_weight < 0:
    raise ConfigError(
      "distill.attention.value_weight", f"must be >= 0, got {d.attention.value_weight}"
    )
  if not (_off(d.attention, "weight") and _off(d.attention, "value_weight")):
    _check_pairs(cfg, "attention", allow_embeddings=False)
    if s.num_heads != t.num_heads:
      raise ConfigError(
        "distill.attention.weight",
        f"MiniLM attention transfer needs "
        f"equal head counts, but student.num_heads={s.num_heads} and "
        f"teacher.num_heads={t.num_heads}",
      )
  _check_weight(d.hidden, "distill.hidden", steps)
  if not _off(d.hidden, "weight"):
    _check_pairs(cfg, "hidden", allow_embeddings=True)
    if s.d_model != t.d_model and not d.hidden.project:
      raise ConfigError(
        "distill.hidden.project",
        f"student.d_model={s.d_model} and "
        f"teacher.d_model={t.d_model} differ, so the hidden-state loss "
        "needs a learned projection; set it to True",
      )
  _check_weight(d.logit, "distill.logit", steps)
  if not _off(d.logit, "weight") and s.vocab_size != t.vocab_size:
    raise ConfigError(
      "teacher.vocab_size",
      f"{t.vocab_size} differs from "
      f"student.vocab_size={s.vocab_size}; logit losses need one vocabulary",
    )
  _check_weight(d.ce, "distill.ce", steps)
  _check_weight(d.embedding, "distill.embedding", steps)


def _check_precompute(p: Any) -> None:
  """The ``precompute`` section (jaxdistill/precompute.py, data/cached.py)."""
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
  if d.tokenizer and not os.path.isfile(d.tokenizer):
    raise ConfigError(
      "data.tokenizer",
      f"no such file {d.tokenizer!r}; point it at a tokenizer.json or leave it "
      "empty to train a BPE on the training split",
    )
  if min(d.num_threads, d.prefetch, d.shuffle_rows, cfg.eval.every, cfg.eval.batches) < 0:
    raise ConfigError("data", "num_threads, prefetch, shuffle_rows, eval.every, eval.batches: >= 0")
  if cfg.eval.every and d.source == "synthetic" and cfg.eval.batches == 0:
    raise ConfigError("eval.batches", "must be > 0 for synthetic data (its stream never ends)")
  if cfg.eval.every and d.source in ("array_record", "text") and not d.eval_files:
    raise ConfigError("data.eval_files", "is empty but eval.every > 0 needs a validation split")


def check_mesh(cfg: Any, mesh_shape: dict[str, int]) -> None:
  """Checks that the batch and the models split evenly over the mesh."""
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
