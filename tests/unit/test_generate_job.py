"""`jaxdistill generate` in process: a tiny hand-made run (no training), the .jsonl output and its
resume after a kill, the teacher, and every bad input as one `error:` line (exit 2)."""

import json

import jax
import pytest
import testing
from conftest import ROOT

from jaxdistill import models
from jaxdistill.cli import commands as cli
from jaxdistill.generate import job, output
from jaxdistill.parallel import precision

VOCAB = 300  # a byte-level BPE needs >= 257
PROMPTS = ["def add(a, b):", "", "class Model:", "import numpy as np", "return x + 1", "for i in"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A finished-looking run: config.json, tokenizer.json and the student's final_params."""
  from jaxdistill.config import default_config
  from jaxdistill.data import tokenizer as tok_lib
  from jaxdistill.train import checkpoint

  work = tmp_path_factory.mktemp("generate") / "run"
  work.mkdir()
  cfg = default_config()
  cfg.student.update(testing.TINY_LM, vocab_size=VOCAB, max_len=32)
  cfg.teacher.update(source="random", **dict(testing.TINY_LM_TEACHER, vocab_size=VOCAB, max_len=32))
  cfg.data.update(seq_len=16, batch_size=4)
  (work / "config.json").write_text(cfg.to_json_best_effort(indent=2, sort_keys=True))
  corpus = [p.read_text() for p in sorted((ROOT / "jaxdistill" / "generate").glob("*.py"))]
  tok_lib.train_bpe(corpus, VOCAB).save(str(work / "tokenizer.json"))
  module = models.build(cfg.student, precision.Policy(), "student")
  params = jax.tree.map(jax.numpy.asarray, testing.host_variables(module)["params"])
  checkpoint.save_params(str(work / "final_params"), params)
  (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  return work


def _args(run_dir, *extra):
  return ["generate", "--workdir", str(run_dir), "--prompts", str(run_dir / "prompts.txt"), *extra]


SAMPLED = ("--temperature", "1.0", "--top_k", "50", "--seed", "3", "--max_new_tokens", "6")


def _rows(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_prints_and_writes_rows_in_request_order(run_dir, tmp_path, capsys):
  assert cli.main(_args(run_dir, "--max_new_tokens", "4")) == 0
  shown = capsys.readouterr().out
  assert shown.count("# prompt ") == 5 and "def add(a, b):" in shown and "done: 5" in shown
  out = tmp_path / "out.jsonl"
  args = _args(run_dir, *SAMPLED, "--num_samples", "2", "--logprobs", "--batch_size", "4")
  assert cli.main([*args, "--output", str(out)]) == 0
  rows = _rows(out)
  assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [
    (p, s) for p in range(5) for s in range(2)
  ]
  assert rows[0]["prompt"] == "def add(a, b):" and rows[2]["prompt"] == "class Model:"
  for r in rows:
    assert len(r["token_ids"]) == len(r["logprobs"]) and r["stop_reason"] in ("stop", "length")
    assert all(lp <= 0 for lp in r["logprobs"])
  assert rows[0]["token_ids"] != rows[1]["token_ids"]  # two samples of one prompt differ
  meta = json.loads((tmp_path / ("out.jsonl" + output.META_SUFFIX)).read_text())
  assert meta["rows"] == 10 and meta["settings"]["num_samples"] == 2
  capsys.readouterr()
  # Same arguments again: nothing to do, nothing rewritten.
  before = out.read_bytes()
  assert cli.main([*args, "--output", str(out)]) == 0
  assert "nothing to do" in capsys.readouterr().out and out.read_bytes() == before


def test_a_killed_run_resumes_without_duplicates(run_dir, tmp_path, capsys):
  args = _args(run_dir, *SAMPLED, "--num_samples", "2", "--batch_size", "4")
  whole = tmp_path / "whole.jsonl"
  assert cli.main([*args, "--output", str(whole)]) == 0
  complete = whole.read_bytes()
  lines = complete.splitlines(keepends=True)
  # Killed mid-line in the second batch, and killed between batches (a partial batch written).
  for cut in (sum(map(len, lines[:5])) + len(lines[5]) // 2, sum(map(len, lines[:3]))):
    part = tmp_path / f"part{cut}.jsonl"
    part.write_bytes(complete[:cut])
    meta = output.META_SUFFIX
    (tmp_path / f"part{cut}.jsonl{meta}").write_bytes(
      (tmp_path / f"whole.jsonl{meta}").read_bytes()
    )
    capsys.readouterr()
    # A different batch size is fine (it does not change the rows); a different seed is not.
    assert cli.main([*args, "--batch_size", "2", "--output", str(part)]) == 0
    assert "rows were already there" in capsys.readouterr().out
    assert part.read_bytes() == complete
  assert cli.main([*args, "--seed", "4", "--output", str(part)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "other settings" in err and "seed" in err
  assert part.read_bytes() == complete


def test_teacher_greedy_and_from_data(run_dir, capsys):
  args = ["generate", "--workdir", str(run_dir), "--from_data", "3", "--prompt_tokens", "5"]
  summary = job.run(
    job.Request(workdir=str(run_dir), from_data=3, prompt_tokens=5, max_new_tokens=3)
  )
  assert summary["rows"] == 3 and summary["tokens"] == 9
  capsys.readouterr()
  assert cli.main([*args, "--which", "teacher", "--max_new_tokens", "2"]) == 0
  out = capsys.readouterr().out
  assert "teacher.source='random'" in out and out.count("# prompt ") == 3


def _error(argv, capsys):
  capsys.readouterr()
  assert cli.main(argv) == 2, argv
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def test_bad_input_is_one_line(run_dir, tmp_path, capsys):
  prompts = str(run_dir / "prompts.txt")
  base = ["generate", "--workdir", str(run_dir)]
  blank = tmp_path / "blank.txt"
  blank.write_text("\n  \n")
  long = tmp_path / "long.txt"
  long.write_text("ok\n" + "word " * 40 + "\n")
  cases = {
    (*base,): "exactly one of --prompts",
    ("generate", "--prompts", prompts): "exactly one model",
    (*base, "--model", "smoke", "--prompts", prompts): "exactly one model",
    (*base, "--prompts", str(tmp_path / "nope.txt")): "nope.txt",
    (*base, "--prompts", str(blank)): "holds no prompt",
    (*base, "--prompts", str(long)): "line 2",
    (*base, "--prompts", prompts, "--stop", "not one token at all"): "not a single token",
    (*base, "--prompts", prompts, "--stop", str(VOCAB)): f"[0, {VOCAB})",
    (*base, "--prompts", prompts, "--top_p", "1.5"): "--top_p must be in (0, 1]",
    (*base, "--prompts", prompts, "--temperature", "-1"): "--temperature must be >= 0",
    (*base, "--prompts", prompts, "--max_new_tokens", "0"): "--max_new_tokens 0",
    ("generate", "--workdir", str(tmp_path), "--prompts", prompts): "not a jaxdistill run",
    ("generate", "--model", "nope", "--prompts", prompts): "neither a Hugging Face",
    ("generate", "--model", "smoke", "--which", "teacher", "--prompts", prompts): "--workdir",
    (*base, "--prompts", prompts, "--draft", str(tmp_path)): "--draft",
  }
  for argv, message in cases.items():
    assert message in _error(list(argv), capsys), argv
  assert "max_len" in _error([*base, "--prompts", str(long)], capsys)


def test_encoders_and_image_classifiers_are_refused(tmp_path, capsys):
  bert = ROOT / "tests" / "fixtures" / "hf" / "bert_tiny"
  (tmp_path / "p.txt").write_text("hello\n")
  argv = ["generate", "--model", str(bert), "--prompts", str(tmp_path / "p.txt")]
  assert "is an encoder (bert)" in _error(argv, capsys)
  argv = ["generate", "--model", "smoke_vision", "--prompts", str(tmp_path / "p.txt")]
  assert "image classifier" in _error(argv, capsys)


def test_an_existing_file_that_is_not_ours_is_never_touched(run_dir, tmp_path, capsys):
  mine = tmp_path / "mine.jsonl"
  mine.write_text('{"my": "data"}\n')
  err = _error([*_args(run_dir, "--max_new_tokens", "2"), "--output", str(mine)], capsys)
  assert "not written by jaxdistill generate" in err
  assert mine.read_text() == '{"my": "data"}\n'


def test_draft_goes_through_the_speculative_sampler(run_dir, capsys):
  # The run's student drafting for itself: greedy drafts are always accepted, so every target
  # forward yields k + 1 tokens except where a row stops early, and the rows are plain greedy.
  plain = _args(run_dir, "--max_new_tokens", "6")
  assert cli.main(plain) == 0
  greedy = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("done")]
  argv = _args(run_dir, "--draft", str(run_dir), "--draft_k", "3", "--max_new_tokens", "6")
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "acceptance rate 100.0% (k=3)" in out, out
  assert [line for line in out.splitlines() if line.startswith("#") or line.startswith(" ")] == [
    line for line in greedy if line.startswith("#") or line.startswith(" ")
  ]
