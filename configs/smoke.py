"""Smoke test: every loss family on, tiny models, synthetic data. Runs anywhere.

  jaxdistill train --config configs/smoke.py --workdir /tmp/smoke

Hardware: any; on 2 CPU cores it finishes in well under a minute (including
compilation). Expect the loss to fall steadily over the 30 steps; the teacher
is random, so this checks the machinery, not distillation quality.

Teacher d128/L4/H4 (random init), student d64/L2/H4, so the hidden-state loss
needs learned projections; attention transfer pairs the last layers.
"""

from jaxdistill.config import default_config


def get_config():
  cfg = default_config()
  cfg.seed = 0
  cfg.student.update(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_ff=128, max_len=64)
  cfg.teacher.update(
    source="random", vocab_size=256, d_model=128, num_layers=4, num_heads=4, d_ff=256, max_len=64
  )
  d = cfg.distill
  d.temperature = 2.0
  d.logit.update(kind="kl", weight=0.5)
  d.ce.weight = 0.5
  d.attention.update(weight=0.1, value_weight=0.1, layer_map="last")
  d.hidden.update(kind="mse", weight=0.1, layer_map="uniform")
  cfg.optim.update(steps=30, lr=3e-3, warmup_steps=3)
  cfg.data.update(batch_size=8, seq_len=32)
  cfg.log.every = 1
  cfg.ckpt.every = 5  # so a killed run can be resumed (see tests/e2e/test_checkpoint.py)
  return cfg
