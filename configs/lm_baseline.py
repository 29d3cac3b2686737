"""The quickstart's CE baseline: the KD student's model trained on cross-entropy alone.

  jaxdistill train --config configs/lm_baseline.py --workdir workdirs/lm_baseline

Same student (d128 / 2 layers / 4 heads / d_ff 512), data, steps (150) and schedule as
configs/lm_distill.py, no teacher: the yardstick distillation has to beat. For "the same
wall time as KD", raise --config.optim.steps (the quickstart measures the ratio).

Hardware: 2 idle CPU cores with jemalloc preloaded: about 35 s (9.8k tokens/s). Measured:
validation CE 5.469 (150 steps), 4.376 with 332 steps (KD's wall time).
"""

from jaxdistill import quickstart


def get_config():
  return quickstart.student_config("full", kd=False)
