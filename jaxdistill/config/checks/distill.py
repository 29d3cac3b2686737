"""Config checks of the ``distill`` section: what ``objective.make_objective`` reads (loss kinds,
weights, layer maps, the fused head) and every schedule's whole range.

Part of ``validate.validate`` (the one entry point): ``make_objective`` assumes a config that
passed these and raises nothing itself.
"""

import math
from typing import Any

from jaxdistill.config.checks import vision as validate_vision
from jaxdistill.distill import adaptive, layer_maps, losses, policy_losses, schedules, sparse
from jaxdistill.errors import ConfigError

# The divergences a student trains with from an image cache's whole class logits.
IMAGE_CACHE_KINDS = ("kl", "reverse_kl", "jsd")


def _check_fused(cfg: Any) -> None:
  """distill.fused / token_chunk / vocab_chunk (the fused loss head, distill/fused.py)."""
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
    pairs = layer_maps.layer_map(spec, cfg.student.num_layers, cfg.teacher.num_layers)
  except ValueError as e:
    raise ConfigError(f"distill.{key}.layer_map", str(e)) from None
  if not allow_embeddings and any(0 in p for p in pairs):
    raise ConfigError(
      f"distill.{key}.layer_map",
      f"{spec!r} maps layer 0 (the embeddings), which has no attention; use layers 1..L",
    )


def check_distill(cfg: Any) -> None:
  """The ``distill`` section (everything ``objective.make_objective`` reads): the losses, then
  the fused head's settings."""
  _check_losses(cfg)
  _check_fused(cfg)
  _check_on_policy(cfg)
  _check_adaptive(cfg)


def _check_adaptive(cfg: Any) -> None:
  """distill.adaptive (distill/adaptive.py): a known mode, and a dense logit divergence of a
  language model's online teacher to weigh (from full logits, or the fused head's token
  chunks); teacher_correct needs the true next tokens as targets."""
  d, mode = cfg.distill, cfg.distill.adaptive
  if not isinstance(mode, str) or mode not in adaptive.MODES:
    raise ConfigError("distill.adaptive", f"unknown {mode!r}; choose from {adaptive.MODES}")
  if mode == "none":
    return
  why = None
  if cfg.teacher.source in ("none", "cache") or _off(d.logit, "weight"):
    why = "needs a logit divergence from a teacher model (distill.logit.weight > 0, "
    why += f"teacher.source not none or cache; got {cfg.teacher.source!r})"
  elif d.logit.kind not in losses.LOGIT_DIVERGENCES:
    why = f"weighs the dense divergences {sorted(losses.LOGIT_DIVERGENCES)}, not {d.logit.kind!r}"
  elif validate_vision.is_image(cfg):
    why = "weighs tokens of a language model, not an image classifier's examples"
  elif d.fused and d.vocab_chunk:
    why = "scores each token against the whole vocabulary: set distill.vocab_chunk=0"
  elif mode == "teacher_correct" and d.on_policy.lmbda:
    why = "reads the true next tokens, but on-policy targets are the student's samples"
  if why:
    raise ConfigError("distill.adaptive", f"{mode!r} {why}")


