"""Self-distillation with an EMA "mean teacher" on the built-in corpus (the Python stdlib).

  jaxdistill train --config configs/self_distill.py --workdir workdirs/self_distill
  jaxdistill train --config configs/self_distill.py:test --workdir /tmp/self_distill  (seconds)

The teacher is the student itself: its model on an exponential moving average of its own
params (``teacher.source='ema'``, jaxdistill/train/ema.py), kept in the train state, updated
inside the step after the optimizer's update and checkpointed with it. The student trains on
CE plus a forward KL to the average's predictions; the average's decay warms up linearly from
0 to ``teacher.ema_decay`` over ``teacher.ema_warmup_steps`` (an early average follows the
student closely, a late one averages over about 1 / (1 - decay) steps). The teacher's model
keys are the student's (a different architecture is a config error). ``get_config``'s argument
is the size: ``full`` (the default) or ``test`` (a few stdlib files, a tiny model). Corpus,
tokenizer, model and optimizer are the quickstart's CE student at that size
(``configs/quickstart.py``); only the teacher, the loss and the schedule are set here.
"""

import os

from jaxdistill.config import config_module
from jaxdistill.errors import ConfigError
from jaxdistill.models import MODEL_KEYS

_RECIPE = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
# Per size: steps, the average's decay and warmup, the eval interval.
SIZES = {
  "full": dict(steps=300, ema_decay=0.99, ema_warmup_steps=50, eval_every=50),
  "test": dict(steps=8, ema_decay=0.9, ema_warmup_steps=2, eval_every=4),
}


def get_config(size: str = "full"):
  """The EMA self-distillation run at ``size`` (``full`` or ``test``)."""
  if size not in SIZES:
    raise ConfigError(
      "--config", f"configs/self_distill.py:{size}: use one of {', '.join(SIZES)} (or nothing)"
    )
  r = SIZES[size]
  cfg = _RECIPE.student_config(size, kd=False)
  # The teacher is the student's architecture: every model key copied.
  for key in MODEL_KEYS:
    cfg.teacher[key] = cfg.student[key]
  cfg.teacher.update(source="ema", ema_decay=r["ema_decay"])
  cfg.teacher.ema_warmup_steps = r["ema_warmup_steps"]
  steps = r["steps"]
  cfg.optim.update(steps=steps, warmup_steps=max(1, int(0.1 * steps)))
  d = cfg.distill
  d.temperature = 1.0
  d.logit.update(kind="kl", weight=0.5)
  d.ce.weight = 0.5
  cfg.eval.every = r["eval_every"]
  return cfg
