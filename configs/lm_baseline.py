"""The quickstart's CE baseline: the KD student's model trained on cross-entropy alone.

  jaxdistill train --config configs/lm_baseline.py --workdir workdirs/lm_baseline

The recipe's ``baseline`` variant (``configs/quickstart.py:baseline``, where every setting lives).

Same student (d128 / 2 layers / 4 heads / d_ff 512), data, steps (150) and schedule as
configs/lm_distill.py, no teacher: the yardstick distillation has to beat. For "the same
wall time as KD", raise --config.optim.steps (the quickstart measures the ratio).

Hardware: 2 idle CPU cores: about 40 s (12.4k tokens/s on an Intel Xeon). Measured:
validation CE 4.713 (150 steps), 4.093 with 317 steps (KD's wall time; BENCHMARKS.md).
"""

import os

from jaxdistill.config import config_module

# The recipe lives in one file, shared with `jaxdistill quickstart` (configs import no jobs).
RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config():
  return config_module(RECIPE).get_config("baseline")