def _check_losses(cfg: Any) -> None:
  """Kinds, weights, schedules and layer maps, against the models and the teacher source."""
  d, t = cfg.distill, cfg.teacher
  if validate_vision.is_image(cfg):
    validate_vision.check_image_model(cfg)
  else:
    validate_vision.check_token_model(cfg)
  if t.source == "none":
    for key in ("logit", "attention", "hidden", "embedding") + validate_vision.IMAGE_LOSSES:
      if d[key].weight != 0:
        raise ConfigError(
          f"distill.{key}.weight",
          "is non-zero but there is no "
          "teacher (teacher.source='none'); set it to 0 or configure a teacher",
        )
    if d.attention.value_weight != 0:
      raise ConfigError(
        "distill.attention.value_weight",
        "is non-zero but there is no teacher (teacher.source='none'); set it to 0",
      )
    return
  try:
    schedules.parse_schedule(d.temperature_schedule, d.temperature, cfg.optim.steps)
  except ValueError as e:
    raise ConfigError("distill.temperature_schedule", str(e)) from None
  if d.temperature <= 0:
    raise ConfigError("distill.temperature", f"must be > 0, got {d.temperature}")
  kinds = sorted(losses.LOGIT_DIVERGENCES) + list(sparse.SPARSE_KINDS)
  kinds += list(policy_losses.POLICY_KINDS)
  if d.logit.kind not in kinds:
    raise ConfigError("distill.logit.kind", f"unknown {d.logit.kind!r}; choose from {kinds}")
  if t.source == "cache":
    _check_cache_distill(cfg)
  else:
    _check_online_distill(cfg)


def _check_cache_distill(cfg: Any) -> None:
  """teacher.source='cache': a logit loss (+ CE) from stored targets, no teacher model. A
  language model's cache holds sparse targets (a sparse kind); an image model's holds whole
  class logits (a dense kind: kl, reverse_kl, jsd)."""
  d = cfg.distill
  for key in ("attention", "hidden", "embedding"):
    if key in d and (d[key].weight != 0 or (key == "attention" and d.attention.value_weight)):
      raise ConfigError(
        f"distill.{key}.weight",
        "is non-zero, but a cache (teacher.source='cache') stores only logit targets: "
        "there are no teacher attentions, hidden states or embeddings; set it to 0",
      )
  _check_weight(d.logit, "distill.logit", cfg.optim.steps)
  image = validate_vision.is_image(cfg)
  kinds = IMAGE_CACHE_KINDS if image else sparse.SPARSE_KINDS
  if d.logit.kind not in kinds or _off(d.logit, "weight"):
    what = "an image model's cache of class logits needs" if image else "a cache needs a sparse"
    raise ConfigError(
      "distill.logit.kind",
      f"{what} kind {kinds} with a non-zero weight, not {d.logit.kind!r} (weight {d.logit.weight})",
    )
  if image and not 0.0 <= d.logit.beta <= 1.0:
    raise ConfigError("distill.logit.beta", f"must be in [0, 1], got {d.logit.beta}")
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
  if validate_vision.is_image(cfg):  # the classes match (checked there): no vocabulary
    pass
  elif not _off(d.logit, "weight") and s.vocab_size != t.vocab_size:
    raise ConfigError(
      "teacher.vocab_size",
      f"{t.vocab_size} differs from "
      f"student.vocab_size={s.vocab_size}; logit losses need one vocabulary",
    )
  _check_weight(d.ce, "distill.ce", steps)
  _check_weight(d.embedding, "distill.embedding", steps)


