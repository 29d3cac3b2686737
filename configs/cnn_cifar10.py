"""The classic CIFAR-10 distillation example: a 2-conv CNN teacher (32 / 64 channels, fc 512,
2,122,186 params) into the same CNN at half width (16 / 32 channels, fc 256).

  jaxdistill train --config configs/cnn_cifar10.py:teacher --workdir workdirs/cifar_teacher
  jaxdistill train --config configs/cnn_cifar10.py:distill --workdir workdirs/cifar_kd \
      --config.teacher.path=workdirs/cifar_teacher
  jaxdistill train --config configs/cnn_cifar10.py:baseline --workdir workdirs/cifar_ce

Adam at 1e-3 (constant, no weight decay, no clipping), batch 32, 10 epochs of the 50,000
training images; soft targets at temperature 2 weighted 0.25 against 0.75 CE (the KL term is
scaled by T^2, as Hinton et al.). Needs TFDS ``cifar10`` prepared on the machine
(``tfds build cifar10``; nothing is downloaded at run time); ``data.tfds_data_dir`` points at
it if it is not in TFDS's default directory. Random crops (pad 4) and flips.
"""

from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError

EPOCHS, TRAIN_IMAGES, BATCH = 10, 50_000, 32
VARIANTS = ("teacher", "distill", "baseline")


def _model(section, channels: str, fc: int) -> None:
  section.update(
    arch="cnn", num_classes=10, image_size=32, image_channels=3, cnn_channels=channels, cnn_fc=fc
  )


def cifar10_data(cfg, batch: int) -> None:
  """TFDS cifar10 (train / test), its channel means and deviations, crops (pad 4) and flips;
  shared with configs/resnet_cifar10.py."""
  cfg.data.update(
    source="tfds",
    tfds_name="cifar10",
    train_split="train",
    eval_split="test",
    batch_size=batch,
    image_mean="0.4914,0.4822,0.4465",
    image_std="0.2470,0.2435,0.2616",
    crop_padding=4,
    flip=True,
  )


def ce_only(cfg) -> None:
  """No teacher: the student on CE alone (how teachers and baselines are trained)."""
  cfg.teacher.source = "none"
  cfg.distill.ce.weight = 1.0
  cfg.distill.logit.weight = 0.0


def get_config(arg: str = "teacher"):
  """``teacher`` (CE from scratch), ``distill`` (KD from teacher.path, a teacher run's
  workdir) or ``baseline`` (the student on CE alone)."""
  if arg not in VARIANTS:
    raise ConfigError("--config", f"configs/cnn_cifar10.py:{arg}: use one of {VARIANTS}")
  cfg = default_config()
  cifar10_data(cfg, BATCH)
  steps = EPOCHS * TRAIN_IMAGES // BATCH
  cfg.optim.update(
    steps=steps,
    lr=1e-3,
    lr_schedule="constant",
    warmup_steps=0,
    b2=0.999,
    weight_decay=0.0,
    clip_norm=0.0,
  )
  cfg.eval.update(every=steps // EPOCHS, batches=0)
  cfg.log.every = 100
  _model(cfg.student, "32,64" if arg == "teacher" else "16,32", 512 if arg == "teacher" else 256)
  _model(cfg.teacher, "32,64", 512)
  if arg != "distill":
    ce_only(cfg)
    return cfg
  cfg.teacher.source = "workdir"  # --config.teacher.path=<the teacher run's workdir>
  cfg.distill.temperature = 2.0
  cfg.distill.logit.update(kind="kl", weight=0.25)
  cfg.distill.ce.weight = 0.75
  return cfg
