"""On-policy distillation on the built-in arithmetic task (and the students it is compared with).

  jaxdistill train --config configs/on_policy.py:teacher --workdir workdirs/arith_teacher
  jaxdistill train --config configs/on_policy.py:gkd --workdir workdirs/arith_gkd \\
    --config.teacher.source=workdir --config.teacher.path=workdirs/arith_teacher
  jaxdistill train --config configs/on_policy.py:gkd,test --workdir /tmp/gkd   (about a minute)

The task (``data.source=task``, ``jaxdistill/data/task_data.py``): "347+85=" followed by a
column-by-column worked solution and the answer, one problem a row, loss on the completion
only; a one-token-a-character tokenizer (257 = 256 bytes + end-of-text). Variants
(``VARIANT[,SIZE]``):

  teacher      the teacher, CE on the reference solutions from scratch
  ce           the student on CE alone (the reference solutions)
  token_kd     the student on token-level KD (forward KL) on the reference solutions
  gkd          GKD: half the steps on the student's own samples (lmbda 0.5), JSD beta 0.5
  sampled_rkl  every step on its own samples, the sampled-token reverse KL (lmbda 1)
  seq_kd       sequence-level KD: CE on teacher-written solutions (configs/seq_kd.py)

Without ``teacher.source=workdir`` a student run trains its teacher first in WORKDIR/teacher
(``teacher.source=pretrain``). ``,test`` shrinks everything to seconds.
"""

from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError

FULL = dict(
  seq_len=80,
  batch=32,
  teacher=dict(d_model=128, num_layers=4, num_heads=4, d_ff=512),
  teacher_steps=1500,
  teacher_lr=3e-3,
  student=dict(d_model=64, num_layers=2, num_heads=4, d_ff=256),
  student_steps=400,
  student_lr=3e-3,
  max_new_tokens=64,
  eval_every=100,
  eval_problems=256,
)
TEST = dict(
  seq_len=80,
  batch=8,
  teacher=dict(d_model=32, num_layers=2, num_heads=2, d_ff=64),
  teacher_steps=6,
  teacher_lr=1e-2,
  student=dict(d_model=16, num_layers=1, num_heads=2, d_ff=32),
  student_steps=4,
  student_lr=1e-2,
  max_new_tokens=16,
  eval_every=2,
  eval_problems=16,
)
SIZES = {"full": FULL, "test": TEST}
VARIANTS = ("teacher", "ce", "token_kd", "gkd", "sampled_rkl", "seq_kd")
VOCAB = 257  # byte-level, no merges: one token a character


def _base(r: dict):
  cfg = default_config()
  cfg.data.update(source="task", task="arithmetic", batch_size=r["batch"], seq_len=r["seq_len"])
  cfg.data.task_eval_problems = r["eval_problems"]
  cfg.optim.update(b1=0.9, b2=0.95, weight_decay=0.01, clip_norm=1.0)
  cfg.eval.update(every=r["eval_every"], batches=0)
  cfg.log.every = 10
  return cfg


def _model(section, r: dict, side: str) -> None:
  section.update(vocab_size=VOCAB, max_len=r["seq_len"], **r[side])


def _ce_only(cfg) -> None:
  cfg.teacher.source = "none"
  cfg.distill.ce.weight = 1.0
  for key in ("logit", "attention", "hidden"):
    cfg.distill[key].weight = 0.0


def get_config(arg: str = "gkd"):
  """One run of the study: ``VARIANT[,SIZE]`` (see the module docstring)."""
  variant, _, size = arg.partition(",")
  size = size or "full"
  if variant not in VARIANTS or size not in SIZES:
    raise ConfigError(
      "--config", f"on_policy takes VARIANT[,SIZE], VARIANT in {VARIANTS}, SIZE in {tuple(SIZES)}"
    )
  r = SIZES[size]
  cfg = _base(r)
  if variant == "teacher":
    _model(cfg.student, r, "teacher")
    _ce_only(cfg)
    steps, lr = r["teacher_steps"], r["teacher_lr"]
    cfg.optim.update(steps=steps, lr=lr, warmup_steps=max(1, steps // 10))
    return cfg
  _model(cfg.student, r, "student")
  _model(cfg.teacher, r, "teacher")
  steps = r["student_steps"]
  cfg.optim.update(steps=steps, lr=r["student_lr"], warmup_steps=max(1, steps // 10))
  if variant in ("ce", "seq_kd"):
    _ce_only(cfg)  # seq_kd: CE on teacher-written pairs (data.task_train_files)
    return cfg
  cfg.teacher.update(source="pretrain", pretrain_steps=r["teacher_steps"])
  cfg.teacher.pretrain_lr = r["teacher_lr"]
  d = cfg.distill
  d.fused = False  # small vocabulary: the dense head, which every logit kind runs through
  d.attention.update(weight=0.0, value_weight=0.0)
  d.hidden.weight = 0.0
  d.temperature = 1.0
  d.ce.weight = 0.0
  op = d.on_policy
  op.update(max_new_tokens=r["max_new_tokens"], temperature=1.0, prompt_tokens=0)
  if variant == "token_kd":
    d.logit.update(kind="kl", weight=1.0)
  elif variant == "gkd":
    d.logit.update(kind="jsd", weight=1.0, beta=0.5)
    op.lmbda = 0.5
  else:  # sampled_rkl
    d.logit.update(kind="sampled_reverse_kl", weight=1.0)
    op.lmbda = 1.0
  return cfg
