"""The quickstart's CE baseline: the KD student's model trained on cross-entropy alone.

  jaxdistill train --config configs/lm_baseline.py --workdir workdirs/lm_baseline

Same student (d128 / 2 layers / 4 heads / d_ff 512), data, steps (220) and schedule as
configs/lm_distill.py, no teacher: the yardstick distillation has to beat. For "the same
wall time as KD", raise --config.optim.steps (the quickstart measures the ratio).

Hardware: 2 idle CPU cores with jemalloc preloaded: a couple of minutes. Measured: validation
CE 4.577 (220 steps), 3.860 with 432 steps (KD's wall time).
"""

from jaxdistill import quickstart


def get_config():
  return quickstart.student_config("full", kd=False)
