"""Config checks of image classifiers: the models, their pairing, their losses and data.

Part of ``validate.validate`` (the one entry point), run when ``student.arch`` is an image
model. What an image model cannot do is refused here with the key to change: transformer-only
losses (MiniLM attention, hidden states, embeddings), sparse logit kinds (class logits are
small: dense), teacher sources that only exist for language models, layer surgery, and
augmentation with a cache of teacher logits (stored for the un-augmented images).
"""

from typing import Any

from jaxdistill import models
from jaxdistill.distill import layer_maps
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import precision

TOKEN_LOSSES = ("attention", "hidden", "embedding")  # read a transformer's layers / embedding
IMAGE_LOSSES = ("attention_transfer", "feature_map")  # read an image model's stage maps
AT_KINDS = ("paper", "squared")
FEATURE_KINDS = ("mse", "cosine")


def is_image(cfg: Any) -> bool:
  """The run trains an image classifier (``student.arch`` is not a transformer)."""
  return cfg.student.arch != "transformer"


def _vision_config(section: Any, key: str):
  policy = precision.parse_policy(section.policy, f"{key}.policy")
  return models.vision_config_from_section(section, policy, key)


def check_token_model(cfg: Any) -> None:
  """A transformer student: the image-only losses are off and the teacher is no image model."""
  for key in IMAGE_LOSSES:
    if cfg.distill[key].weight != 0:
      raise ConfigError(
        f"distill.{key}.weight",
        f"reads stage feature maps of an image model, but student.arch="
        f"{cfg.student.arch!r}; set it to 0",
      )
  if cfg.teacher.source not in ("none", "cache") and cfg.teacher.arch != "transformer":
    raise ConfigError(
      "teacher.arch", f"{cfg.teacher.arch!r} cannot teach a transformer student; use the same arch"
    )


def check_image_model(cfg: Any) -> None:
  """An image student (and teacher): arch pairing, losses, stage maps, unsupported features."""
  s, t, d = cfg.student, cfg.teacher, cfg.distill
  student = _vision_config(s, "student")
  for key in ("init_layers",):
    if s[key]:
      raise ConfigError(f"student.{key}", "selects transformer layers; unset it for image models")
  if t.source == "hf":
    raise ConfigError(
      "teacher.source",
      "'hf' loads language models; image teachers come from 'pretrain', 'workdir' or 'random'",
    )
  for key in TOKEN_LOSSES:
    if d[key].weight != 0 or (key == "attention" and d.attention.value_weight != 0):
      raise ConfigError(
        f"distill.{key}.weight",
        "reads a transformer's layers, but the student is an image model "
        f"(student.arch={s.arch!r}); use distill.attention_transfer / distill.feature_map",
      )
  if t.source in ("none", "cache"):
    for key in IMAGE_LOSSES:
      if d[key].weight != 0:
        raise ConfigError(
          f"distill.{key}.weight",
          f"is non-zero but teacher.source={t.source!r} has no teacher feature maps; set it to 0",
        )
    if t.source == "cache":
      _check_no_augmentation(cfg)
    return
  if t.arch == "transformer":
    raise ConfigError(
      "teacher.arch",
      "is 'transformer' but the student is an image model; set teacher.arch to cnn, resnet or wrn",
    )
  teacher = _vision_config(t, "teacher")
  for key in ("num_classes", "image_size", "image_channels"):
    if s[key] != t[key]:
      raise ConfigError(f"teacher.{key}", f"{t[key]} differs from student.{key}={s[key]}")
  _check_image_losses(cfg, student, teacher)


def _check_no_augmentation(cfg: Any) -> None:
  """A cache stores the teacher's logits of the un-augmented images: an augmented view (or a
  mix of two images) would be trained towards logits of another image."""
  data = cfg.data
  for key, off in (("crop_padding", 0), ("flip", False), ("mixup", 0), ("cutmix", 0)):
    if data[key] != off:
      raise ConfigError(
        f"data.{key}",
        f"is {data[key]!r}, but a cache (teacher.source='cache') holds the teacher's logits of "
        f"the un-augmented images; set it to {off!r} or use an online teacher",
      )


def _check_image_losses(cfg: Any, student: Any, teacher: Any) -> None:
  d = cfg.distill
  if d.logit.weight != 0 and d.logit.kind not in ("kl", "reverse_kl", "jsd"):
    raise ConfigError(
      "distill.logit.kind",
      f"{d.logit.kind!r} is a sparse kind for large vocabularies; a classifier's logits are "
      "small: use kl, reverse_kl or jsd",
    )
  checks = (("attention_transfer", "kind", AT_KINDS), ("feature_map", "kind", FEATURE_KINDS))
  for section, key, allowed in checks:
    if d[section][key] not in allowed:
      raise ConfigError(
        f"distill.{section}.{key}", f"unknown {d[section][key]!r}; choose from {allowed}"
      )
  if not d.attention_transfer.p > 0:
    raise ConfigError("distill.attention_transfer.p", f"must be > 0, got {d.attention_transfer.p}")
  for section in IMAGE_LOSSES:
    if d[section].weight == 0 and d[section].schedule == "constant":
      continue
    if d[section].weight < 0:
      raise ConfigError(f"distill.{section}.weight", f"must be >= 0, got {d[section].weight}")
    spec = d[section].stage_map
    try:
      pairs = layer_maps.layer_map(spec, student.num_stages, teacher.num_stages)
    except ValueError as e:
      raise ConfigError(f"distill.{section}.stage_map", str(e)) from None
    if any(0 in p for p in pairs):
      raise ConfigError(f"distill.{section}.stage_map", f"{spec!r}: stages are 1..S, not 0")
    if section == "feature_map" and not d.feature_map.project:
      for i, j in pairs:
        cs, ct = student.stage_shapes[i - 1][-1], teacher.stage_shapes[j - 1][-1]
        if cs != ct:
          raise ConfigError(
            "distill.feature_map.project",
            f"student stage {i} has {cs} channels, teacher stage {j} {ct}: the loss needs a "
            "learned 1x1 projection; set it to True",
          )
