"""On-policy distillation and sequence-level KD on the quickstart corpus (the Python stdlib).

  jaxdistill train --config configs/on_policy_corpus.py:teacher --workdir workdirs/corpus_teacher
  jaxdistill train --config configs/on_policy_corpus.py:gkd --workdir workdirs/corpus_gkd \\
    --config.teacher.source=workdir --config.teacher.path=workdirs/corpus_teacher
  # sequence-level KD: the teacher continues prompts cut from training rows, a student
  # trains on its continuations (the prompt carries no loss; validation stays the corpus's)
  jaxdistill precompute --generate --config configs/on_policy_corpus.py:data \\
    --config.teacher.path=workdirs/corpus_teacher --output workdirs/corpus_data
  jaxdistill train --config configs/on_policy_corpus.py:seq_kd --workdir workdirs/corpus_seq_kd \\
    --config.data.task_train_files='workdirs/corpus_data/shard-*.arrayrecord'

The same study as ``configs/on_policy.py`` (the arithmetic task) on a corpus without checkable
answers: the quickstart's data (``data.source=stdlib``, a 4,096-token BPE) at smaller sizes
(64-token rows, a 4 x 128 teacher, a 2 x 64 student), so the whole comparison fits minutes on
2 CPU cores. Every on-policy row keeps its first ``PROMPT`` tokens (``distill.on_policy.
prompt_tokens``) and the student writes the rest of the row. Variants ``VARIANT[,SIZE]``:

  teacher      CE from scratch
  ce           the student on CE alone
  token_kd     forward KL to the teacher on the corpus rows (today's KD)
  gkd          half the steps on the student's own continuations (lmbda 0.5), JSD beta 0.5
  sampled_rkl  every step on its own continuations, the sampled-token reverse KL (lmbda 1)
  seq_kd       CE on teacher-written continuations (``data.task_train_files``)
  data         what ``precompute --generate`` reads: the teacher continues the first
               ``PROMPT`` tokens of training rows (``prompts_from=data``), 2 samples each

Without ``teacher.source=workdir`` a distilling student trains its teacher first in
WORKDIR/teacher (``teacher.source=pretrain``); ``data`` reads ``teacher.path`` (default
``workdirs/corpus_teacher``). ``,test`` shrinks everything to seconds.
"""

from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError

FULL = dict(
  vocab=4096,
  seq_len=64,
  prompt=16,
  batch=16,
  shuffle_rows=8192,
  teacher=dict(d_model=128, num_layers=4, num_heads=4, d_ff=512),
  teacher_steps=800,
  teacher_lr=3e-3,
  student=dict(d_model=64, num_layers=2, num_heads=4, d_ff=256),
  student_steps=300,
  student_lr=3e-3,
  eval_every=100,
  eval_batches=8,
  prompts=2048,
  stdlib=dict(stdlib_max_files=0, stdlib_max_file_bytes=0),
)
TEST = dict(
  vocab=384,
  seq_len=32,
  prompt=8,
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
  prompts=16,
  stdlib=dict(stdlib_max_files=8, stdlib_max_file_bytes=6000),
)
SIZES = {"full": FULL, "test": TEST}
VARIANTS = ("teacher", "ce", "token_kd", "gkd", "sampled_rkl", "seq_kd", "data")
TEACHER = "workdirs/corpus_teacher"


def _base(r: dict):
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


def _generate(cfg, r: dict) -> None:
  """``precompute.generate``: continuations of training rows' first ``prompt`` tokens, at
  T=1, up to the row's end; no end-of-text needed (a corpus row rarely ends one)."""
  g = cfg.precompute.generate
  g.update(prompts_from="data", prompt_tokens=r["prompt"], prompts=r["prompts"], samples=2)
  g.update(temperature=1.0, max_new_tokens=r["seq_len"] - r["prompt"], require_stop=False)
  g.update(dedup="exact", verifier="", min_tokens=1)


def get_config(arg: str = "gkd"):
  """One run of the corpus study: ``VARIANT[,SIZE]`` (see the module docstring)."""
  variant, _, size = arg.partition(",")
  size = size or "full"
  if variant not in VARIANTS or size not in SIZES:
    raise ConfigError(
      "--config",
      f"on_policy_corpus takes VARIANT[,SIZE], VARIANT in {VARIANTS}, SIZE in {tuple(SIZES)}",
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
    _ce_only(cfg)  # seq_kd: CE on the teacher's continuations (data.task_train_files)
    return cfg
  if variant == "data":
    cfg.teacher.update(source="workdir", path=TEACHER)
  else:  # without teacher.source=workdir a run trains its teacher first in WORKDIR/teacher
    cfg.teacher.update(source="pretrain", pretrain_steps=r["teacher_steps"])
    cfg.teacher.pretrain_lr = r["teacher_lr"]
  d = cfg.distill
  d.fused = False  # the dense head: the logit kinds below all run through it
  d.attention.update(weight=0.0, value_weight=0.0)
  d.hidden.weight = 0.0
  d.temperature = 1.0
  d.ce.weight = 0.0
  op = d.on_policy
  op.update(prompt_tokens=r["prompt"], max_new_tokens=r["seq_len"] - r["prompt"], temperature=1.0)
  if variant == "data":
    _generate(cfg, r)
  elif variant == "token_kd":
    d.logit.update(kind="kl", weight=1.0)
  elif variant == "gkd":
    d.logit.update(kind="jsd", weight=1.0, beta=0.5)
    op.lmbda = 0.5
  else:  # sampled_rkl
    d.logit.update(kind="sampled_reverse_kl", weight=1.0)
    op.lmbda = 1.0
  return cfg
