"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_config():
  """A small all-losses config (f32) for in-process step tests."""
  from jaxdistill.config import default_config

  cfg = default_config()
  cfg.student.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)
  cfg.teacher.update(
    source="random", vocab_size=64, d_model=48, num_layers=3, num_heads=2, d_ff=96, max_len=16
  )
  cfg.distill.temperature = 2.0
  cfg.distill.logit.weight = 0.5
  cfg.distill.ce.weight = 0.5
  cfg.distill.attention.update(weight=0.2, value_weight=0.2)
  cfg.distill.hidden.update(weight=0.3, layer_map="uniform")
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(batch_size=8, seq_len=16, pad_fraction=0.5)
  cfg.log.progress = False
  return cfg
