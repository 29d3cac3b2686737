"""The text input pipeline: determinism, exact resume, packing, per-process sharding, the
built-in TFDS corpus, the other sources, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

from jaxdistill import data as data_lib
from jaxdistill.config import default_config
from jaxdistill.data import corpora
from jaxdistill.errors import ConfigError, JaxdistillError

VOCAB = 300  # 256 bytes + EOS + 43 merges: trains in milliseconds on a few KB


def _docs(n=12):
  """Distinct little documents, each well under one row of 32 tokens."""
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
  return [f"doc {i}: {words[i % 8]} {words[(3 * i) % 8]} {i * 7}" for i in range(n)]


def _text_cfg(tmp_path, docs=None, **data):
  path = tmp_path / "train.jsonl"
  if not path.exists():
    text = "\n".join(json.dumps({"text": d}) for d in (docs or _docs()))
    # Enough repeated text for a 300-token BPE; the documents themselves stay short.
    path.write_text(text + "\n" + json.dumps({"text": " ".join(_docs(40)) * 3}) + "\n")
  cfg = default_config()
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.student.update(vocab_size=VOCAB, max_len=32)
  cfg.teacher.update(source="none")
  cfg.distill.logit.weight = 0.0
  cfg.distill.ce.weight = 1.0
  cfg.data.update(source="text", train_files=str(path), eval_files=str(path), batch_size=4)
  cfg.data.update(seq_len=32, shuffle_rows=16)  # a small window: the corpus is tiny
  cfg.data.update(**data)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def _tokenizer_file(tmp_path):
  """A 300-token BPE trained on _text_cfg's data, saved as a run would save it."""
  cfg = _text_cfg(tmp_path)
  data_lib.save_run_files(cfg, str(tmp_path / "tok"))
  return str(tmp_path / "tok" / "tokenizer.json")


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_same_seed_same_batches_and_state_round_trip(tmp_path, packing):
  cfg = _text_cfg(tmp_path, packing=packing)
  first = _take(data_lib.make_iterator(cfg, "train", 0, 1), 6)
  assert _same(first, _take(data_lib.make_iterator(cfg, "train", 0, 1), 6))
  cfg.seed = 1
  assert not _same(first, _take(data_lib.make_iterator(cfg, "train", 0, 1), 6))

  for skip in (0, 5):  # the very start, and mid-document in the second epoch
    it = data_lib.make_iterator(cfg, "train", 0, 1)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 4)
    resumed = data_lib.make_iterator(cfg, "train", 0, 1)
    resumed.set_state(state)
    assert _same(expected, _take(resumed, 4)), skip

  # A state from another pipeline version, or one that does not fit, is a clear error.
  with pytest.raises(JaxdistillError, match="input-pipeline version 99"):
    resumed.set_state({**state, "version": 99})
  with pytest.raises(JaxdistillError, match="does not fit this pipeline"):
    resumed.set_state({**state, "grain": {"unrelated": 1}})


def test_batch_contract_and_packing_layout(tmp_path):
  batch = next(data_lib.make_iterator(_text_cfg(tmp_path), "train", 0, 1))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
    "inputs": ((4, 32), "int32"),
    "targets": ((4, 32), "int32"),
    "weights": ((4, 32), "float32"),
    "segment_ids": ((4, 32), "int32"),
    "positions": ((4, 32), "int32"),
  }
  seg, pos = batch["segment_ids"], batch["positions"]
  np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
  assert (seg.max(axis=1) > 1).any(), "short documents must share rows"
  for r in range(seg.shape[0]):
    for t in range(1, seg.shape[1]):
      if seg[r, t] and seg[r, t] == seg[r, t - 1]:
        assert pos[r, t] == pos[r, t - 1] + 1
        assert batch["inputs"][r, t] == batch["targets"][r, t - 1]  # next-token pairs
      elif seg[r, t]:
        assert pos[r, t] == 0  # positions restart with every document


@pytest.mark.slow
def test_packed_documents_do_not_see_each_other(tmp_path):
  from jaxdistill.models.transformer import Transformer, TransformerConfig

  batch = next(data_lib.make_iterator(_text_cfg(tmp_path), "train", 0, 1))
  row = int(np.argmax(batch["segment_ids"].max(axis=1)))
  b = {k: v[row : row + 1] for k, v in batch.items()}
  model = Transformer(TransformerConfig(VOCAB, 32, 2, 2, 64, 32))
  params = model.init(jax.random.key(0), b["inputs"])
  run = jax.jit(
    lambda tokens: model.apply(
      params, tokens, segment_ids_BxT=b["segment_ids"], positions_BxT=b["positions"]
    )["logits"]
  )
  changed = b["inputs"].copy()
  first = b["segment_ids"] == 1
  changed[first] = (changed[first] + 17) % VOCAB  # rewrite document 1 only
  before, after = np.asarray(run(b["inputs"])), np.asarray(run(changed))
  others = (b["segment_ids"] > 1)[0]
  np.testing.assert_allclose(before[0, others], after[0, others], atol=1e-6)
  assert not np.allclose(before[0, first[0]], after[0, first[0]])


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_an_epoch(tmp_path, count):
  # pad: one short document per row; no row shuffle, so an epoch's rows come out together
  cfg = _text_cfg(tmp_path, packing="pad", shuffle_rows=0)
  cfg.data.tokenizer = _tokenizer_file(tmp_path)
  only_short = tmp_path / "short.jsonl"
  only_short.write_text("\n".join(json.dumps({"text": d}) for d in _docs(12)))
  cfg.data.train_files = str(only_short)
  seen = []
  for index in range(count):
    it = data_lib.make_iterator(cfg, "train", index, count)
    mine, rows = len(range(index, 12, count)), []
    while len(rows) < mine:  # the first epoch of this process's shard
      batch = next(it)
      rows += [tuple(r[s > 0]) for r, s in zip(batch["inputs"], batch["segment_ids"])]
    seen += rows[:mine]
  assert len(seen) == len(set(seen)) == 12  # disjoint, and together every document


