"""Shared pieces of the tests: the tiny model sections and configs most of them start from.

Shapes are chosen to be cheap to compile, with enough structure for the property a test
checks (several heads, more than one layer where layer maps matter). A test that needs a
special shape (a width that does not divide a mesh axis, a pruned head count) still says so
itself. The golden cases (tests/golden/cases.py) keep their own frozen copy on purpose: their
records must not move when a shared section changes.
"""

# A language model small enough to compile in about a second: the student side.
TINY_LM = dict(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=16)
# Its teacher: twice as wide (so hidden-state losses need a projection).
TINY_LM_TEACHER = dict(TINY_LM, d_model=32, d_ff=64)
# Two layers each, the teacher deeper and wider: every feature loss and layer map has work.
SMALL_LM = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)
SMALL_LM_TEACHER = dict(SMALL_LM, d_model=48, num_layers=3, d_ff=96)


def tiny_config():
  """A small all-losses config (f32, random teacher) for in-process step tests."""
  from jaxdistill.config import default_config

  cfg = default_config()
  cfg.student.update(SMALL_LM)
  cfg.teacher.update(source="random", **SMALL_LM_TEACHER)
  cfg.distill.temperature = 2.0
  cfg.distill.logit.weight = 0.5
  cfg.distill.ce.weight = 0.5
  cfg.distill.attention.update(weight=0.2, value_weight=0.2)
  cfg.distill.hidden.update(weight=0.3, layer_map="uniform")
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(batch_size=8, seq_len=16, pad_fraction=0.5)
  cfg.log.progress = False
  return cfg
