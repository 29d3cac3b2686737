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
is the size: ``full`` (the default: the quickstart's student, on the quickstart's corpus) or
``test`` (a few stdlib files, a tiny model).
"""

from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError
from jaxdistill.models import MODEL_KEYS

FULL = dict(
  vocab=4096,
  seq_len=128,
  batch=16,
  shuffle_rows=32768,
  model=dict(d_model=128, num_layers=2, num_heads=4, d_ff=512),
  steps=300,
  lr=3e-3,
  ema_decay=0.99,
  ema_warmup_steps=50,
  eval_every=50,
  eval_batches=8,
  stdlib=dict(stdlib_max_files=0, stdlib_max_file_bytes=0),
)
TEST = dict(
  vocab=384,
  seq_len=32,
  batch=8,
  shuffle_rows=1024,
  model=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32),
  steps=8,
  lr=1e-2,
  ema_decay=0.9,
  ema_warmup_steps=2,
  eval_every=4,
  eval_batches=2,
  stdlib=dict(stdlib_max_files=8, stdlib_max_file_bytes=6000),
)
SIZES = {"full": FULL, "test": TEST}


def get_config(size: str = "full"):
  """The EMA self-distillation run at ``size`` (``full`` or ``test``)."""
  if size not in SIZES:
    raise ConfigError(
      "--config", f"configs/self_distill.py:{size}: use one of {', '.join(SIZES)} (or nothing)"
    )
  r = SIZES[size]
  cfg = default_config()
  cfg.data.update(source="stdlib", batch_size=r["batch"], seq_len=r["seq_len"], **r["stdlib"])
  cfg.data.shuffle_rows = r["shuffle_rows"]
  cfg.student.update(vocab_size=r["vocab"], max_len=r["seq_len"], **r["model"])
  # The teacher is the student's architecture: every model key copied.
  for key in MODEL_KEYS:
    cfg.teacher[key] = cfg.student[key]
  cfg.teacher.update(source="ema", ema_decay=r["ema_decay"])
  cfg.teacher.ema_warmup_steps = r["ema_warmup_steps"]
  steps = r["steps"]
  cfg.optim.update(steps=steps, lr=r["lr"], warmup_steps=max(1, int(0.1 * steps)))
  d = cfg.distill
  d.temperature = 1.0
  d.logit.update(kind="kl", weight=0.5)
  d.ce.weight = 0.5
  cfg.eval.update(every=r["eval_every"], batches=r["eval_batches"])
  cfg.log.every = 10
  return cfg
