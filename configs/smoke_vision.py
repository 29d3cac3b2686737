"""Smoke test of image distillation: every vision loss on, tiny ResNets, synthetic images.

  jaxdistill train --config configs/smoke_vision.py --workdir /tmp/smoke_vision

Hardware: any; on 2 CPU cores it finishes in well under a minute (including compilation).
The teacher is random (ResNet-14 with BatchNorm, run in inference mode), the student a
ResNet-8 whose BatchNorm statistics are trained state: KL at T = 2 + CE + attention transfer
(every stage) + feature-map MSE on the last stage, on 16x16 synthetic images with crops,
flips and mixup. It checks the machinery, not distillation quality.
"""

from jaxdistill.config import default_config


def get_config():
  cfg = default_config()
  image = dict(num_classes=10, image_size=16, image_channels=3)
  cfg.student.update(arch="resnet", depth=8, **image)
  cfg.teacher.update(source="random", arch="resnet", depth=14, **image)
  d = cfg.distill
  d.temperature = 2.0
  d.logit.update(kind="kl", weight=0.5)
  d.ce.weight = 0.5
  d.attention_transfer.update(kind="paper", weight=1.0, stage_map="uniform")
  d.feature_map.update(kind="mse", weight=0.1, stage_map="last")
  cfg.optim.update(steps=30, lr=3e-3, warmup_steps=3)
  cfg.data.update(batch_size=16, crop_padding=2, flip=True, mixup=0.2)
  cfg.log.every = 1
  cfg.ckpt.every = 5  # so a killed run can be resumed (tests/integration/test_vision_step.py)
  return cfg
