"""Qwen2.5-7B -> Qwen2.5-0.5B: logit KD at 4k tokens per row (shapes only: `jaxdistill compile`).

  jaxdistill compile --config configs/qwen7b_to_05b.py --topology v5p-128
  jaxdistill compile --config configs/qwen7b_to_05b.py --topology v5e-64 --plan

64 rows of 4096 tokens per step (one row per chip of a 64-chip slice; set
--config.data.batch_size to the slice's chip count elsewhere). The teacher is random (its
shapes are all a compile needs); see configs/_pod_shapes.py for the settings and for how to
train it for real.
"""

import os

from jaxdistill.config import config_module

SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pod_shapes.py")


def get_config():
  shapes = config_module(SHAPES)
  return shapes.pod_config("qwen2.5-7b", "qwen2.5-0.5b", seq_len=4096, batch_size=64)