def test_validation_is_one_ordered_pass_split_over_processes(tmp_path):
  cfg = _text_cfg(tmp_path)
  whole = list(data_lib.make_iterator(cfg, "validation", 0, 1))
  parts = [list(data_lib.make_iterator(cfg, "validation", i, 2)) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)  # same batch count on every process
  for k in whole[0]:
    glued = np.concatenate([np.concatenate([p[j][k] for p in parts]) for j in range(len(whole))])
    np.testing.assert_array_equal(glued, np.concatenate([w[k] for w in whole]))


def test_stdlib_builder_builds_offline_and_reads_back(tmp_path):
  files = corpora.stdlib_files(max_files=6, max_file_bytes=4000)
  data_dir, name, fp = corpora.build_stdlib(str(tmp_path), max_files=6, max_file_bytes=4000)
  import tensorflow_datasets as tfds

  got = set()
  for split in ("train", "validation"):
    for ex in tfds.data_source(name, split=split, data_dir=data_dir, try_gcs=False):
      got.add((split, ex["path"].decode(), ex["kind"].decode(), ex["text"].decode()))
  want = set()
  for rel, path in files:
    text = open(path, "rb").read().decode("utf-8", errors="replace")
    split = corpora._split_of(rel)
    want.add((split, rel, "code", text))
    if corpora.docstrings(text):
      want.add((split, rel, "docstrings", corpora.docstrings(text)))
  assert got == want and {s for s, *_ in got} == {"train", "validation"}
  marker = os.path.join(data_dir, name.replace("/", os.sep), "1.0.0", "dataset_info.json")
  mtime = os.path.getmtime(marker)
  assert corpora.build_stdlib(str(tmp_path), max_files=6, max_file_bytes=4000)[2] == fp
  assert os.path.getmtime(marker) == mtime  # built once, then reused


def test_stdlib_source_trains_and_saves_a_tokenizer(tmp_path):
  cfg = _text_cfg(tmp_path)
  cfg.data.update(source="stdlib", stdlib_max_files=6, stdlib_max_file_bytes=4000)
  batch = next(data_lib.make_iterator(cfg, "train", 0, 1))
  assert batch["inputs"].max() < VOCAB and batch["weights"].sum() > 0
  data_lib.save_run_files(cfg, str(tmp_path / "run"))
  saved = tmp_path / "run" / "tokenizer.json"
  assert saved.is_file()
  cfg.data.tokenizer = str(saved)  # a later run that points at it reads identical batches
  assert _same([batch], [next(data_lib.make_iterator(cfg, "train", 0, 1))])


def test_array_record_source(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter

  path = str(tmp_path / "docs.array_record")
  writer = ArrayRecordWriter(path, "group_size:1")
  for doc in _docs(12) + [" ".join(_docs(40)) * 3]:
    writer.write(doc.encode())
  writer.close()
  cfg = _text_cfg(tmp_path)
  cfg.data.update(source="array_record", train_files=path, eval_files=path)
  texts = _text_cfg(tmp_path)
  assert _same(
    _take(data_lib.make_iterator(cfg, "train", 0, 1), 3),
    _take(data_lib.make_iterator(texts, "train", 0, 1), 3),
  )


def test_bad_input_is_a_clear_error(tmp_path):
  cfg = _text_cfg(tmp_path)
  cfg.data.train_files = str(tmp_path / "missing-*.txt")
  with pytest.raises(ConfigError, match="data.train_files"):
    data_lib.check(cfg)
  (tmp_path / "empty.txt").write_text("  \n")
  cfg.data.train_files = str(tmp_path / "empty.txt")
  with pytest.raises(ConfigError, match="no text"):
    data_lib.check(cfg)
  with pytest.raises(JaxdistillError, match="no .py files"):
    corpora.build_stdlib(str(tmp_path / "cache"), root=str(tmp_path / "nothing-here"))
  cfg = _text_cfg(tmp_path)
  cfg.data.tokenizer = _tokenizer_file(tmp_path)
  cfg.student.vocab_size = 512
  with pytest.raises(ConfigError, match="student.vocab_size: is 512 but the tokenizer.*300 tokens"):
    data_lib.check(cfg)


def _cli_train(tmp_path, *overrides):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
    "from jaxdistill.config import default_config\n"
    "def get_config():\n"
    "  c = default_config()\n"
    "  c.teacher.source = 'none'; c.distill.logit.weight = 0.0; c.distill.ce.weight = 1.0\n"
    "  c.student.update(vocab_size=300, max_len=32)\n"
    "  c.data.update(source='text', seq_len=32)\n"
    "  return c\n"
  )
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [sys.executable, "-m", "jaxdistill.cli", "train", "--config", str(cfg_file)]
    + ["--workdir", str(workdir), f"--config.cache_dir={tmp_path / 'cache'}", *overrides],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert not workdir.exists()  # nothing written
  return lines[0]


