"""Behaviour is unchanged: small runs reproduce their recorded metrics and params bit for bit,
and a checkpoint written by an earlier main (tests/fixtures/ckpt_main) still restores.

The records (tests/golden/golden.json) and how to re-record them: tests/golden/cases.py.
"""

import json
import shutil

import pytest
from conftest import ROOT
from golden import cases

with open(cases.GOLDEN, encoding="utf-8") as f:
  GOLDEN = json.load(f)

# Steps 3 and 4 of the fixture's run, resumed from its step-2 checkpoint (train/loss reprs).
RESUMED = {3: "2.7929751873016357", 4: "2.777278423309326"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_run_reproduces_golden_metrics_and_params(name):
  got = cases.run_case(name)
  want = GOLDEN[name]
  assert len(got["steps"]) == len(want["steps"])
  for step, (g, w) in enumerate(zip(got["steps"], want["steps"]), 1):
    assert g == w, f"{name}: step {step} differs from tests/golden/golden.json"
  assert got["params"] == want["params"], f"{name}: final params differ"


@pytest.mark.slow
def test_checkpoint_of_an_earlier_main_restores_and_continues(tmp_path):
  import jax

  from jaxdistill import config as config_lib
  from jaxdistill.train import loop, metrics

  work = tmp_path / "run"
  shutil.copytree(ROOT / "tests" / "fixtures" / "ckpt_main", work)
  overrides = dict(
    student__d_model="32",
    student__d_ff="64",
    optim__steps="4",
    ckpt__every="2",
    ckpt__async_save="false",
    log__progress="false",
    mesh__data="2",
  )
  cfg = config_lib.load_config(
    str(ROOT / "configs" / "smoke.py"), [(k.replace("__", "."), v) for k, v in overrides.items()]
  )
  with pytest.warns(UserWarning, match=r"config differs .* in \['optim.steps'\] \(harmless\)"):
    summary = loop.train(cfg, str(work), devices=jax.devices()[:2])
  assert summary["start_step"] == 2 and summary["last_step"] == 4
  rows = {r["step"]: repr(r["train/loss"]) for r in metrics.read_jsonl(str(work / "metrics.jsonl"))}
  assert {s: rows[s] for s in RESUMED} == RESUMED
