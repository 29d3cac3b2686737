"""Cloud workdirs: a run, its resumption and a precompute with ``gs://`` paths, against a local
fake of Cloud Storage, so a plain ``os`` / ``open`` call on a workdir or cache path fails.

The fake (``fake_gcs``) stores ``gs://BUCKET/KEY`` under ``tmp_path/gcs/BUCKET/KEY``:

  - epath's ``gs://`` backend (fsspec, normally ``gcsfs``) gets a file system that maps the
    URL there and, like Cloud Storage, refuses to append to a file;
  - Orbax writes array data with TensorStore's own GCS driver (not through epath): its kvstore
    spec is pointed at the same local directory (``gcs_utils.get_kvstore_for_gcs``), and the
    bucket's hierarchical-namespace query (a Cloud Storage API call) answers "no".

A path call that bypasses epath sees the literal string ``gs://bucket/...``: ``os.makedirs``
would create ``./gs:/bucket/...`` under the cwd and ``os.path.isdir`` would find nothing there;
the tests run in an empty cwd and assert nothing appears in it, and the runs only succeed when
the files are where the fake put them.
"""

import json
import os

from fsspec.registry import _registry as fsspec_registry
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from conftest import ROOT
from jaxdistill import config, paths

BUCKET = "gs://bucket"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """``gs://bucket/...`` stored under ``tmp_path/gcs/bucket``; the cwd is an empty directory.
  Yields the local root."""
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


def test_the_fake_refuses_a_plain_os_call(fake_gcs):
  """The fake is a real check: epath finds what it wrote, os.path does not."""
  paths.write_text(f"{BUCKET}/x/a.json", "{}")
  assert paths.isfile(f"{BUCKET}/x/a.json") and paths.isdir(f"{BUCKET}/x")
  assert (fake_gcs / "bucket" / "x" / "a.json").read_text() == "{}"
  assert not os.path.exists(f"{BUCKET}/x/a.json")
  assert paths.join(BUCKET, "x", "a.json") == f"{BUCKET}/x/a.json"
  assert paths.nearest_existing(f"{BUCKET}/x/y/z") == f"{BUCKET}/x"
  with pytest.raises(NotImplementedError):
    paths.path(f"{BUCKET}/x/a.json").open("a")


def _smoke(steps):
  """configs/smoke.py for ``steps`` steps, a checkpoint every 2, TensorBoard events on."""
  cfg = config.load_config(str(ROOT / "configs" / "smoke.py"))
  cfg.optim.steps = steps
  cfg.ckpt.every = 2
  cfg.log.progress = False
  cfg.log.tensorboard = True
  return cfg


def test_train_and_resume_in_a_gs_workdir(fake_gcs):
  from jaxdistill import loop

  workdir = f"{BUCKET}/runs/smoke"
  first = loop.train(_smoke(2), workdir)
  local = fake_gcs / "bucket" / "runs" / "smoke"
  assert first["start_step"] == 0 and first["last_step"] == 2
  assert (local / "checkpoints" / "2").is_dir()
  assert (local / "final_params").is_dir()
  second = loop.train(_smoke(4), workdir)
  assert second["start_step"] == 2 and second["last_step"] == 4
  rows = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert json.loads((local / "summary.json").read_text())["last_step"] == 4
  assert json.loads((local / "config.json").read_text())["optim"]["steps"] == 4
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(local / "tensorboard"))
  assert sorted(os.listdir(local / "checkpoints")) == ["2", "4"]
