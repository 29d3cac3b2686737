"""Sequence-level KD on the arithmetic task: the teacher writes the training set, verified.

  # 1. the teacher (or reuse one: configs/on_policy.py:teacher)
  jaxdistill train --config configs/on_policy.py:teacher --workdir workdirs/arith_teacher
  # 2. it writes 4 solutions of each of 2,048 training problems; wrong answers are dropped
  jaxdistill precompute --generate --config configs/seq_kd.py:data \\
    --config.teacher.path=workdirs/arith_teacher --output workdirs/arith_data
  jaxdistill precompute --verify --output workdirs/arith_data
  # 3. the student trains on them (CE on the teacher's completions; no loss on the prompt)
  jaxdistill train --config configs/seq_kd.py:student --workdir workdirs/arith_seq_kd \\
    --config.data.task_train_files='workdirs/arith_data/shard-*.arrayrecord'

Variants ``VARIANT[,SIZE]``: ``data`` (what ``precompute --generate`` reads: the teacher,
the prompts, sampling and filters; ``teacher.path`` is the teacher run's directory),
``student`` (the student of configs/on_policy.py on CE over ``data.task_train_files``), and
``data_unverified`` (the same set without the verifier, to measure what it buys). ``,test``
is seconds (16 prompts).
"""

import os

from jaxdistill.config import files
from jaxdistill.errors import ConfigError

_recipe = files.config_module(os.path.join(os.path.dirname(__file__), "on_policy.py"))
VARIANTS = ("data", "data_unverified", "student")


def get_config(arg: str = "student"):
  """One step of the recipe: ``VARIANT[,SIZE]`` (see the module docstring)."""
  variant, _, size = arg.partition(",")
  size = size or "full"
  if variant not in VARIANTS or size not in _recipe.SIZES:
    raise ConfigError(
      "--config",
      f"seq_kd takes VARIANT[,SIZE], VARIANT in {VARIANTS}, SIZE in {tuple(_recipe.SIZES)}",
    )
  if variant == "student":
    return _recipe.get_config(f"seq_kd,{size}")
  r = _recipe.SIZES[size]
  cfg = _recipe.get_config(f"token_kd,{size}")
  cfg.teacher.update(source="workdir", path="workdirs/arith_teacher")
  g = cfg.precompute.generate
  g.update(prompts=2048 if size == "full" else 16, samples=4, temperature=1.0)
  g.update(max_new_tokens=r["max_new_tokens"] if size == "test" else 72, dedup="exact")
  g.verifier = "" if variant == "data_unverified" else "jaxdistill.data.tasks:check"
  return cfg
