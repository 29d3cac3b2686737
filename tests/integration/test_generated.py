"""precompute --generate: shards split over processes and resumed give the same rows, filters
count what they drop, the set verifies and trains a student; bad settings are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from array_record.python import array_record_module

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill.data import cached
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.precompute import generated

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(cache_dir, **gen):
  cfg = config_lib.load_config("configs/seq_kd.py:data_unverified,test")
  cfg.cache_dir = str(cache_dir)
  cfg.teacher.update(source="random", path="")
  cfg.precompute.generate.update(
    prompts=12, prompts_per_shard=4, samples=2, max_new_tokens=8, require_stop=False, **gen
  )
  return cfg


def _rows(output):
  rows = []
  for s in range(3):
    reader = array_record_module.ArrayRecordReader(cached.shard_path(str(output), s))
    rows += [json.loads(r) for r in reader.read_all()]
    reader.close()
  return rows


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
  out = tmp_path_factory.mktemp("whole") / "set"
  cfg = _config(tmp_path_factory.mktemp("cache"), dedup="none")
  result = generated.run(cfg, str(out))
  return cfg, out, result


def test_processes_and_a_resumed_run_write_the_same_rows(whole, tmp_path):
  cfg, out, result = whole
  assert result["complete"] and result["rows"] == 24 and result["written"] == 3
  rows = _rows(out)
  assert [(r["prompt_index"], r["sample"]) for r in rows] == [
    (i, j) for i in range(12) for j in (0, 1)
  ]
  # Process 1 of 2 writes shard 1 only; a crash leaves shard 2 half written; a rerun as one
  # process writes shards 0 and 2: the rows are the uninterrupted run's, none twice.
  split = tmp_path / "split"
  assert not generated.run(cfg, str(split), process=(1, 2))["complete"]
  assert sorted(os.listdir(split)) == sorted(
    ["settings.json", *(os.path.basename(cached.shard_path(str(split), 1)) + e for e in ("",)),
     os.path.basename(cached.sidecar_path(str(split), 1))]
  )  # fmt: skip
  open(cached.shard_path(str(split), 2) + ".partial", "wb").write(b"junk")
  again = generated.run(cfg, str(split))
  assert again["complete"] and again["written"] == 2
  assert _rows(split) == rows
  assert generated.verify(str(split)) == {"shards": 3, "rows": 24}
  manifest = json.loads((split / "manifest.json").read_text())
  assert manifest["kind"] == "generated" and manifest["rows"] == 24
  with open(cached.shard_path(str(split), 1), "ab") as f:
    f.write(b"x")
  with pytest.raises(JaxdistillError, match="shard-00001"):
    generated.verify(str(split))


def test_the_verifier_and_dedup_drops_are_counted(whole, tmp_path):
  cfg, out, _ = whole
  rows = _rows(out)
  c = cfg.copy_and_resolve_references()
  c.precompute.generate.update(verifier="testing:keep_even", dedup="exact")
  result = generated.run(c, str(tmp_path / "kept"))
  seen, dup, odd = set(), 0, 0
  for r in rows:
    key = (r["prompt_index"], r["completion"])
    if key in seen:
      dup += 1
    elif len(r["completion"]) % 2:
      odd += 1
    else:
      seen.add(key)
  assert result["drops"]["duplicate"] == dup and result["drops"]["verifier"] == odd
  assert result["rows"] == len(rows) - dup - odd
  kept = _rows(tmp_path / "kept")
  assert all(len(r["completion"]) % 2 == 0 for r in kept)


def test_a_student_trains_on_the_set_and_a_bad_setting_is_refused(whole, tmp_path):
  cfg, out, _ = whole
  student = config_lib.load_config("configs/seq_kd.py:student,test")
  student.cache_dir = cfg.cache_dir
  student.data.task_train_files = str(out / "shard-*.arrayrecord")
  batch = next(data_lib.make_iterator(student, "train"))
  assert batch["weights"].sum() > 0 and batch["inputs"].shape == (8, 80)
  bad = {
    "precompute.generate.verifier": ("nope.module:f", "does not import"),
    "precompute.generate.samples": (0, ">= 1"),
    "precompute.generate.dedup": ("fuzzy", "none, exact or near"),
    "teacher.source": ("none", "decoder teacher"),
  }
  for key, (value, message) in bad.items():
    c = cfg.copy_and_resolve_references()
    section, leaf = key.rsplit(".", 1)
    node = c
    for part in section.split("."):
      node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message):
      generated.run(c, str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_rows(whole, tmp_path):
  cfg, out, _ = whole
  target = tmp_path / "killed"
  overrides = [
    "--config.teacher.source=random", "--config.teacher.path=",
    f"--config.cache_dir={cfg.cache_dir}",
    "--config.precompute.generate.prompts=12", "--config.precompute.generate.prompts_per_shard=4",
    "--config.precompute.generate.samples=2", "--config.precompute.generate.max_new_tokens=8",
    "--config.precompute.generate.require_stop=false", "--config.precompute.generate.dedup=none",
  ]  # fmt: skip
  config = "configs/seq_kd.py:data_unverified,test"
  argv = [sys.executable, "-m", "jaxdistill.cli", "precompute", "--generate", "--config", config,
          "--output", str(target), *overrides]  # fmt: skip
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = cached.sidecar_path(str(target), 0)
  deadline = time.time() + 240
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.exists(first), "the run ended before its first shard"
  assert generated.run(cfg, str(target))["complete"]
  assert _rows(target) == _rows(out)


K = 4


@pytest.mark.slow
def test_topk_targets_are_the_teachers_and_a_student_trains_on_them(whole, tmp_path, capsys):
  import jax
  import numpy as np

  from jaxdistill import models
  from jaxdistill.cli import commands as cli
  from jaxdistill.data import task_data
  from jaxdistill.data import text as text_data
  from jaxdistill.parallel import sharding as sharding_lib
  from jaxdistill.train import loop
  from jaxdistill.train import run as run_lib
  from jaxdistill.train import teacher as teacher_lib

  cfg, _, _ = whole
  out = tmp_path / "topk"
  overrides = [
    "--config.teacher.source=random", "--config.teacher.path=",
    f"--config.cache_dir={cfg.cache_dir}",
    "--config.precompute.generate.prompts=12", "--config.precompute.generate.prompts_per_shard=4",
    "--config.precompute.generate.samples=2", "--config.precompute.generate.max_new_tokens=8",
    "--config.precompute.generate.require_stop=false", "--config.precompute.generate.dedup=none",
  ]  # fmt: skip
  argv = ["precompute", "--generate", "--config", "configs/seq_kd.py:data_unverified,test",
          "--topk", str(K), "--output", str(out), *overrides]  # fmt: skip
  assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
  rows = _rows(out)
  assert len(rows) == 24
  # The teacher's top-k recomputed on each training row, in float64 from its full logits.
  tokenizer = text_data.prepare(cfg).tokenizer
  teacher = run_lib.model_of(cfg, "teacher")
  mesh = sharding_lib.make_mesh(cfg.mesh, jax.local_devices())
  variables, _, _ = teacher_lib.load(cfg, teacher, mesh, str(tmp_path), 0)
  variables = jax.device_get(variables)
  tau = cfg.precompute.temperature or cfg.distill.temperature
  encoded = [
    task_data.encode_row(tokenizer, r["prompt"], r["completion"], cfg.data.seq_len) for r in rows
  ]
  batch = {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}
  logits = np.asarray(models.apply(teacher, variables, batch)["logits"], np.float64) / tau
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  for r, e, lp in zip(rows, encoded, logp):
    at = np.flatnonzero(e["weights"] > 0)
    stored = task_data.targets_of(r)  # the floats are bf16 bytes (precompute.logprob_dtype)
    assert r["topk_logp"]["dtype"] == "bf16" and stored["topk_logp"].shape == (len(at), K)
    assert len(r["topk_ids"]) == len(at) == len(stored["tail"])
    ids = np.argsort(-lp[at], axis=-1, kind="stable")[:, :K]
    np.testing.assert_array_equal(r["topk_ids"], ids)
    want = np.take_along_axis(lp[at], ids, axis=-1)
    np.testing.assert_allclose(stored["topk_logp"], want, rtol=2**-8, atol=1e-5)
    np.testing.assert_allclose(stored["tail"], 1 - np.exp(want).sum(-1), rtol=2**-8, atol=1e-5)

  # A student trains token-level KD on them: the rows carry the targets at the completion only.
  student = config_lib.load_config("configs/on_policy.py:token_kd,test")
  student.cache_dir = cfg.cache_dir
  student.teacher.update(source="cache", path=str(out))
  student.distill.logit.kind = "topk_renorm"
  student.precompute.k = K
  student.optim.steps = 2
  student.eval.every = 0
  student.log.progress = False
  data_lib.check(student)
  b = next(data_lib.make_iterator(student, "train"))
  assert b["teacher_topk_ids"].shape == (8, student.data.seq_len, K)
  prompt = b["weights"] == 0
  assert prompt.any() and not b["teacher_topk_logp"][prompt].any()
  assert (b["teacher_topk_logp"][~prompt] < 0).all()
  summary = loop.train(student, str(tmp_path / "student"))
  assert np.isfinite(summary["final_loss"]) and summary["final_loss"] > 0
  metrics = [
    json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
  ]
  assert all(np.isfinite(m["distill/topk_renorm"]) for m in metrics if "distill/topk_renorm" in m)
  # A config that does not fit the set is refused, naming the key.
  for key, value in (("precompute.k", K + 1), ("distill.logit.kind", "sampled")):
    bad = student.copy_and_resolve_references()
    bad.update_from_flattened_dict({key: value})
    with pytest.raises(ConfigError) as e:
      data_lib.check(bad)
    assert e.value.key == key
