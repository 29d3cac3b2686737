"""The quickstart end to end at test size, its teacher cache, and the LM configs."""

import contextlib
import io
import json
import os
import types

import numpy as np
import pytest
from conftest import ROOT

from jaxdistill import config as config_lib
from jaxdistill import quickstart
from jaxdistill.errors import JaxdistillError

MODELS = ("teacher", "kd_student", "ce_student")
KEYS = ("val_loss", "val_ppl", "agreement", "kl_to_teacher", "params", "tokens_per_s")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One test-size quickstart through the CLI, ``cli.main`` in this process (starting the
  ``jaxdistill`` command is tests/e2e/test_cli.py's): (workdir, cache dir, its stdout)."""
  from jaxdistill.cli import commands as cli

  tmp = tmp_path_factory.mktemp("quickstart")
  workdir, cache = tmp / "run", tmp / "cache"
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.main(
      ["quickstart", "--size", "test", "--workdir", str(workdir), "--cache_dir", str(cache)]
    )
  assert rc == 0, out.getvalue()[-3000:]
  return workdir, cache, types.SimpleNamespace(stdout=out.getvalue())


@pytest.mark.slow
def test_quickstart_writes_a_valid_report(finished):
  workdir, _, proc = finished
  report = json.loads((workdir / "report.json").read_text())
  for name in MODELS + ("ce_student_equal_time",):
    for key in KEYS:
      assert isinstance(report[name][key], (int, float)), (name, key)
    assert 0 <= report[name]["agreement"] <= 1 and report[name]["kl_to_teacher"] >= 0
    assert report[name]["val_ppl"] == pytest.approx(np.exp(report[name]["val_loss"]), rel=1e-6)
  assert report["teacher"]["params"] > report["kd_student"]["params"]
  assert report["kd_student"]["params"] == report["ce_student"]["params"]
  assert report["summary"]["teacher_cached"] is False
  for name in ("kd_vs_ce_same_steps", "kd_vs_ce_same_time", "teacher_vs_ce"):
    assert report["summary"][name]["outcome"] in ("won", "tie", "lost"), name
  md = (workdir / "report.md").read_text()
  assert "first 0" not in md and "the whole validation split (" in md
  assert "| kd_student |" in md and "validation.png" in md and "quality_latency.png" in md
  assert (workdir / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "| ce_student |" in proc.stdout  # the table is printed too
  rows = [
    json.loads(x) for x in (workdir / "kd_student" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]  # the periodic evaluation
  # The generation section: each LM timed (test size: 16-token prompts, 16 new tokens), and
  # its samples; the evaluations timed the forward only (generation once, all models together).
  gen = report["generation"]
  assert set(gen["rows"]) == set(gen["samples"]) == set(MODELS)  # (report.json sorts keys)
  for name in MODELS:
    row = gen["rows"][name]
    assert row["ttft_s"] > 0 and row["memory_bytes"] > 0, name
    assert row["params"] == report[name]["params"] and row["val_ppl"] == report[name]["val_ppl"]
    assert (row["prompt_tokens"], row["new_tokens"], row["memory_batch"]) == (16, 16, 32), name
    assert set(row["decode_tokens_per_s"]) == {"1", "32"}, name
    assert all(v > 0 for v in row["decode_tokens_per_s"].values()), name
    assert len(gen["samples"][name]) == len(quickstart.PROMPTS), name
    assert all(isinstance(t, str) for t in gen["samples"][name]), name
  assert any(t.strip() for texts in gen["samples"].values() for t in texts)
  section = md[md.index("### Generation") :]
  assert all(section.count(f"- {name}:") == len(quickstart.PROMPTS) for name in MODELS)
  assert "decode tok/s b=32" in section and "Prompt `class`" in section
  timed = json.loads((workdir / "kd_student" / "eval" / "validation.json").read_text())
  assert "batch_32" in timed["latency"]["teacher"] and "generate" not in timed["latency"]["teacher"]


@pytest.mark.slow
def test_teacher_is_cached_and_reused(finished):
  _, cache, _ = finished
  cfg = quickstart.teacher_config("test")
  cfg.cache_dir = str(cache)
  path, cached = quickstart.get_teacher(cfg, log=lambda *_: None)
  assert cached and os.path.isdir(os.path.join(path, "final_params"))
  assert not os.path.exists(os.path.join(path, "checkpoints"))  # only the params are kept
  assert len(os.listdir(os.path.join(cache, "teachers"))) == 1  # no leftover .partial
  cfg.optim.steps += 1  # another teacher: another cache entry
  assert quickstart._cache_key(cfg, _prepared(cfg)) != os.path.basename(path)


@pytest.mark.slow
def test_cache_key_follows_a_changed_default(finished, monkeypatch):
  # A teacher trained under an old default must not be reused after the default changes.
  _, cache, _ = finished
  cfg = quickstart.teacher_config("test")
  cfg.cache_dir = str(cache)
  prepared = _prepared(cfg)
  key = quickstart._cache_key(cfg, prepared)
  recipe = quickstart.recipe()
  original = recipe.default_config

  def changed_default():
    c = original()
    c.optim.min_lr_ratio = 0.5  # the quickstart leaves this at its default
    return c

  monkeypatch.setattr(recipe, "default_config", changed_default)
  assert quickstart._cache_key(quickstart.teacher_config("test"), prepared) != key


def _prepared(cfg):
  """What keys the teacher's data: the corpus and tokenizer hashes."""
  return quickstart._data_identity(cfg)


@pytest.mark.slow
def test_existing_report_is_refused(finished):
  workdir, cache, _ = finished
  before = (workdir / "report.json").read_text()
  with pytest.raises(JaxdistillError, match="already holds a quickstart report"):
    quickstart.run(str(workdir), size="test", cache_dir=str(cache))
  assert (workdir / "report.json").read_text() == before


@pytest.mark.parametrize("name", ["lm_teacher", "lm_distill", "lm_baseline"])
def test_lm_configs_load_and_use_the_builtin_corpus(name):
  path = str(ROOT / "configs" / f"{name}.py")
  cfg = config_lib.load_config(path)
  assert cfg.data.source == "stdlib" and cfg.student.vocab_size == 4096


@pytest.mark.parametrize(
  "name, variant",
  [("lm_teacher", "teacher"), ("lm_distill", "distill"), ("lm_baseline", "baseline")],
)
def test_lm_configs_are_the_recipes_variants(name, variant):
  # The named configs and `configs/quickstart.py:VARIANT` are one recipe, and the job's own
  # stage configs are the same (the distilled student pretrains its teacher standalone).
  named = config_lib.load_config(str(ROOT / "configs" / f"{name}.py"))
  variant_cfg = config_lib.load_config(str(ROOT / "configs" / "quickstart.py") + f":{variant}")
  assert named.to_dict() == variant_cfg.to_dict()
  job = (
    quickstart.teacher_config()
    if variant == "teacher"
    else quickstart.student_config(kd=variant == "distill")
  )
  assert job.to_dict() == named.to_dict()


@pytest.mark.parametrize("variant", ["teacher,test", "distill,test", "baseline,test"])
def test_recipe_test_variants_are_small(variant):
  cfg = config_lib.load_config(str(ROOT / "configs" / "quickstart.py") + f":{variant}")
  assert cfg.data.stdlib_max_files == 8 and cfg.student.vocab_size == 384


def test_unknown_recipe_variant_is_a_config_error():
  with pytest.raises(JaxdistillError, match="teacher, distill, baseline"):
    config_lib.load_config(str(ROOT / "configs" / "quickstart.py") + ":student")


def test_recipe_is_the_configs_file():
  assert quickstart.RECIPE == str(ROOT / "configs" / "quickstart.py")
  assert quickstart.recipe().SIZES.keys() == set(quickstart.SIZES)
