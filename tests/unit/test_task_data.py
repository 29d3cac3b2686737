"""data.source=task: rows weigh only the completion, the stream resumes exactly, pair files are
read and checked, and the exact-match metric counts checked answers."""

import json
import types

import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill.config import validate
from jaxdistill.data import task_data, tasks
from jaxdistill.data import text as text_data
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.evaluation import task_accuracy


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  cfg = config_lib.load_config("configs/on_policy.py:gkd,test")
  cfg.cache_dir = str(tmp_path_factory.mktemp("cache"))
  return cfg


@pytest.fixture(scope="module")
def tok(cfg):
  return text_data.prepare(cfg).tokenizer


def test_a_row_weighs_its_completion_and_end_of_text_only(tok):
  row = task_data.encode_row(tok, "12+9=", "2+9=11 c1;1+0+1=2 c0;=21\n", 40)
  n_prompt, n_completion = 5, len("2+9=11 c1;1+0+1=2 c0;=21\n") + 1  # one token a character
  assert tok.get_vocab_size() == 257
  assert row["weights"].sum() == n_completion
  assert row["weights"][: n_prompt - 1].sum() == 0 and row["weights"][n_prompt - 1] == 1
  weighted = row["targets"][row["weights"] > 0].tolist()
  assert tok.decode(weighted[:-1]) == "2+9=11 c1;1+0+1=2 c0;=21\n"
  assert weighted[-1] == tok.token_to_id("<|endoftext|>")
  n = n_prompt + n_completion - 1
  assert row["segment_ids"].tolist() == [1] * n + [0] * (40 - n)
  np.testing.assert_array_equal(row["inputs"][1:n], row["targets"][: n - 1])
  with pytest.raises(JaxdistillError, match="data.seq_len"):
    task_data.encode_row(tok, "1234+5678=", "x", 10)


def test_the_stream_resumes_exactly_and_processes_split_it(cfg):
  it = data_lib.make_iterator(cfg, "train")
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(2)]
  again = data_lib.make_iterator(cfg, "train")
  again.set_state(state)
  for a, b in zip(want, [next(again) for _ in range(2)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  halves = [data_lib.make_iterator(cfg, "train", p, 2) for p in (0, 1)]
  one = data_lib.make_iterator(cfg, "train")
  whole = next(one)["inputs"]
  np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), whole)
  with pytest.raises(JaxdistillError, match="not a task stream"):
    again.set_state({"index": 3})


def test_validation_is_the_held_out_problems_once(cfg, tok):
  batches = list(data_lib.make_iterator(cfg, "validation"))
  rows = np.concatenate([b["inputs"] for b in batches])
  assert len(rows) == cfg.data.task_eval_problems  # 16 problems, 2 full batches of 8
  first = tasks.problem(cfg.data.task_seed, "validation", 0)
  assert tok.decode(rows[0][rows[0] > 0].tolist()).startswith(first.prompt + first.completion[:5])


def test_pair_files_train_instead_and_bad_ones_are_named(cfg, tmp_path):
  good = tmp_path / "pairs.jsonl"
  good.write_text(
    "\n".join(
      json.dumps({"prompt": f"{i}+1=", "completion": f"{i}+1={i + 1} c0;={i + 1}\n"})
      for i in range(5)
    )
  )
  c = cfg.copy_and_resolve_references()
  c.data.task_train_files = str(good)
  batch = next(data_lib.make_iterator(c, "train"))
  tok = text_data.prepare(c).tokenizer
  texts = {tok.decode(r[r > 0].tolist()).split("=")[0] for r in batch["inputs"]}
  assert texts <= {f"{i}+1" for i in range(5)} and len(texts) == 5  # an epoch of the 5 pairs
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "1+1="}\n')
  with pytest.raises(ConfigError, match="bad.jsonl:1"):
    task_data.read_pairs(str(bad))
  with pytest.raises(ConfigError) as e:
    task_data.read_pairs(str(tmp_path / "none-*.jsonl"))
  assert e.value.key == "data.task_train_files"
  c.data.task = "sorting"
  with pytest.raises(ConfigError) as e:
    validate.validate(c)
  assert e.value.key == "data.task"


def test_exact_match_counts_checked_answers(cfg, tok, monkeypatch):
  problems = tasks.problems(cfg.data.task_seed, "validation", 4)

  class Stub:  # answers problems 0 and 2 right, 1 with a wrong sum, 3 with no answer at all
    def __init__(self, *args, **kwargs):
      pass

    def generate(self, prompts, **kwargs):
      assert kwargs["stop_tokens"] == [tok.token_to_id("<|endoftext|>")]
      texts = [problems[0].completion, ";=1\n", problems[2].completion, "7+"]
      return [types.SimpleNamespace(text=t) for t in texts]

  monkeypatch.setattr(task_accuracy, "Sampler", Stub)
  model = types.SimpleNamespace(config=types.SimpleNamespace(max_len=80))
  out = task_accuracy.exact_match(model, {}, tok, cfg, count=4)
  assert out["exact_match"] == 0.5 and out["answered"] == 0.75 and out["problems"] == 4
  assert out["samples"][0] == [problems[0].prompt, problems[0].completion]


def test_the_task_quickstart_table_has_a_row_per_model():
  from jaxdistill import task_quickstart

  rows = {
    "teacher": {"val_loss": 0.01, "exact_match": 0.98, "samples": [["1+2=", "1+2=3 c0;=3\n"]]},
    "token_kd": {"val_loss": 0.5, "exact_match": 0.25, "agreement": 0.9, "train_s": 12.0},
  }
  md = task_quickstart.table_md(rows, {"rows": 40, "verifier": 3, "unfinished": 0}, 90.0)
  assert "| teacher | 0.010 | 98.0% | — | — | — |" in md
  assert "| token_kd | 0.500 | 25.0% | 0.900 | — | 12 |" in md
  assert "40 verified samples kept (dropped: verifier 3)" in md
  assert "- teacher: `1+2=` -> `1+2=3 c0;=3`" in md


@pytest.mark.parametrize("dtype, rtol", [("bf16", 2**-8), ("f16", 2**-11), ("f32", 0.0)])
def test_stored_floats_round_trip_in_their_dtype(dtype, rtol):
  """A generated record's top-k floats: binary in precompute.logprob_dtype inside the JSON
  record (through json as written), back as float32 within the dtype's rounding; plain lists
  (older sets) still read."""
  rng = np.random.default_rng(0)
  logp = -np.abs(rng.normal(size=(7, 4)) * 5).astype(np.float32)
  tail = rng.random(7).astype(np.float32)
  record = json.loads(
    json.dumps(
      {"prompt": "1+2=", "completion": "3", "topk_ids": [[0, 1, 2, 3]] * 7,
       "topk_logp": task_data.pack_floats(logp, dtype),
       "topk_tail": task_data.pack_floats(tail, dtype)}
    )
  )  # fmt: skip
  out = task_data.targets_of(record)
  assert out["topk_logp"].dtype == np.float32 and out["topk_logp"].shape == (7, 4)
  np.testing.assert_allclose(out["topk_logp"], logp, rtol=rtol, atol=0)
  np.testing.assert_allclose(out["tail"], tail, rtol=rtol, atol=0)
  if dtype == "bf16":  # what storing binary buys: 2 bytes a value, base64
    assert len(record["topk_logp"]["b64"]) < len(json.dumps(logp.tolist())) / 4
  old = dict(record, topk_logp=logp.tolist(), topk_tail=tail.tolist())
  np.testing.assert_array_equal(task_data.targets_of(old)["topk_logp"], logp)
