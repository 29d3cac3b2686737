"""ResNet-56 -> ResNet-20 on CIFAR-10 with attention transfer (Zagoruyko & Komodakis 2017).

  jaxdistill train --config configs/resnet_cifar10.py:teacher --workdir workdirs/r56
  jaxdistill train --config configs/resnet_cifar10.py:distill --workdir workdirs/r20_at \
      --config.teacher.path=workdirs/r56
  jaxdistill train --config configs/resnet_cifar10.py:baseline --workdir workdirs/r20_ce

``teacher`` trains ResNet-56 from scratch; ``distill`` trains ResNet-20 with KD (T = 4, weight
0.9) + CE (0.1) + attention transfer between the three stages' outputs: the authors' public
code's form (``kind="squared"``: the mean squared difference of the normalised maps) with
their beta/2 = 500 per stage pair; our term is the MEAN over the 3 pairs, so its weight is
3 x 500 = 1500; ``baseline`` is ResNet-20 on CE alone. SGD-like schedule with
AdamW here: lr 2e-3 cosine over 200 epochs of batch 128, weight decay 5e-4; crops (pad 4) and
flips. Use ``--config.teacher.arch=wrn --config.teacher.depth=40 --config.teacher.widen=2``
for a WRN-40-2 teacher. Needs TFDS ``cifar10`` prepared (``tfds build cifar10``).
"""

import os

from jaxdistill.config import config_module, default_config
from jaxdistill.errors import ConfigError

# The CIFAR-10 data settings and the CE-only variant are the classic example's.
CIFAR = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cnn_cifar10.py"))

EPOCHS, TRAIN_IMAGES, BATCH = 200, 50_000, 128
VARIANTS = ("teacher", "distill", "baseline")


def _model(section, depth: int) -> None:
  section.update(arch="resnet", depth=depth, num_classes=10, image_size=32, image_channels=3)


def get_config(arg: str = "teacher"):
  """``teacher`` (ResNet-56 on CE), ``distill`` (ResNet-20 from teacher.path with KD and
  attention transfer) or ``baseline`` (ResNet-20 on CE alone)."""
  if arg not in VARIANTS:
    raise ConfigError("--config", f"configs/resnet_cifar10.py:{arg}: use one of {VARIANTS}")
  cfg = default_config()
  CIFAR.cifar10_data(cfg, BATCH)
  steps = EPOCHS * TRAIN_IMAGES // BATCH
  cfg.optim.update(
    steps=steps, lr=2e-3, warmup_steps=steps // 100, weight_decay=5e-4, clip_norm=0.0
  )
  cfg.eval.update(every=steps // 20, batches=0)
  cfg.ckpt.every = steps // 20
  cfg.log.every = 100
  _model(cfg.student, 56 if arg == "teacher" else 20)
  _model(cfg.teacher, 56)
  if arg != "distill":
    CIFAR.ce_only(cfg)
    return cfg
  cfg.teacher.source = "workdir"  # --config.teacher.path=<the teacher run's workdir>
  cfg.distill.temperature = 4.0
  cfg.distill.logit.update(kind="kl", weight=0.9)
  cfg.distill.ce.weight = 0.1
  cfg.distill.attention_transfer.update(kind="squared", weight=1500.0, stage_map="uniform")
  return cfg