@pytest.mark.slow
def test_cli_refuses_bad_data_and_writes_nothing(tmp_path):
  assert "matches no file" in _cli_train(tmp_path, f"--config.data.train_files={tmp_path}/no.txt")
  line = _cli_train(
    tmp_path,
    f"--config.data.train_files={tmp_path}/train.jsonl",
    f"--config.data.tokenizer={_tokenizer_file(tmp_path)}",
    "--config.student.vocab_size=64",
  )
  assert "student.vocab_size" in line and "300 tokens" in line


class _DocIdTokenizer:
  """Every character of document k -> token 10 + k (k: its first character), so a row's tokens
  name the documents it came from; the end-of-document token is 1."""

  def encode_batch(self, texts):
    return [type("Encoding", (), {"ids": [10 + int(t[0])] * len(t)}) for t in texts]

  def token_to_id(self, name):
    return 1 if name == "<|endoftext|>" else None


def _long_doc_stream(interleave, shuffle_rows=0, seq_len=8, docs=8, rows_per_doc=12):
  """The training stream of ``docs`` documents of exactly ``rows_per_doc`` rows each, batches
  of 4."""
  from jaxdistill.data import text as pipeline

  texts = [str(k) * rows_per_doc * seq_len for k in range(docs)]  # inputs: the text's tokens
  cfg = default_config()
  cfg.data.update(seq_len=seq_len, batch_size=4, shuffle_rows=shuffle_rows, interleave=interleave)
  prepared = pipeline.Prepared(texts, "fp", _DocIdTokenizer(), "", "")
  return pipeline.LMIterator(pipeline.train_dataset(cfg, prepared, 0, 1), prepared)


def _doc_ids(batch):
  """[B] sets of the documents each row holds."""
  return [set((row[row >= 10] - 10).tolist()) for row in batch["inputs"]]


def test_interleaved_streams_mix_long_documents_and_cover_an_epoch():
  # One stream, no window: a batch of 4 rows is 4 rows of one long document.
  assert all(len(set().union(*_doc_ids(b))) == 1 for b in _take(_long_doc_stream(0), 5))
  # Four streams: every batch holds four documents, one row each.
  batches = _take(_long_doc_stream(4), 24)
  assert all(sorted(len(r) for r in _doc_ids(b)) == [1] * 4 for b in batches)
  assert all(len(set().union(*_doc_ids(b))) == 4 for b in batches)
  # The streams read disjoint documents: the first 96 rows are the 8 documents, 12 rows each.
  counts = np.bincount(np.concatenate([b["inputs"][b["inputs"] >= 10] for b in batches]) - 10)
  np.testing.assert_array_equal(counts, [12 * 8] * 8)


@pytest.mark.parametrize("shuffle_rows", [0, 8])
def test_interleaved_streams_resume_exactly(shuffle_rows):
  first = _take(_long_doc_stream(3, shuffle_rows), 12)
  assert _same(first, _take(_long_doc_stream(3, shuffle_rows), 12))  # deterministic
  for skip in (0, 7):  # the start; mid-document, streams at different documents
    it = _long_doc_stream(3, shuffle_rows)
    _take(it, skip)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    resumed = _long_doc_stream(3, shuffle_rows)
    resumed.set_state(state)
    assert _same(first[skip : skip + 5], _take(resumed, 5)), skip
  # A state saved with another number of streams does not fit: a clear error, not a new stream.
  with pytest.raises(JaxdistillError, match="does not fit this pipeline"):
    _long_doc_stream(0, shuffle_rows).set_state(state)


def test_interleave_with_the_real_tokenizer_resumes(tmp_path):
  cfg = _text_cfg(tmp_path, interleave=3)
  it = data_lib.make_iterator(cfg, "train", 0, 1)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = data_lib.make_iterator(cfg, "train", 0, 1)
  resumed.set_state(state)
  assert _same(expected, _take(resumed, 4))


@pytest.mark.parametrize("bad", [-1, 5000])
def test_bad_interleave_is_a_clear_error(bad):
  from jaxdistill.config import validate

  cfg = default_config()
  cfg.data.interleave = bad
  with pytest.raises(ConfigError, match=r"data.interleave.*is %d" % bad):
    validate.validate(cfg)
