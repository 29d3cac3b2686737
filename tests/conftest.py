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


# --- a local fake of Cloud Storage --------------------------------------------------------

BUCKET = "gs://bucket"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """``gs://bucket/...`` stored under ``tmp_path/gcs/bucket``; the cwd is an empty directory,
  checked empty at the end (a path call that bypassed epath writes ``./gs:/...`` there).
  Yields the local root. tests/unit/test_cloud_paths.py describes the fake."""
  from etils.epath import backend as epath_backend
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem
  from fsspec.registry import _registry as fsspec_registry
  from orbax.checkpoint._src.path import gcs_utils

  root = tmp_path / "gcs"
  (root / "bucket").mkdir(parents=True)

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, finalize_on_close=True, **kwargs):  # epath passes gcsfs's keyword
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True), **kwargs)

    def open(self, path, mode="rb", **kwargs):  # a write needs no parent directory
      if "a" in mode or "+" in mode:  # an object store has no append
        raise NotImplementedError(f"mode {mode!r} on {path}: objects cannot be appended to")
      return super().open(path, mode, **kwargs)

  for p in FakeGCS.protocol:  # restored by monkeypatch at the end
    monkeypatch.setitem(fsspec_registry, p, FakeGCS)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()

  def kvstore(ckpt_path):
    bucket, key = gcs_utils.parse_gcs_path(ckpt_path, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket / key)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.listdir(cwd), f"a path call bypassed epath and wrote {os.listdir(cwd)} locally"
