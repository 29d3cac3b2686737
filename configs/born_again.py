"""Born-again networks (Furlanello et al. 2018) on the built-in corpus (``jaxdistill pipeline``).

  jaxdistill pipeline --config configs/born_again.py --workdir workdirs/born_again
  jaxdistill pipeline --config configs/born_again.py:test --workdir /tmp/ban   # about a minute

Stages (each its own workdir under W, skipped when done, resumed exactly when killed):

  teacher   generation 0: the quickstart's 2-layer student model (d_model 128), trained on CE
  ban-g1    the same architecture, from scratch, distilled from ``teacher``
  ban-g2    the same architecture, from scratch, distilled from ``ban-g1``'s student

The two generations are one declared stage, ``{"action": "distil", "generations": 2}``
(``jaxdistill/compress/stages.py`` unrolls it): each generation's student takes its teacher's
shape keys and seed = the config's seed + k. Every stage is evaluated against generation 0,
and ``W/report.md`` compares them: a born-again student that beats its teacher at equal
architecture is the paper's result.
"""

import os

from jaxdistill.config import config_module
from jaxdistill.errors import ConfigError

_RECIPE = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
# Per size: steps of the CE teacher and of each generation, their peak learning rate, the
# checkpoint interval.
STEPS = {
  "full": dict(teacher=300, generation=300, lr=3e-3, ckpt_every=50),
  "test": dict(teacher=6, generation=6, lr=1e-2, ckpt_every=3),
}
GENERATIONS = 2


def _run(cfg, steps: int, lr: float, ckpt_every: int):
  cfg.optim.update(steps=steps, lr=lr, warmup_steps=max(1, steps // 10))
  cfg.ckpt.every = ckpt_every
  return cfg


def get_pipeline(arg: str = "full"):
  """The pipeline of size ``full`` or ``test`` (tiny models, a few stdlib files)."""
  if arg not in STEPS:
    raise ConfigError("--config", f"configs/born_again.py:{arg}: use full or test")
  s = STEPS[arg]
  # Generation 0: the student's architecture trained on CE (the quickstart's CE baseline).
  teacher = _run(_RECIPE.student_config(arg, kd=False), s["teacher"], s["lr"], s["ckpt_every"])
  # Born-again: the paper's output-only transfer (logit KD + a little CE, no feature terms).
  # The pipeline sets the teacher section and the student's shape keys to the teacher stage's
  # (born-again: one architecture); the static teacher shape here only keeps the file honest.
  ban = _run(_RECIPE.student_config(arg, kd=True), s["generation"], s["lr"], s["ckpt_every"])
  ban.teacher.update(**{k: teacher.student[k] for k in ("d_model", "num_layers", "num_heads")})
  ban.teacher.d_ff = teacher.student.d_ff
  ban.distill.attention.update(weight=0.0, value_weight=0.0)
  ban.distill.hidden.weight = 0.0
  return {
    "teacher": "teacher",
    "batch_sizes": (1, 8),
    "stages": [
      {"name": "teacher", "action": "train", "config": teacher},
      {"name": "ban", "action": "distil", "config": ban, "generations": GENERATIONS},
    ],
  }
