"""Continual distillation on a drifting stream: the quickstart's KD student, trained on the
built-in corpus presented domain after domain, with a refreshed teacher and (by default) a KL
term to its own snapshot from the previous window (learning without forgetting).

  jaxdistill train --config configs/continual.py --workdir workdirs/continual
  jaxdistill train --config configs/continual.py:plain --workdir workdirs/continual_plain
  jaxdistill train --config configs/continual.py:snapshot,test --workdir /tmp/continual

``get_config``'s argument is ``VARIANT[,SIZE]``: ``snapshot`` (the default: the snapshot term
at ``continual.snapshot_weight``) or ``plain`` (weight 0: no snapshot), at ``full`` (the
default) or ``test`` (tiny models, 24 small stdlib files: 1.5 minutes on 2 shared CPU cores,
55 s of CPU time, mostly compilation; its teacher's 12 pretraining steps included).

The stream (jaxdistill/data/continual.py): the corpus subset's training documents sorted by
file path, cut into ``continual.domains`` contiguous module groups (full: ``__future__ ..
cProfile``, ``cgitb .. distutils/bcppcompiler``, ``distutils/cmd .. distutils/log``,
``distutils/spawn .. encodings/aliases``), streamed once, in windows of
``continual.window_steps`` steps sized so that the stream holds about one window per domain;
each window holds out ``continual.eval_rows`` rows, on which every window seen so far is
evaluated at each window's end (WORKDIR/forgetting.md). The teacher is pretrained on the
whole subset inside the run (or ``--config.teacher.source=workdir --config.teacher.path=DIR``)
and, every ``continual.refresh_every`` steps, fine-tuned afresh on the most recent window of
the stream (jaxdistill/train/continual.py). Corpus, tokenizer, models and losses are the
quickstart recipe's at that size (configs/quickstart.py); measured: BENCHMARKS.md,
"Continual distillation: forgetting (issue 30)".
"""

import os

from jaxdistill.config import config_module
from jaxdistill.errors import ConfigError

_RECIPE = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
# Per size: the corpus subset, the stream's domains and windows, the teacher's refresh. Each
# stream holds exactly domains windows: 4 x (window_steps x batch + eval_rows) rows fit in its
# rows (test: 996 rows of 32 tokens; full: 2,268 rows of 128), so steps = domains x window.
SIZES = {
  "full": dict(
    stdlib=dict(stdlib_max_files=160, stdlib_max_file_bytes=20000),
    teacher_steps=300,
    domains=4,
    window_steps=32,
    eval_rows=48,
    refresh_every=16,
    refresh_steps=8,
    refresh_lr=1e-3,
    snapshot_weight=1.0,
  ),
  "test": dict(
    stdlib=dict(stdlib_max_files=24, stdlib_max_file_bytes=6000),
    teacher_steps=12,
    domains=4,
    window_steps=24,
    eval_rows=32,
    refresh_every=12,
    refresh_steps=4,
    refresh_lr=3e-3,
    snapshot_weight=1.0,
  ),
}
VARIANTS = ("snapshot", "plain")


def get_config(arg: str = "snapshot"):
  """The continual run ``VARIANT[,SIZE]`` (``snapshot`` / ``plain``, ``full`` / ``test``)."""
  variant, _, size = arg.partition(",")
  size = size or "full"
  if variant not in VARIANTS or size not in SIZES:
    raise ConfigError(
      "--config",
      f"configs/continual.py:{arg}: use one of {', '.join(VARIANTS)}, optionally followed by "
      "',test' (e.g. configs/continual.py:plain,test)",
    )
  r = SIZES[size]
  cfg = _RECIPE.student_config(size, kd=True)
  cfg.data.update(**r["stdlib"])
  cfg.teacher.pretrain_steps = r["teacher_steps"]
  c = cfg.continual
  c.update(domains=r["domains"], window_steps=r["window_steps"], eval_rows=r["eval_rows"])
  c.update(refresh_every=r["refresh_every"], teacher_steps=r["refresh_steps"])
  c.teacher_lr = r["refresh_lr"]
  c.snapshot_weight = r["snapshot_weight"] if variant == "snapshot" else 0.0
  steps = r["domains"] * r["window_steps"]
  # A constant rate: a stream has no end to anneal to, and a cosine would make late windows
  # forget less only because they are learnt less.
  cfg.optim.update(steps=steps, lr_schedule="constant", warmup_steps=max(1, steps // 20))
  cfg.eval.every = r["window_steps"]  # at each window's end: every window seen so far
  return cfg
