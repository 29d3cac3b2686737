"""The classic CIFAR-10 CNN (``SimpleCNN``) and the conv / dense / BatchNorm layers it shares with
``resnet``.

``SimpleCNN(config)`` with ``cnn_channels=(32, 64)``, ``cnn_fc=512`` at 32x32x3 is the classic
example teacher: conv3x3(3->32) ReLU maxpool2 -> conv3x3(32->64) ReLU maxpool2 -> flatten
(8*8*64 = 4096) -> fc 512 ReLU -> fc 10, 2,122,186 params; (16, 32) and fc 256 is its student
(2048 -> 256 -> 10, 532,202 params). 28x28x1 digits give 7x7 maps after two stages.

Every param carries logical axis names (``conv_in`` / ``conv_out`` for conv kernels and per-channel
params, ``fc_in`` / ``fc_out`` for the hidden fc, ``classes`` for the class axis) and activations
carry logical constraints (``ACT_MAPS``, ``ACT_FEATURES``, ``ACT_LOGITS``); ``sharding``'s rules
table maps them (batch over data x fsdp, channels over tensor, the class axis replicated). With
tensor parallelism the channel counts and ``cnn_fc`` must be divisible by the tensor axis size.

Shape letters: B batch, H / W height / width, C channels, D pre-logit features, N classes.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax

from jaxdistill.models.vision_config import VisionConfig, check_stages

# Logical activation axis names; the sharding module maps them onto the mesh.
ACT_MAPS = ("act_batch", "act_height", "act_width", "act_channels")
ACT_FEATURES = ("act_batch", "act_features")
ACT_LOGITS = ("act_batch", "act_classes")
# BatchNorm as in the reference CIFAR ResNets: PyTorch's momentum 0.1 is Flax's 0.9.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(
  cfg: VisionConfig,
  features: int,
  size: int,
  *,
  stride: int = 1,
  use_bias: bool = False,
  kernel_init: Any = nn.initializers.lecun_normal(),
  name: str,
) -> nn.Conv:
  """A size x size convolution with logical names on its kernel [size, size, C_in, C_out].

  Padding is (size - 1) // 2 on every side (PyTorch's), not "SAME": at stride 2 an even input
  then samples rows 0, 2, 4... like the strided shortcuts of ``resnet``; at stride 1 it equals
  "SAME".
  """
  pad = (size - 1) // 2
  return nn.Conv(
    features,
    (size, size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, "conv_in", "conv_out")),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
    name=name,
  )


def dense(cfg: VisionConfig, features: int, names: Sequence[str | None], *, name: str) -> nn.Dense:
  """A fully connected layer (kernel [D_in, D_out] named ``names``, bias [D_out])."""
  return nn.Dense(
    features,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), tuple(names)),
    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
    name=name,
  )


def batch_norm(cfg: VisionConfig, train: bool, *, name: str) -> nn.BatchNorm:
  """BatchNorm over B, H, W: batch statistics when ``train`` (and the running averages in
  "batch_stats" updated), the running averages otherwise.

  Under jit on a mesh the batch mean and variance are those of the GLOBAL batch (the reduction
  spans every shard), so a sharded forward equals the single-device one. Statistics are float32.
  """
  per_channel = lambda init: nn.with_logical_partitioning(init, ("conv_out",))  # noqa: E731
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    scale_init=per_channel(nn.initializers.ones_init()),
    bias_init=per_channel(nn.initializers.zeros_init()),
    name=name,
  )


def check_images(cfg: VisionConfig, images_BxHxWxC: jax.Array) -> None:
  """Raises ValueError unless the images are [B, image_size, image_size, image_channels]."""
  want = (cfg.image_size, cfg.image_size, cfg.image_channels)
  if images_BxHxWxC.ndim != 4 or tuple(images_BxHxWxC.shape[1:]) != want:
    raise ValueError(f"images must be [B, {', '.join(map(str, want))}], got {images_BxHxWxC.shape}")


def outputs(
  cfg: VisionConfig, logits_BxN: jax.Array, features: dict, pre_logits_BxD: jax.Array | None
) -> dict:
  """The output dict: "logits" in the output dtype, plus only the requested extras."""
  logits_BxN = nn.with_logical_constraint(logits_BxN.astype(cfg.output_dtype), ACT_LOGITS)
  out = {"logits": logits_BxN}
  if features:
    out["features"] = features
  if pre_logits_BxD is not None:
    out["pre_logits"] = pre_logits_BxD
  return out


class SimpleCNN(nn.Module):
  """Stages of conv3x3 (bias) -> ReLU -> maxpool 2x2, then fc ``cnn_fc`` -> ReLU -> fc classes.

  Params (under "params"): conv_{s}/kernel [3, 3, C_{s-1}, C_s] and conv_{s}/bias [C_s] for
  stages s = 1..S (C_0 = image_channels); fc/kernel [H_S * W_S * C_S, cnn_fc], fc/bias;
  head/kernel [cnn_fc, N], head/bias [N]. No "batch_stats".
  """

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
      train: unused (the model has no BatchNorm or dropout); accepted like the ResNets'.
      feature_stages: stages in [1, S] whose output maps to return.
      return_pre_logits: also return the fc ``cnn_fc`` activations (after ReLU).
    Returns:
      {"logits": [B, N] output dtype}, plus "features" {s: [B, H_s, W_s, C_s] compute dtype}
      (H_s = image_size / 2**s) and "pre_logits" [B, cnn_fc] when requested.
    """
    del train
    cfg = self.config
    stages = check_stages(feature_stages, cfg.num_stages)
    check_images(cfg, images_BxHxWxC)
    x_BxHxWxC = images_BxHxWxC.astype(cfg.dtype)
    features = {}
    for s, channels in enumerate(cfg.cnn_channels, 1):
      x_BxHxWxC = nn.relu(conv(cfg, channels, 3, use_bias=True, name=f"conv_{s}")(x_BxHxWxC))
      x_BxHxWxC = nn.max_pool(x_BxHxWxC, (2, 2), strides=(2, 2))
      x_BxHxWxC = nn.with_logical_constraint(x_BxHxWxC, ACT_MAPS)
      if s in stages:  # unrequested maps stay dead code that XLA drops under jit
        features[s] = x_BxHxWxC
    flat_BxF = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
    hidden_BxD = nn.relu(dense(cfg, cfg.cnn_fc, ("fc_in", "fc_out"), name="fc")(flat_BxF))
    hidden_BxD = nn.with_logical_constraint(hidden_BxD, ACT_FEATURES)
    logits_BxN = dense(cfg, cfg.num_classes, ("fc_in", "classes"), name="head")(hidden_BxD)
    return outputs(cfg, logits_BxN, features, hidden_BxD if return_pre_logits else None)


def multiply_adds(cfg: VisionConfig) -> int:
  """Forward multiply-adds per example of a ``SimpleCNN``: convs (at their input size) and fcs."""
  size, channels_in, total = cfg.image_size, cfg.image_channels, 0
  for channels in cfg.cnn_channels:
    total += size * size * 9 * channels_in * channels
    size, channels_in = size // 2, channels
  flat = size * size * channels_in
  return total + flat * cfg.cnn_fc + cfg.cnn_fc * cfg.num_classes
