"""The quickstart's recipe: a 4-layer teacher LM, a 2-layer student distilled from it, and the
same student on cross-entropy alone, all on the built-in corpus (the Python standard library).

  jaxdistill train --config configs/quickstart.py:teacher --workdir workdirs/lm_teacher
  jaxdistill train --config configs/quickstart.py:distill --workdir workdirs/lm_distill
  jaxdistill train --config configs/quickstart.py:baseline --workdir workdirs/lm_baseline
  jaxdistill train --config configs/quickstart.py:distill,test --workdir /tmp/tiny

Variants (``get_config``'s argument, as big_vision's ``runlocal``): ``teacher`` (CE from
scratch), ``distill`` (KD student; trains its teacher inside the run unless
``--config.teacher.source=workdir --config.teacher.path=DIR``), ``baseline`` (the KD student's
model on CE alone); ``,test`` shrinks everything (a few stdlib files, tiny models: seconds).
``jaxdistill quickstart`` runs all three from this file (``teacher_config`` and
``student_config`` below), and ``configs/lm_teacher.py``, ``lm_distill.py`` and
``lm_baseline.py`` are the full-size variants under their own names.

Hardware: 2 idle CPU cores (Intel Xeon): teacher about 6.5 min, KD student about 60 s, CE
student about 40 s. Expected results (validation CE, the quickstart's table in BENCHMARKS.md):
teacher 3.59, KD student 4.26, CE student 4.71 at equal steps, 4.09 at the KD student's wall
time.
"""

from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError

# Every hyper-parameter of the recipe, by size. The teacher must be trained well past what the
# student reaches on CE alone before distillation pays (BENCHMARKS.md, "Quickstart").
FULL = dict(
  vocab=4096,
  seq_len=128,
  batch=16,
  # Training rows shuffled within one window holding the whole training split: the stdlib has
  # files of thousands of rows, so a smaller window fills each batch from a few long files and
  # every student ends worse. Filling it tokenises the split once per epoch and holds it in
  # memory (time, memory and the losses with smaller windows: BENCHMARKS.md, "The shuffle
  # window").
  shuffle_rows=32768,
  teacher=dict(d_model=256, num_layers=4, num_heads=4, d_ff=1024),
  teacher_steps=560,
  teacher_lr=3e-3,
  student=dict(d_model=128, num_layers=2, num_heads=4, d_ff=512),
  student_steps=150,
  student_lr=3e-3,
  eval_every=25,  # the teacher evaluates every 2 * eval_every steps (its forward is dearer)
  eval_batches=8,
  final_eval_batches=48,  # ~98k validation tokens for the final table
  stdlib=dict(stdlib_max_files=0, stdlib_max_file_bytes=0),
)
TEST = dict(
  vocab=384,
  seq_len=32,
  batch=8,
  shuffle_rows=1024,
  teacher=dict(d_model=32, num_layers=2, num_heads=2, d_ff=64),
  teacher_steps=6,
  teacher_lr=1e-2,
  student=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32),
  student_steps=4,
  student_lr=1e-2,
  eval_every=2,
  eval_batches=2,
  final_eval_batches=0,
  stdlib=dict(stdlib_max_files=8, stdlib_max_file_bytes=6000),
)
SIZES = {"full": FULL, "test": TEST}
VARIANTS = ("teacher", "distill", "baseline")


def _base(size: str):
  r = SIZES[size]
  cfg = default_config()
  cfg.data.update(source="stdlib", batch_size=r["batch"], seq_len=r["seq_len"], **r["stdlib"])
  cfg.data.shuffle_rows = r["shuffle_rows"]
  cfg.optim.update(b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0)
  cfg.eval.update(every=r["eval_every"], batches=r["eval_batches"])
  cfg.log.every = 10
  return cfg


def _model(section, r: dict, side: str) -> None:
  section.update(vocab_size=r["vocab"], max_len=r["seq_len"], **r[side])


def _ce_only(cfg) -> None:
  cfg.teacher.source = "none"
  cfg.distill.ce.weight = 1.0
  for key in ("logit", "attention", "hidden"):
    cfg.distill[key].weight = 0.0


def teacher_config(size: str = "full"):
  """The teacher, trained from scratch on CE (it is the student of its own run).

  Args:
    size: "full" or "test".

  Returns:
    The ConfigDict (not validated).
  """
  r, cfg = SIZES[size], _base(size)
  _model(cfg.student, r, "teacher")
  _ce_only(cfg)
  cfg.eval.every = 2 * r["eval_every"]
  steps = r["teacher_steps"]
  cfg.optim.update(steps=steps, lr=r["teacher_lr"], warmup_steps=max(1, int(0.15 * steps)))
  return cfg


def student_config(size: str = "full", kd: bool = True, teacher_path: str = ""):
  """The student: distilled from a teacher (kd) or trained on CE alone.

  Args:
    size: "full" or "test".
    kd: distil (True) or CE only (False).
    teacher_path: the teacher run's directory; empty: pretrain it inside the run.

  Returns:
    The ConfigDict (not validated).
  """
  r, cfg = SIZES[size], _base(size)
  _model(cfg.student, r, "student")
  _model(cfg.teacher, r, "teacher")
  steps = r["student_steps"]
  cfg.optim.update(steps=steps, lr=r["student_lr"], warmup_steps=max(1, int(0.15 * steps)))
  d = cfg.distill
  if not kd:
    _ce_only(cfg)
    return cfg
  if teacher_path:
    cfg.teacher.update(source="workdir", path=teacher_path)
  else:  # standalone: train the teacher first in WORKDIR/teacher (cosine, 10% warmup)
    cfg.teacher.update(source="pretrain", pretrain_steps=r["teacher_steps"])
    cfg.teacher.pretrain_lr = r["teacher_lr"]
  # Low temperature, most weight on the teacher: what worked on this corpus.
  d.temperature = 1.0
  d.logit.update(kind="kl", weight=0.9)
  d.ce.weight = 0.1
  d.attention.update(weight=0.1, value_weight=0.1, layer_map="last")
  # Cosine, not MSE: the teacher's residual stream grows to norms where a 0.1-weighted MSE
  # outweighs every other term and eats the clipped gradient, and KD then did no better than
  # CE (BENCHMARKS.md, end of "Quickstart").
  d.hidden.update(kind="cosine", weight=0.1, layer_map="uniform", project=True)
  return cfg


def get_config(arg: str = "distill"):
  """One of the recipe's runs: ``VARIANT[,SIZE]``, e.g. ``teacher``, ``distill,test``."""
  variant, _, size = arg.partition(",")
  size = size or "full"
  if variant not in VARIANTS or size not in SIZES:
    raise ConfigError(
      "--config",
      f"configs/quickstart.py:{arg}: use one of {', '.join(VARIANTS)}, "
      f"optionally followed by ',test' (e.g. configs/quickstart.py:distill,test)",
    )
  if variant == "teacher":
    return teacher_config(size)
  return student_config(size, kd=variant == "distill")