def _check_on_policy(cfg: Any) -> None:
  """distill.on_policy (train/on_policy.py): its numbers, and that the student can write and
  an online teacher of the same vocabulary can score what it writes."""
  op, d = cfg.distill.on_policy, cfg.distill
  lmbda = op.lmbda
  if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0 <= lmbda <= 1:
    raise ConfigError("distill.on_policy.lmbda", f"must be in [0, 1], got {lmbda!r}")
  for key, low in (("max_new_tokens", 1), ("top_k", 0), ("prompt_tokens", 0), ("time_split", 0)):
    v = op[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ConfigError(f"distill.on_policy.{key}", f"must be an int >= {low}, got {v!r}")
  if not op.temperature >= 0:
    raise ConfigError("distill.on_policy.temperature", f"must be >= 0, got {op.temperature!r}")
  if op.baseline not in policy_losses.BASELINES:
    raise ConfigError(
      "distill.on_policy.baseline",
      f"unknown {op.baseline!r}; choose from {policy_losses.BASELINES}",
    )
  clip = op.signal_clip
  if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
    raise ConfigError("distill.on_policy.signal_clip", f"must be a number >= 0, got {clip!r}")
  policy_kind = d.logit.kind in policy_losses.POLICY_KINDS and not _off(d.logit, "weight")
  if policy_kind and lmbda != 1:
    raise ConfigError(
      "distill.logit.kind",
      f"{d.logit.kind!r} learns from the student's own samples only: set "
      f"distill.on_policy.lmbda=1 (got {lmbda})",
    )
  if lmbda == 0:
    return
  s, t = cfg.student, cfg.teacher
  if validate_vision.is_image(cfg) or s.arch != "transformer" or s.encoder:
    raise ConfigError(
      "distill.on_policy.lmbda",
      f"on-policy needs a decoder student that can sample, not arch={s.arch!r}"
      f"{' (an encoder)' if s.encoder else ''}",
    )
  if t.source in ("none", "cache"):
    raise ConfigError(
      "distill.on_policy.lmbda",
      f"on-policy needs a teacher model to score the samples, not teacher.source={t.source!r}",
    )
  if t.arch != "transformer" or t.encoder:
    raise ConfigError(
      "distill.on_policy.lmbda",
      "on-policy needs a decoder teacher (an encoder or image teacher cannot score a sample)",
    )
  if s.vocab_size != t.vocab_size:
    raise ConfigError(
      "teacher.vocab_size",
      f"{t.vocab_size} differs from student.vocab_size={s.vocab_size}: the teacher scores the "
      "student's tokens, so on-policy needs one vocabulary",
    )
  if op.prompt_tokens >= cfg.data.seq_len:
    raise ConfigError(
      "distill.on_policy.prompt_tokens",
      f"{op.prompt_tokens} leaves no room to sample in data.seq_len={cfg.data.seq_len}",
    )
  if cfg.teachers:
    raise ConfigError("distill.on_policy.lmbda", "on-policy takes one teacher (teachers is set)")


def _check_schedule_range(cfg: Any, base_key: str, spec_key: str, positive: bool) -> None:
  """One schedule over steps 0..optim.steps: > 0 (``positive``) or >= 0, and finite."""
  spec, base = _get(cfg, spec_key), _get(cfg, base_key)
  try:
    lo, hi, at_lo, at_hi = schedules.value_range(spec, base, cfg.optim.steps)
  except ValueError as e:
    raise ConfigError(spec_key, str(e)) from None
  bound = "> 0" if positive else ">= 0"
  key = base_key if spec.strip() == "constant" else spec_key
  if not (lo > 0 if positive else lo >= 0):
    if key == base_key:
      raise ConfigError(key, f"must be {bound}, got {base}")
    raise ConfigError(
      key,
      f"{spec!r} from {base_key}={base} reaches {lo:g} at step {at_lo}; it must stay {bound} "
      f"over all optim.steps={cfg.optim.steps} steps",
    )
  if not math.isfinite(hi):
    raise ConfigError(
      key, f"{spec!r} from {base_key}={base} overflows to {hi} at step {at_hi}; it must stay finite"
    )


def check_schedule_ranges(cfg: Any) -> None:
  """The temperature stays > 0 and every loss weight >= 0 at every step of the run."""
  d = cfg.distill
  _check_schedule_range(cfg, "distill.temperature", "distill.temperature_schedule", True)
  for name in ("logit", "ce", "attention", "hidden", "embedding") + validate_vision.IMAGE_LOSSES:
    if d[name].weight != 0 or d[name].schedule.strip() != "constant":
      base, spec = f"distill.{name}.weight", f"distill.{name}.schedule"
      _check_schedule_range(cfg, base, spec, False)
  if d.attention.value_weight != 0:  # the value relation shares attention's schedule
    value = "distill.attention.value_weight"
    _check_schedule_range(cfg, value, "distill.attention.schedule", False)


def _get(cfg: Any, key: str) -> Any:
  """``cfg["a.b.c"]`` for a dotted key."""
  for part in key.split("."):
    cfg = cfg[part]
  return cfg
