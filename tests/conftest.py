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
  """A small all-losses config (f32) for in-process step tests (``testing.tiny_config``)."""
  import testing

  return testing.tiny_config()
