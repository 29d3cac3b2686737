"""The quickstart's KD student distilled from an ensemble of two teachers.

  jaxdistill train --config configs/ensemble.py --workdir workdirs/lm_ensemble
  jaxdistill train --config configs/ensemble.py:test --workdir /tmp/ensemble   # tiny, seconds

The recipe of configs/lm_distill.py (``configs/quickstart.py:distill``) with a second teacher
of the same shape, trained like the first from another seed (WORKDIR/teacher and
WORKDIR/teacher_1, each reused if you run again there), and the logit target the average of
their probabilities at the temperature (``distill.ensemble='probs'``, on the dense head: the
fused head never forms whole softmaxes). The feature terms (MiniLM attention, hidden cosine)
read teacher 0. docs/losses.md, "Several teachers", says what each ensemble kind optimises.

To distil from teachers trained before, point both at their runs:

  jaxdistill train --config configs/ensemble.py --workdir workdirs/lm_ensemble \\
      --config.teacher.source=workdir --config.teacher.path=workdirs/lm_teacher

and teacher 1 (``teachers[0]`` in this file) with
``--config.teachers[0].source=workdir --config.teachers[0].path=workdirs/lm_teacher_b``.

Hardware: 2 CPU cores; each teacher pretrains as in configs/lm_distill.py, and a step runs
both teachers forward (BENCHMARKS.md, "Several teachers").
"""

import os

from jaxdistill.config import config_module, teacher_fields

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")


def get_config(size: str = "full"):
  """``full`` (the quickstart's sizes) or ``test`` (tiny: seconds)."""
  recipe = config_module(RECIPE)
  cfg = recipe.get_config("distill" if size == "full" else f"distill,{size}")
  t = cfg.teacher
  same = {k: t[k] for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len")}
  same.update(source="pretrain", pretrain_steps=t.pretrain_steps, pretrain_lr=t.pretrain_lr)
  cfg.teachers = (teacher_fields(**same, weight=1.0),)
  cfg.distill.ensemble = "probs"
  cfg.distill.fused = False
  return cfg
