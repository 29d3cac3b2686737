"""CIFAR residual networks with BatchNorm: ``ResNet`` (ResNet-20/32/44/56/110) and ``WideResNet``
(WRN-depth-k).

ResNet-depth (He et al. 2016, section 4.2): a 3x3 conv to 16 channels, then 3 stages of
n = (depth - 2) / 6 post-activation basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add, ReLU) with 16,
32, 64 channels, the first block of stages 2 and 3 striding by 2; global average pool -> fc.
Shortcuts are the paper's option A: identity, and where a block halves the size and doubles the
channels, the input subsampled by 2 and zero-padded to the new channels (no params). That keeps the
paper's parameter counts: ResNet-20 has 269,722 params (ResNet-56: 853,018).

WRN-depth-k (Zagoruyko & Komodakis 2016): a 3x3 conv to 16 channels, then 3 stages of
n = (depth - 4) / 6 pre-activation wide blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3, add) with 16k,
32k, 64k channels; a block whose width or stride changes takes its shortcut through a 1x1 conv of
the pre-activated input (as the authors' code); a final BN-ReLU, global average pool -> fc.
WRN-16-2 has 691,674 params. No dropout (the authors' CIFAR-10 default).

Convs carry no bias (BatchNorm follows); kernels start He-normal over fan-out, as the authors'
code. BatchNorm statistics live in the "batch_stats" collection; ``train=True`` normalises by the
batch and updates them (apply with ``mutable=["batch_stats"]``, see ``models.apply``),
``train=False`` uses them. A stage's output (``features``) is what the next stage reads: after
the last block's ReLU for a ResNet, the block sum before the final BN-ReLU for a WRN (the maps the
attention-transfer paper matches).

Shape letters: B batch, H / W height / width, C channels, N classes.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.cnn import (
  ACT_MAPS,
  batch_norm,
  check_images,
  conv,
  dense,
  outputs,
)
from jaxdistill.models.vision_config import RESNET_WIDTHS, VisionConfig, check_stages

_HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(cfg: VisionConfig, features: int, size: int, stride: int, name: str) -> nn.Conv:
  return conv(cfg, features, size, stride=stride, kernel_init=_HE_FAN_OUT, name=name)


def _shortcut_a(x_BxHxWxC: jax.Array, channels: int, stride: int) -> jax.Array:
  """Option A: ``x`` subsampled by ``stride`` and zero-padded to ``channels`` (half each side)."""
  x_BxHxWxC = x_BxHxWxC[:, ::stride, ::stride, :]
  extra = channels - x_BxHxWxC.shape[-1]
  return jnp.pad(x_BxHxWxC, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
  """He et al.'s CIFAR block: relu(BN(conv(relu(BN(conv(x))))) + shortcut_A(x)).

  Params: conv_1/kernel [3, 3, C_in, C], bn_1/{scale, bias} [C], conv_2/kernel [3, 3, C, C],
  bn_2; batch_stats bn_1, bn_2/{mean, var} [C].
  """

  config: VisionConfig
  channels: int
  stride: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    cfg, c = self.config, self.channels
    y_BxHxWxC = _conv(cfg, c, 3, self.stride, "conv_1")(x_BxHxWxC)
    y_BxHxWxC = nn.relu(batch_norm(cfg, train, name="bn_1")(y_BxHxWxC))
    y_BxHxWxC = _conv(cfg, c, 3, 1, "conv_2")(y_BxHxWxC)
    y_BxHxWxC = batch_norm(cfg, train, name="bn_2")(y_BxHxWxC)
    if self.stride != 1 or x_BxHxWxC.shape[-1] != c:
      x_BxHxWxC = _shortcut_a(x_BxHxWxC, c, self.stride)
    return nn.with_logical_constraint(nn.relu(y_BxHxWxC + x_BxHxWxC), ACT_MAPS)


class WideBlock(nn.Module):
  """Zagoruyko & Komodakis's pre-activation block: conv(relu(BN(conv(relu(BN(x)))))) + shortcut.

  Params: bn_1 [C_in], conv_1/kernel [3, 3, C_in, C], bn_2 [C], conv_2/kernel [3, 3, C, C], and
  shortcut/kernel [1, 1, C_in, C] when C_in != C or stride != 1; batch_stats bn_1, bn_2.
  """

  config: VisionConfig
  channels: int
  stride: int

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    cfg, c = self.config, self.channels
    act_BxHxWxC = nn.relu(batch_norm(cfg, train, name="bn_1")(x_BxHxWxC))
    y_BxHxWxC = _conv(cfg, c, 3, self.stride, "conv_1")(act_BxHxWxC)
    y_BxHxWxC = nn.relu(batch_norm(cfg, train, name="bn_2")(y_BxHxWxC))
    y_BxHxWxC = _conv(cfg, c, 3, 1, "conv_2")(y_BxHxWxC)
    if self.stride != 1 or x_BxHxWxC.shape[-1] != c:
      # The projection reads the pre-activated input, as the authors' code does.
      x_BxHxWxC = _conv(cfg, c, 1, self.stride, "shortcut")(act_BxHxWxC)
    return nn.with_logical_constraint(y_BxHxWxC + x_BxHxWxC, ACT_MAPS)


class _Residual(nn.Module):
  """The shared trunk of ``ResNet`` / ``WideResNet``: stem, 3 stages, pool, fc."""

  config: VisionConfig

  @nn.compact
  def __call__(
    self,
    images_BxHxWxC: jax.Array,
    *,
    train: bool = False,
    feature_stages: Sequence[int] = (),
    return_pre_logits: bool = False,
  ) -> dict:
    """Runs the model.

    Args:
      images_BxHxWxC: normalised images, [B, image_size, image_size, image_channels].
      train: BatchNorm by batch statistics, updating "batch_stats" (apply with
        ``mutable=["batch_stats"]``); False: by the stored running averages.
      feature_stages: stages in [1, 3] whose output maps to return.
      return_pre_logits: also return the pooled features the fc reads.
    Returns:
      {"logits": [B, N] output dtype}, plus "features" {s: [B, H_s, W_s, C_s] compute dtype}
      (``config.stage_shapes``) and "pre_logits" [B, C_3] when requested.
    """
    cfg = self.config
    stages = check_stages(feature_stages, cfg.num_stages)
    check_images(cfg, images_BxHxWxC)
    wide = cfg.arch == "wrn"
    block = WideBlock if wide else BasicBlock
    x_BxHxWxC = _conv(cfg, RESNET_WIDTHS[0], 3, 1, "stem")(images_BxHxWxC.astype(cfg.dtype))
    if not wide:  # a pre-activation WRN normalises at the start of each block instead
      x_BxHxWxC = nn.relu(batch_norm(cfg, train, name="stem_bn")(x_BxHxWxC))
    x_BxHxWxC = nn.with_logical_constraint(x_BxHxWxC, ACT_MAPS)
    features = {}
    for s, channels in enumerate(cfg.stage_channels, 1):
      for i in range(cfg.blocks_per_stage):
        stride = 2 if s > 1 and i == 0 else 1
        x_BxHxWxC = block(cfg, channels, stride, name=f"stage_{s}_block_{i}")(x_BxHxWxC, train)
      if s in stages:  # unrequested maps stay dead code that XLA drops under jit
        features[s] = x_BxHxWxC
    if wide:
      x_BxHxWxC = nn.relu(batch_norm(cfg, train, name="final_bn")(x_BxHxWxC))
    pooled_BxC = jnp.mean(x_BxHxWxC, axis=(1, 2))
    logits_BxN = dense(cfg, cfg.num_classes, ("fc_in", "classes"), name="head")(pooled_BxC)
    return outputs(cfg, logits_BxN, features, pooled_BxC if return_pre_logits else None)


class ResNet(_Residual):
  """CIFAR ResNet-depth (arch="resnet"); see the module docstring.

  Params: stem/kernel [3, 3, C_img, 16], stem_bn; stage_{s}_block_{i} (``BasicBlock``) for
  s in 1..3, i < n; head/kernel [64, N], head/bias [N]. batch_stats: every BatchNorm's mean, var.
  """


class WideResNet(_Residual):
  """WRN-depth-widen (arch="wrn"); see the module docstring.

  Params: stem/kernel [3, 3, C_img, 16]; stage_{s}_block_{i} (``WideBlock``); final_bn
  [64 * widen]; head/kernel [64 * widen, N], head/bias [N]. batch_stats: every BatchNorm's.
  """


def multiply_adds(cfg: VisionConfig) -> int:
  """Forward multiply-adds per example of a ``ResNet`` / ``WideResNet``: every conv (at its
  output size; WRN's 1x1 shortcuts included, option A shortcuts cost none) and the fc."""
  size = cfg.image_size
  total = size * size * 9 * cfg.image_channels * RESNET_WIDTHS[0]
  channels_in = RESNET_WIDTHS[0]
  for s, channels in enumerate(cfg.stage_channels, 1):
    for i in range(cfg.blocks_per_stage):
      stride = 2 if s > 1 and i == 0 else 1
      size //= stride
      total += size * size * 9 * (channels_in * channels + channels * channels)
      if cfg.arch == "wrn" and (stride != 1 or channels_in != channels):
        total += size * size * channels_in * channels
      channels_in = channels
  return total + channels_in * cfg.num_classes
