"""The image-classifier config: ``VisionConfig``, the shape and dtypes of a CNN, ResNet or WRN.

Like ``config.py`` for transformers it holds no Flax module, so the model modules (``cnn``,
``resnet``), ``api`` and the callers above ``models/`` import it without importing each other.
``VISION_KEYS`` are the keys of a ``student`` / ``teacher`` config section that describe an image
classifier (``arch`` included); ``vision_config_from_section`` turns such a section and a dtype
policy into a config, raising ``ConfigError("student.<field>", ...)`` on a bad value.

Architectures (``arch``):
  cnn     stages of conv3x3 (SAME, bias) -> ReLU -> maxpool 2x2, one per ``cnn_channels``
          entry, then flatten -> fc ``cnn_fc`` -> ReLU -> fc ``num_classes`` (``cnn.SimpleCNN``)
  resnet  CIFAR ResNet-``depth`` (He et al. 2016): depth = 6n + 2, 3 stages of n basic blocks,
          16 / 32 / 64 channels (``resnet.ResNet``)
  wrn     WRN-``depth``-``widen`` (Zagoruyko & Komodakis 2016): depth = 6n + 4, 3 stages of n
          pre-activation wide blocks, 16k / 32k / 64k channels (``resnet.WideResNet``)
"""

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

from jaxdistill.errors import ConfigError
from jaxdistill.parallel.precision import Policy

ARCHS = ("cnn", "resnet", "wrn")
# The config keys that describe an image classifier (a change makes its params unusable).
VISION_KEYS = (
  "arch",
  "num_classes",
  "image_size",
  "image_channels",
  "cnn_channels",
  "cnn_fc",
  "depth",
  "widen",
)
# Channels of the three ResNet / WRN stages, before WRN's widening factor.
RESNET_WIDTHS = (16, 32, 64)


