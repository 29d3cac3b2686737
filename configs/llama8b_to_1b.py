"""Llama-3.1-8B -> Llama-3.2-1B: logit KD at 8k tokens per row (shapes only: `jaxdistill compile`).

  jaxdistill compile --config configs/llama8b_to_1b.py --topology v5p-128
  jaxdistill compile --config configs/llama8b_to_1b.py --topology v5e-64 --plan

64 rows of 8192 tokens per step (one row per chip of a 64-chip slice; set
--config.data.batch_size to the slice's chip count elsewhere). The teacher is random (its
shapes are all a compile needs); see configs/_pod_shapes.py for the settings and for how to
train it for real.
"""

import os

from jaxdistill.config import config_module

SHAPES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pod_shapes.py")


def get_config():
  shapes = config_module(SHAPES)
  return shapes.pod_config("llama3.1-8b", "llama3.2-1b", seq_len=8192, batch_size=64)
