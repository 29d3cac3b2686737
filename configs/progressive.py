"""A progressive compression pipeline on the built-in corpus (``jaxdistill pipeline``).

  jaxdistill pipeline --config configs/progressive.py --workdir workdirs/progressive
  jaxdistill pipeline --config configs/progressive.py:test --workdir /tmp/p   # seconds

Stages (each its own workdir under W, skipped when done, resumed exactly when killed):

  teacher   the quickstart's 4-layer teacher LM, trained on CE (configs/quickstart.py)
  blocks    a 2-layer student of the teacher's width, started from teacher blocks 0 and 3
            (``student.init_layers=uniform``), distilled
  prune     50% of every MLP's neurons and 1 of 4 heads per layer removed (activation
            magnitude on 8 calibration batches): a genuinely smaller model
  recover   the pruned model distilled again from the teacher
  qat       int8 quantisation-aware distillation of it (``c=int8``), teacher still guiding
  ptq       post-training int8 of ``recover``: the baseline QAT must beat
  export    the QAT student's int8 weights + scales, config and tokenizer

Every stage is evaluated against the teacher, and ``W/report.md`` puts them on the
accuracy-latency curve. Measured results: BENCHMARKS.md, "Progressive pipeline".
"""

import os

from jaxdistill.config import config_module
from jaxdistill.errors import ConfigError

_RECIPE = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
# Per size: steps of each distil stage, their peak learning rate, checkpoint interval.
STEPS = {
  "full": dict(blocks=150, recover=150, qat=100, lr=1e-3, ckpt_every=25, calibration=8),
  # test: seconds a stage; recover long enough (with a checkpoint every 2 steps) that a test
  # can kill it mid-stage: killed at its first checkpoint, 4 more saves are still to come.
  "test": dict(blocks=4, recover=10, qat=4, lr=1e-2, ckpt_every=2, calibration=2),
}


def _distil(size: str, steps: int, lr: float, ckpt_every: int):
  """The quickstart's KD student recipe with this stage's steps and learning rate."""
  cfg = _RECIPE.student_config(size, kd=True)
  cfg.optim.update(steps=steps, lr=lr, warmup_steps=max(1, steps // 10))
  cfg.ckpt.every = ckpt_every
  if size == "test":
    cfg.log.every = 1  # every step's losses, for the resume test's bitwise comparison
  return cfg


def get_pipeline(arg: str = "full"):
  """The pipeline of size ``full`` (about 30 minutes on 2 idle AMD EPYC cores) or ``test``."""
  if arg not in STEPS:
    raise ConfigError("--config", f"configs/progressive.py:{arg}: use full or test")
  s = STEPS[arg]
  teacher = _RECIPE.teacher_config(arg)
  teacher.ckpt.every = 4 * s["ckpt_every"]
  blocks = _distil(arg, s["blocks"], 3 * s["lr"], s["ckpt_every"])
  # The teacher's width and heads; half its blocks, taken from it.
  blocks.student.update(**{k: teacher.student[k] for k in ("d_model", "num_heads", "d_ff")})
  blocks.student.init_layers = "uniform"
  recover = _distil(arg, s["recover"], s["lr"], s["ckpt_every"])
  qat = _distil(arg, s["qat"], s["lr"], s["ckpt_every"])
  for pruned in (recover, qat):  # fewer heads than the teacher: no MiniLM attention transfer
    pruned.distill.attention.update(weight=0.0, value_weight=0.0)
  qat.student.policy = "p=f32,c=int8"
  qat.student.quant_calibration_batches = s["calibration"]
  return {
    "teacher": "teacher",
    "batch_sizes": (1, 32),
    "stages": [
      {"name": "teacher", "action": "train", "config": teacher},
      {"name": "blocks", "action": "distil", "config": blocks},
      {
        "name": "prune",
        "action": "prune",
        "targets": {"d_ff": 0.5, "num_heads": 0.75},
        "calibration_batches": s["calibration"],
      },
      {"name": "recover", "action": "distil", "config": recover, "init": "prune"},
      {"name": "qat", "action": "distil", "config": qat, "init": "recover"},
      {
        "name": "ptq",
        "action": "quantise",
        "from": "recover",
        "calibration_batches": s["calibration"],
      },
      {"name": "export", "action": "export", "from": "qat"},
    ],
  }