class FieldError(ValueError):
  """A bad ``VisionConfig`` field: ``field`` names it, ``message`` says what is wrong."""

  def __init__(self, field: str, message: str):
    self.field, self.message = field, message
    super().__init__(f"{field}: {message}")


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def parse_channels(value: Any) -> tuple[int, ...]:
  """``cnn_channels`` as a tuple of ints: the config's comma string "32,64" or a sequence.

  Raises:
    FieldError: not a non-empty list of positive ints.
  """
  try:
    if isinstance(value, str):
      channels = tuple(int(s) for s in value.split(","))
    else:
      channels = tuple(value)
  except (TypeError, ValueError):
    channels = ()
  if not channels or not all(_is_int(c) and c > 0 for c in channels):
    raise FieldError(
      "cnn_channels", f"must be comma-separated positive ints such as '32,64', got {value!r}"
    )
  return tuple(int(c) for c in channels)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Shape and precision policy of an image classifier (see the module docstring for ``arch``).

  ``dtype`` is the compute dtype (activations, convolutions), ``param_dtype`` the storage dtype
  of params, ``output_dtype`` the dtype of returned logits. BatchNorm statistics are float32
  whatever the policy. ``cnn_channels`` may be given as the config's comma string; it is stored
  as a tuple. Keys an architecture does not use (``cnn_*`` for resnet / wrn, ``depth`` and
  ``widen`` for cnn) are checked only for their type. Invalid values raise ``FieldError`` (a
  ValueError) naming the field.
  """

  arch: str
  num_classes: int = 10
  image_size: int = 32
  image_channels: int = 3
  cnn_channels: tuple[int, ...] = (32, 64)
  cnn_fc: int = 512
  depth: int = 20
  widen: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise FieldError("arch", f"must be one of {('transformer',) + ARCHS}, got {self.arch!r}")
    # Frozen: normalise the comma string once, here, so the config compares and hashes as data.
    object.__setattr__(self, "cnn_channels", parse_channels(self.cnn_channels))
    for name in ("num_classes", "image_size", "image_channels", "cnn_fc", "depth", "widen"):
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        raise FieldError(name, f"must be a positive int, got {value!r}")
    if self.num_classes < 2:
      raise FieldError("num_classes", f"must be >= 2 (a classifier), got {self.num_classes}")
    self._check_arch()

  def _check_arch(self):
    """The constraints of ``arch``: block counts and the spatial sizes the stages halve."""
    if self.arch == "cnn":
      pooled = 2 ** len(self.cnn_channels)
      if self.image_size % pooled:
        raise FieldError(
          "image_size",
          f"must be divisible by 2**len(cnn_channels) = {pooled} (each stage max-pools by 2), "
          f"got {self.image_size}",
        )
      return
    extra = 2 if self.arch == "resnet" else 4
    if self.depth < 6 + extra or (self.depth - extra) % 6:
      examples = "20, 32, 44, 56, 110" if self.arch == "resnet" else "10, 16, 22, 28, 40"
      raise FieldError(
        "depth", f"{self.arch} depth must be 6n+{extra} with n >= 1 ({examples}), got {self.depth}"
      )
    if self.arch == "resnet" and self.widen != 1:
      raise FieldError(
        "widen", f"must be 1 for resnet (widened models are arch=wrn), got {self.widen}"
      )
    if self.image_size % 4:
      raise FieldError(
        "image_size", f"must be divisible by 4 (stages 2 and 3 halve it), got {self.image_size}"
      )

  @property
  def blocks_per_stage(self) -> int:
    """n: residual blocks in each of the 3 stages of a resnet / wrn (0 for a cnn)."""
    if self.arch == "cnn":
      return 0
    return (self.depth - (2 if self.arch == "resnet" else 4)) // 6

  @property
  def stage_channels(self) -> tuple[int, ...]:
    """Output channels of stages 1..S."""
    if self.arch == "cnn":
      return self.cnn_channels
    return tuple(w * self.widen for w in RESNET_WIDTHS)

  @property
  def num_stages(self) -> int:
    """S: len(cnn_channels) for a cnn, 3 for resnet / wrn."""
    return len(self.stage_channels)

  @property
  def stage_shapes(self) -> tuple[tuple[int, int, int], ...]:
    """(H, W, C) of the output of each stage 1..S (the tensor the next stage reads)."""
    size, shapes = self.image_size, []
    for s, channels in enumerate(self.stage_channels):
      # A cnn halves the size in every stage (max pool); a resnet / wrn from stage 2 on (stride).
      if self.arch == "cnn" or s > 0:
        size //= 2
      shapes.append((size, size, channels))
    return tuple(shapes)

  @property
  def pre_logits_dim(self) -> int:
    """D of "pre_logits": cnn_fc for a cnn, the last stage's channels for resnet / wrn."""
    return self.cnn_fc if self.arch == "cnn" else self.stage_channels[-1]


def check_stages(stages: Any, num_stages: int) -> tuple[int, ...]:
  """Requested ``feature_stages`` as a tuple of ints in [1, num_stages].

  Raises:
    ValueError: a stage out of range or not an int.
  """
  stages = tuple(stages)
  for s in stages:
    if not _is_int(s) or not 1 <= s <= num_stages:
      raise ValueError(f"feature stage {s!r} out of range [1, {num_stages}]")
  return stages


def vision_config_from_section(section: Any, policy: Policy, key: str) -> VisionConfig:
  """VisionConfig from a ``student`` / ``teacher`` config section whose arch is not transformer.

  Args:
    section: the config section holding ``VISION_KEYS``.
    policy: the model's dtype policy (c=fp8 is for transformer projections only).
    key: the section's name ("student" / "teacher"), used in errors.
  Returns:
    The config.
  Raises:
    ConfigError: ``{key}.<field>`` for an invalid vision key, ``{key}.policy`` for c=fp8.
  """
  if policy.fp8:
    raise ConfigError(
      f"{key}.policy",
      f"c=fp8 quantises transformer projections; an arch={section['arch']!r} model has none: "
      "use e.g. 'p=f32,c=bf16,o=f32'",
    )
  try:
    return VisionConfig(
      **{k: section[k] for k in VISION_KEYS},
      dtype=policy.compute_dtype,
      param_dtype=policy.param_dtype,
      output_dtype=policy.output_dtype,
    )
  except FieldError as e:
    raise ConfigError(f"{key}.{e.field}", e.message) from None
