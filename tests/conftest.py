"""Test setup: 8 fake CPU devices and a persistent compilation cache, set before JAX is imported.

Most of the suite's time is XLA compiling the same small programs again (every ``build_run``
makes new jitted closures, so a second identical run in one process recompiles everything, and
every subprocess starts cold). JAX's persistent compilation cache keys a compiled program by its
HLO, compile options and the machine, so an identical program is read back instead of compiled.
It is set through the environment so that subprocess tests (the CLI, several processes) inherit
it. ``JAXDISTILL_TEST_CACHE`` moves it; an empty value turns it off.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

ROOT = pathlib.Path(__file__).resolve().parent.parent

_cache = os.environ.get("JAXDISTILL_TEST_CACHE", str(ROOT / ".cache" / "jax-tests"))
if _cache:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
  # Cache every program, however small or quick to compile: the tests' programs are tiny.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


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
