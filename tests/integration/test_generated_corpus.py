"""Distillation with generation on a corpus. ``precompute --generate`` with
``prompts_from=data``: the teacher continues the first tokens of training rows; a student's
training rows are exactly those ids, the prompt carries no loss, an unfinished continuation
teaches no end-of-text, and validation stays the corpus's. ``distill.on_policy`` on the
corpus recipe: the student continues corpus rows inside the step."""

import json

import numpy as np
import pytest
from array_record.python import array_record_module

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill.config import validate
from jaxdistill.data import cached
from jaxdistill.data import text as text_data
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.errors import ConfigError
from jaxdistill.precompute import generate_prompts, generated


def _config(cache_dir, name="data,test"):
  cfg = config_lib.load_config(f"configs/on_policy_corpus.py:{name}")
  cfg.cache_dir = str(cache_dir)
  if name.startswith("data"):
    cfg.teacher.update(source="random", path="")
    cfg.precompute.generate.update(prompts=6, prompts_per_shard=4, max_new_tokens=12)
  return cfg


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  cache = tmp_path_factory.mktemp("cache")
  cfg = _config(cache)
  out = tmp_path_factory.mktemp("gen") / "set"
  result = generated.run(cfg, str(out))
  rows = []
  for s in range(result["shards"]):
    reader = array_record_module.ArrayRecordReader(cached.shard_path(str(out), s))
    rows += [json.loads(r) for r in reader.read_all()]
    reader.close()
  return cfg, out, result, rows


@pytest.mark.slow  # the module's set: ~10 s of tokeniser and teacher
def test_prompts_are_the_first_tokens_of_training_rows(written):
  cfg, out, result, rows = written
  assert result["complete"] and result["rows"] == len(rows) > 0
  prompts = generate_prompts.from_rows(cfg, 6, 8)
  assert all(len(p) == 8 for p in prompts)
  for r in rows:
    assert r["prompt_ids"] == prompts[r["prompt_index"]]
    assert 1 <= len(r["completion_ids"]) <= 12 and r["tokens"] == len(r["completion_ids"])
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["data"]["source"] == "stdlib" and manifest["generate"]["prompts_from"] == "data"


@pytest.mark.slow  # the module's set: ~10 s of tokeniser and teacher
def test_a_student_trains_on_the_ids_with_the_prompt_masked(written):
  cfg, out, _, rows = written
  student = _config(cfg.cache_dir, "seq_kd,test")
  student.data.task_train_files = str(out / "shard-*.arrayrecord")
  validate.validate(student)
  eos = tok_lib.eos_id(text_data.prepare(student).tokenizer)
  batch = next(data_lib.make_iterator(student, "train", process_index=0, process_count=1))
  by_prompt = {tuple(r["prompt_ids"] + r["completion_ids"]): r for r in rows}
  for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
    n = int((weights > 0).sum())
    assert n > 0 and np.all(weights[:7] == 0)  # no loss on the 8 prompt tokens
    tokens = tuple(int(t) for t in inputs[:8]) + tuple(int(t) for t in targets[7 : 7 + n])
    record = by_prompt[tokens]  # exactly the teacher's ids, re-tokenised nowhere
    assert (record["completion_ids"][-1] == eos) == record["finished"]
  # validation is the corpus's held-out split, not the pairs
  val = next(data_lib.make_iterator(student, "validation", process_index=0, process_count=1))
  assert val["weights"][:, :7].sum() > 0


def test_unfinished_ids_get_no_end_of_text():
  from jaxdistill.data import task_data

  # ids are used as they are: no tokenizer call, no end-of-text appended
  row = task_data.encode_row(None, [1, 2, 3], [7, 8], 8)
  assert list(row["inputs"][:4]) == [1, 2, 3, 7] and list(row["targets"][:4]) == [2, 3, 7, 8]
  assert list(row["weights"][:5]) == [0, 0, 1, 1, 0]


@pytest.mark.parametrize(
  "change, key",
  [
    (dict(prompts_from="corpus"), "precompute.generate.prompts_from"),
    (dict(prompt_tokens=0), "precompute.generate.prompt_tokens"),
    (dict(prompt_tokens=32), "precompute.generate.prompt_tokens"),
    (dict(prompts_from="file"), "precompute.generate.prompts_file"),
    (dict(prompts_from="task"), "precompute.generate.prompts_file"),
  ],
)
def test_bad_prompt_settings_are_refused(tmp_path, change, key):
  cfg = _config(tmp_path)
  cfg.precompute.generate.update(**change)
  with pytest.raises(ConfigError) as e:
    generated.check_config(cfg)
  assert e.value.key == key


def test_prompts_from_data_needs_a_corpus(tmp_path):
  cfg = config_lib.load_config("configs/seq_kd.py:data,test")
  cfg.precompute.generate.prompts_from = "data"
  cfg.teacher.update(source="random", path="")
  with pytest.raises(ConfigError, match="not one"):
    generated.check_config(cfg)


def test_training_pairs_need_a_text_source(tmp_path):
  cfg = config_lib.load_config("configs/on_policy_corpus.py:ce,test")
  cfg.data.task_train_files = "x/shard-*.arrayrecord"
  cfg.data.source = "synthetic"
  with pytest.raises(ConfigError) as e:
    validate.validate(cfg)
  assert e.value.key == "data.task_train_files"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gkd", "sampled_rkl"])
def test_on_policy_trains_on_the_corpus(tmp_path, variant):
  """configs/on_policy_corpus.py's on-policy students at test size: the student continues the
  first tokens of corpus rows inside the step (a teacher trained first in WORKDIR/teacher)."""
  from jaxdistill.train import loop

  cfg = config_lib.load_config(f"configs/on_policy_corpus.py:{variant},test")
  cfg.cache_dir = str(tmp_path / "cache")
  cfg.distill.on_policy.baseline = "batch"
  cfg.eval.every = 0
  cfg.log.progress = False
  summary = loop.train(cfg, str(tmp_path / "run"))
  assert np.isfinite(summary["final_loss"])
  assert set(summary["on_policy_split"]) >= {"sample", "teacher", "update"}
  rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  sampled = [r["on_policy/new_tokens"] for r in rows if r.get("on_policy/sampled") == 1.0]
  assert sampled and max(sampled) > 0
