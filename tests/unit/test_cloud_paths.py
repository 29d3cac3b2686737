"""Cloud workdirs: a run, its resumption and a precompute with ``gs://`` paths, against a local
fake of Cloud Storage, so a plain ``os`` / ``open`` call on a workdir or cache path fails.

The fake (the ``fake_gcs`` fixture of tests/conftest.py, shared with
tests/integration/test_remote_jobs.py) stores ``gs://BUCKET/KEY`` under
``tmp_path/gcs/BUCKET/KEY``:

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

import pytest
from conftest import BUCKET, ROOT

from jaxdistill import config, paths


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
  """configs/smoke.py for ``steps`` steps, a checkpoint every 2, TensorBoard events on; CE
  alone without a teacher, so each run compiles as little as possible (no file is the
  teacher's: a random one lives in memory)."""
  cfg = config.load_config(str(ROOT / "configs" / "smoke.py"))
  cfg.teacher.source = "none"
  cfg.distill.update(temperature=1.0)
  cfg.distill.logit.weight = 0.0
  cfg.distill.ce.weight = 1.0
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.student.update(num_layers=1, d_model=32, d_ff=64)
  cfg.optim.steps = steps
  cfg.ckpt.every = 2
  cfg.log.progress = False
  cfg.log.tensorboard = True
  return cfg


@pytest.mark.slow
def test_train_and_resume_in_a_gs_workdir(fake_gcs):
  """A smoke run for 2 steps in gs://, then resumed to 4 (two compilations: ~30-60 s)."""
  from jaxdistill.train import loop

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


class _Iterator:
  """A data iterator's checkpointed position (``checkpoint.DataStateHandler``)."""

  def __init__(self, position=0):
    self.position = position

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def test_checkpoints_and_params_in_gs(fake_gcs):
  """Orbax's managers and params directories at gs:// (epath for its files, TensorStore for
  the arrays), and jaxdistill's own listing, metadata reads and set-aside of newer steps."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from jaxdistill.train import checkpoint

  ckpt_cfg = ml_collections.ConfigDict(
    dict(max_to_keep=0, async_save=False, best_metric="", best_mode="min")
  )
  workdir = f"{BUCKET}/run"
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  manager = checkpoint.make_manager(workdir, ckpt_cfg)
  for step in (2, 4):
    checkpoint.save(manager, step, state, _Iterator(step), {"config": {"x": step}})
  manager.wait_until_finished()
  assert checkpoint.complete_steps(f"{workdir}/checkpoints") == [2, 4]
  stored = fake_gcs / "bucket" / "run" / "checkpoints"
  assert sorted(os.listdir(stored)) == ["2", "4"]
  # Orbax wrote the steps in place (no rename on an object store), marked complete last: a
  # step without the mark is an interrupted save, skipped with a warning.
  assert (stored / "2" / checkpoint.COMMITTED).exists()
  (stored / "6" / "state").mkdir(parents=True)
  assert checkpoint.complete_steps(f"{workdir}/checkpoints") == [2, 4]
  with pytest.warns(UserWarning, match="partial checkpoint gs://bucket/run/checkpoints/6"):
    checkpoint.make_manager(workdir, ckpt_cfg).close()
  paths.rmtree(f"{workdir}/checkpoints/6")
  assert checkpoint.read_meta(manager, 4) == {"config": {"x": 4}}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  it = _Iterator()
  restored, meta = checkpoint.restore(manager, 2, abstract, it)
  assert it.position == 2 and meta == {"config": {"x": 2}}
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert checkpoint.set_aside_newer(manager, 2) == [f"{workdir}/checkpoints/4"]
  assert checkpoint.complete_steps(f"{workdir}/checkpoints") == [2]
  manager.close()
  # --resume_from another run's gs:// workdir
  other, step = checkpoint.resolve_resume(
    checkpoint.make_manager(f"{BUCKET}/fresh", ckpt_cfg), workdir
  )
  assert step == 2 and str(other.directory) == f"{workdir}/checkpoints"
  checkpoint.save_params(f"{workdir}/final_params", {"w": state["w"]})
  loaded = checkpoint.load_params(f"{workdir}/final_params", {"w": abstract["w"]})
  np.testing.assert_array_equal(loaded["w"], state["w"])
  assert len(checkpoint.content_hash(f"{workdir}/final_params")) == 64


def test_content_hash_is_the_same_local_and_remote(fake_gcs, tmp_path):
  for root in (tmp_path / "local", fake_gcs / "bucket" / "tree"):
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x").write_bytes(b"1")
    (root / "a-c").write_bytes(b"2")
    (root / "z").write_bytes(b"3")
  assert paths.content_hash(str(tmp_path / "local")) == paths.content_hash(f"{BUCKET}/tree")


def test_metrics_and_workdir_files_in_gs(fake_gcs):
  """metrics.jsonl without append (rewritten whole), its truncation on resume, TensorBoard
  events, config.json, and the workdir checks of ``prepare`` and the CLI."""
  from jaxdistill.cli import commands as cli
  from jaxdistill.errors import JaxdistillError
  from jaxdistill.train import metrics
  from jaxdistill.train import workdir as workdir_lib

  workdir, local = f"{BUCKET}/run", fake_gcs / "bucket" / "run"
  cfg = config.default_config()
  workdir_lib.prepare(cfg, workdir)
  assert json.loads((local / "config.json").read_text())["seed"] == cfg.seed
  jsonl = f"{workdir}/metrics.jsonl"
  writer = metrics.JsonlWriter(jsonl)
  writer.write({"step": 1, "loss": 1.0})
  writer.flush()
  assert (local / "metrics.jsonl").read_text() == '{"loss": 1.0, "step": 1}\n'
  writer.write({"step": 2, "loss": float("nan")})
  writer.close()
  writer = metrics.JsonlWriter(jsonl)  # a resumed run appends to the rows there
  writer.write({"step": 3, "loss": 0.5})
  writer.close()
  assert [r["step"] for r in metrics.read_jsonl(jsonl)] == [1, 2, 3]
  workdir_lib.truncate_metrics(jsonl, 2)
  assert [r["step"] for r in metrics.read_jsonl(jsonl)] == [1, 2]
  tb = metrics.TensorBoardWriter(f"{workdir}/tensorboard")
  tb.write({"step": 1, "loss": 1.0})
  tb.close()
  (events,) = os.listdir(local / "tensorboard")
  assert (
    events.startswith("events.out.tfevents") and (local / "tensorboard" / events).stat().st_size
  )
  # A workdir with a user's files is refused; so is a gs:// "directory" that is a file.
  paths.write_text(f"{BUCKET}/mine/notes.txt", "x")
  with pytest.raises(JaxdistillError, match="not empty"):
    workdir_lib.prepare(cfg, f"{BUCKET}/mine")
  with pytest.raises(JaxdistillError, match="is no directory"):
    cli._check_dir_flag("--output", f"{BUCKET}/mine/notes.txt/report")
  cli._check_dir_flag("--output", f"{BUCKET}/new/report")  # accepted: made when written


@pytest.mark.slow
def test_precompute_to_gs_is_byte_identical_and_trains(fake_gcs, tmp_path):
  """A precompute into gs:// (ArrayRecord shards staged locally, then uploaded) writes the
  same bytes as one into a local directory; ``--verify`` and the training reader (shards
  downloaded once into the cache directory) read it back."""
  import jax
  import numpy as np
  from test_cache import _cache_config, _config

  from jaxdistill.data import cache_writer, cached
  from jaxdistill.precompute import text as precompute

  cfg = _config()
  cfg.cache_dir = str(tmp_path / "cache")
  local, remote = tmp_path / "local", f"{BUCKET}/cache"
  teacher = precompute.build_teacher(cfg, str(local), devices=jax.devices()[:2])
  precompute.run(cfg, str(local), teacher=teacher)
  assert precompute.run(cfg, remote, teacher=teacher)["complete"]
  stored = fake_gcs / "bucket" / "cache"
  assert sorted(os.listdir(stored)) == sorted(os.listdir(local))
  for name in os.listdir(local):
    assert (stored / name).read_bytes() == (local / name).read_bytes(), name
  assert cache_writer.verify(remote) == {"shards": 3, "rows": 40}
  batches = []
  for path in (str(local), remote):
    c = _cache_config(cfg, path, kind="topk_tail")
    batches.append(next(iter(cached.make_iterator(c, 0, 1))))
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key])
  assert os.listdir(tmp_path / "cache" / "remote_caches")  # the downloaded shards


def test_copy_and_move_between_local_and_gs(fake_gcs, tmp_path):
  local = tmp_path / "a.bin"
  local.write_bytes(b"abc")
  paths.copy(str(local), f"{BUCKET}/x/a.bin")
  paths.replace(str(local), f"{BUCKET}/x/b.bin")  # uploaded, then removed here
  assert not local.exists() and (fake_gcs / "bucket" / "x" / "b.bin").read_bytes() == b"abc"
  paths.replace(f"{BUCKET}/x/b.bin", f"{BUCKET}/x/c.bin")
  assert paths.listdir(f"{BUCKET}/x") == ["a.bin", "c.bin"]
  assert paths.download(f"{BUCKET}/x/c.bin", str(tmp_path / "dl")) == str(tmp_path / "dl" / "c.bin")
  assert (tmp_path / "dl" / "c.bin").read_bytes() == b"abc" and paths.size(f"{BUCKET}/x/c.bin") == 3


def test_a_url_without_its_file_system_package_is_one_line_error(monkeypatch):
  import importlib.util

  from jaxdistill.errors import JaxdistillError

  if importlib.util.find_spec("gcsfs") or importlib.util.find_spec("tensorflow"):
    pytest.skip("gcsfs (or TensorFlow) is installed here")
  monkeypatch.setattr(paths, "_CHECKED", set())
  with pytest.raises(JaxdistillError, match="gs:// paths need the gcsfs package"):
    paths.exists(f"{BUCKET}/run")
