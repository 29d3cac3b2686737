"""Precomputed teacher targets (jaxdistill/precompute/text.py, data/cached.py): exact round trip,
byte-identical resume, --verify, config mismatches, and training from the cache matching a run
with the online teacher restricted to the same top-k targets."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import testing

from jaxdistill.cli import commands as cli
from jaxdistill.config import validate
from jaxdistill.data import cached
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.precompute import text as precompute
from jaxdistill.train import loop


def _config():
  from jaxdistill.config import default_config

  cfg = default_config()
  cfg.student.update(testing.TINY_LM)
  cfg.teacher.update(source="random", **testing.TINY_LM_TEACHER)
  cfg.distill.temperature = 2.0
  cfg.distill.logit.update(kind="topk_tail", weight=0.5)
  cfg.distill.ce.weight = 0.5
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(batch_size=8, seq_len=16, pad_fraction=0.5)
  # 40 rows in shards of 16, 16, 8; f32 log-probs so the online comparison can be tight.
  cfg.precompute.update(targets="both", k=8, samples=6, logprob_dtype="f32", rows=40)
  cfg.precompute.rows_per_shard = 16
  cfg.log.progress = False
  validate.validate(cfg)
  return cfg


def _cache_config(cfg, path, **logit):
  c = cfg.copy_and_resolve_references()
  c.teacher.update(source="cache", path=str(path))
  c.distill.logit.update(**logit)
  validate.validate(c)
  return c


def _shard_bytes(path):
  return {n: (path / n).read_bytes() for n in sorted(os.listdir(path)) if n.startswith("shard-")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  cfg, out = _config(), tmp_path_factory.mktemp("cache")
  # Compiled once, shared by the tests; a 2-device mesh shards the teacher's rows.
  teacher = precompute.build_teacher(cfg, str(out), devices=jax.devices()[:2])
  result = precompute.run(cfg, str(out), teacher=teacher)
  assert result["rows"] == 40 and result["shards"] == 3
  return cfg, out, teacher


@pytest.mark.slow
def test_round_trip_is_exact(cache):
  cfg, out, teacher = cache
  manifest = cached.read_manifest(str(out))
  assert [s["records"] for s in manifest["shards"]] == [16, 16, 8]
  assert manifest["layout"]["k"] == 8 and manifest["dtypes"]["id_dtype"] == "uint16"
  layout = cached.Layout(**manifest["layout"])
  from array_record.python import array_record_module

  records = []
  for s in range(3):
    reader = array_record_module.ArrayRecordReader(cached.shard_path(str(out), s))
    records += [cached.decode(layout, r) for r in reader.read_all()]
    reader.close()
  rows = list(precompute.row_stream(cfg))
  want = []
  with sharding_lib.rules_context(teacher.mesh):  # the batches precompute ran (8 rows each)
    for lo in range(0, 40, 8):
      batch = precompute._host_batch(rows[lo : lo + 8], 8)
      index_B = np.arange(lo, lo + 8, dtype=np.int32)
      out_B = jax.device_get(teacher.fn(teacher.params, batch, index_B))
      want += [{k: v[i] for k, v in out_B.items()} for i in range(8)]
  for record, row, targets in zip(records, rows, want, strict=True):
    for key in precompute.ROW_KEYS:
      np.testing.assert_array_equal(record[key], row[key], err_msg=key)
    for key, value in targets.items():
      np.testing.assert_array_equal(record["teacher_" + key], value, err_msg=key)


def test_encode_decode_bf16_layout():
  layout = cached.Layout(seq_len=4, vocab_size=70000, k=2, samples=3, logprob_dtype="bf16")
  row = {"inputs": np.arange(4), "targets": np.arange(1, 5) + 65536}
  row |= {"segment_ids": np.array([1, 1, 2, 0]), "positions": np.array([0, 1, 0, 0])}
  targets = {
    "topk_ids": np.full((4, 2), 69999),
    "topk_logp": np.full((4, 2), -0.3),
    "tail": np.full(4, 1e-9, np.float32),
    "sample_ids": np.array([[5, 9, 0]] * 4),
    "sample_counts": np.array([[2, 1, 0]] * 4),
  }
  record = cached.encode(layout, row, targets)
  # ids int32 (V > 65536): 4 * (4 + 4 + 2 + 2) row bytes + 4 * (2 * 4 + 2 * 2 + 4) top-k
  # + 2 + 4 * 2 * (4 + 1) sampled (width 2 of 3 stored)
  assert len(record) == 48 + 64 + 2 + 40
  out = cached.decode(layout, record)
  assert out["targets"][3] == 65540 and out["teacher_topk_ids"][0, 0] == 69999
  np.testing.assert_allclose(out["teacher_topk_logp"], -0.3, rtol=4e-3)
  np.testing.assert_array_equal(out["teacher_sample_counts"][0], [2, 1, 0])
  np.testing.assert_array_equal(out["weights"], [1, 1, 1, 0])


@pytest.mark.slow
def test_resume_is_byte_identical_and_skips_finished_shards(cache, tmp_path):
  cfg, out, teacher = cache
  copy = tmp_path / "cache"
  shutil.copytree(out, copy)
  os.remove(cached.shard_path(str(copy), 1))  # killed while writing shard 1 ...
  os.remove(cached.sidecar_path(str(copy), 1))
  (copy / "shard-00001.arrayrecord.partial").write_bytes(b"half a shard")
  os.remove(cached.sidecar_path(str(copy), 2))  # ... or between shard 2's data and sidecar
  os.remove(copy / cached.MANIFEST)
  before = os.stat(cached.shard_path(str(copy), 0)).st_mtime_ns
  result = precompute.run(cfg, str(copy), teacher=teacher)
  assert result["computed_rows"] == 16 + 8
  assert os.stat(cached.shard_path(str(copy), 0)).st_mtime_ns == before
  assert _shard_bytes(copy) == _shard_bytes(out)
  assert (copy / cached.MANIFEST).read_text() == (out / cached.MANIFEST).read_text()
  # Other settings in the same output are refused, not mixed in.
  other = cfg.copy_and_resolve_references()
  other.precompute.k = 4
  with pytest.raises(JaxdistillError, match="other settings"):
    precompute.run(other, str(copy))


@pytest.mark.slow
def test_two_processes_write_the_same_cache(cache, tmp_path):
  """Process 1 of 2 writes shard 1, process 0 shards 0 and 2 and then the manifest: the same
  bytes as one process (here run one after the other, sharing the compiled teacher)."""
  cfg, out, teacher = cache
  second = precompute.run(cfg, str(tmp_path), teacher=teacher, process=(1, 2))
  assert second["computed_rows"] == 16 and not second["complete"]
  assert not (tmp_path / cached.MANIFEST).exists()
  first = precompute.run(cfg, str(tmp_path), teacher=teacher, process=(0, 2))
  assert first["computed_rows"] == 16 + 8 and first["complete"]
  assert _shard_bytes(tmp_path) == _shard_bytes(out)
  assert (tmp_path / cached.MANIFEST).read_text() == (out / cached.MANIFEST).read_text()


@pytest.mark.slow
def test_verify_reports_the_tampered_shard(cache, tmp_path, capsys):
  out = cache[1]
  assert cli.main(["precompute", "--output", str(out), "--verify"]) == 0
  copy = tmp_path / "cache"
  shutil.copytree(out, copy)
  path = cached.shard_path(str(copy), 1)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))
  os.remove(cached.shard_path(str(copy), 2))
  assert cli.main(["precompute", "--output", str(copy), "--verify"]) == 2
  err = capsys.readouterr().err
  assert "shard-00001.arrayrecord has sha256" in err and "shard-00002.arrayrecord is missing" in err
  assert "shard-00000" not in err


@pytest.mark.slow
def test_mismatches_are_config_errors(cache, tmp_path):
  cfg, out, _ = cache
  c = _cache_config(cfg, out)
  c.data.seq_len = 12
  with pytest.raises(ConfigError, match="data.seq_len.*16.*12"):
    cached.check(c)
  copy = tmp_path / "cache"
  shutil.copytree(out, copy)
  manifest = json.loads((copy / cached.MANIFEST).read_text())
  manifest["tokenizer_hash"] = "abc123"
  (copy / cached.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ConfigError, match="data.tokenizer.*abc123"):
    cached.check(_cache_config(cfg, copy))
  c = _cache_config(cfg, out)
  c.distill.hidden.weight = 0.1
  with pytest.raises(ConfigError, match="distill.hidden.weight"):
    validate.validate(c)
  with pytest.raises(ConfigError, match="distill.logit.kind"):
    _cache_config(cfg, out, kind="kl")


def _losses(run, steps):
  out = []
  loop.run_steps(run, steps, lambda step, m, s: out.append(float(m["train/loss"])))
  return out


@pytest.mark.slow
def test_cache_training_matches_online_restricted_teacher(cache):
  """Same batches, same student init: stored targets vs targets made in the step from the
  online teacher's head (same k, temperature): the losses agree."""
  cfg, out, _ = cache
  one = jax.devices()[:1]  # compiles faster; the cache side needs no mesh of its own
  online = loop.build_run(cfg, devices=one)  # 'random': the teacher the cache was made with
  from_cache = loop.build_run(_cache_config(cfg, out), devices=one, create_state=False)
  from_cache.state = jax.tree.map(jax.numpy.copy, online.state)  # the same init, compiled once
  feed = cached.make_iterator(_cache_config(cfg, out), 0, 1)
  online.data_iter = (
    {k: v for k, v in next(feed).items() if not k.startswith("teacher_")} for _ in range(3)
  )
  got, want = _losses(from_cache, 3), _losses(online, 3)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  assert got[0] != got[2]  # it trains


@pytest.mark.slow
def test_cache_iterator_state_resumes_exactly(cache):
  cfg, out, _ = cache
  c = _cache_config(cfg, out)
  it = cached.make_iterator(c, 1, 2)  # process 1 of 2: every other record
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  want = [next(it) for _ in range(4)]  # crosses the end of an epoch (20 records, 4 a batch)
  again = cached.make_iterator(c, 1, 2)
  again.set_state(state)
  for batch, expected in zip([next(again) for _ in range(4)], want):
    assert batch.keys() == expected.keys() and batch["teacher_topk_ids"].shape == (4, 16, 8)
    for key in batch:
      np.testing.assert_array_equal(batch[key], expected[key])
