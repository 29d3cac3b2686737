"""Behaviour is unchanged: small runs reproduce their recorded metrics and params within float32
rounding, a case run twice in one process is bit for bit the same, and a checkpoint written by
an earlier main (tests/fixtures/ckpt_main) still restores.

The records (tests/golden/golden.json) and how to re-record them: tests/golden/cases.py.

Tolerances. The records were made on one machine; XLA compiles different code for another
processor (AVX2 vs AVX-512 vectorise a reduction in a different order), so float32 sums differ
in their last bits: relative 5e-7 on the first step's losses between two AMD EPYCs, growing
over a few optimizer steps. ``tests/golden/cases.py --dump`` with ``--xla_cpu_max_isa=AVX2``
against the native AVX-512 build measures that spread on one machine (``ISA_SPREAD`` below).
Measured (2026-12-06, 2-core AMD EPYC with AVX-512): the records of an earlier main made on
another EPYC against this one, and AVX2 against AVX-512 code here, differ by at most 7% of the
metric tolerance (fp16_loss_scale's grad_norm, 7e-6 relative) and 4% of the params tolerance.
The tolerances are thus over 10x the largest measured spread, and far below what a real change
moves: a changed default, loss weight, normalisation or update moves these metrics by 1e-3
relative or more.
  metrics: math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL); ATOL covers the feature losses
           near 1e-4, whose relative rounding is larger (3e-5 measured)
  params:  per leaf, each of sum, sum |x|, l2 and the +-1 dot within RTOL_PARAMS x the leaf's
           sum |x| + ATOL_PARAMS. The absolute part is for leaves whose gradient is zero in exact
           arithmetic, so that what moves them is rounding alone (an attention key bias: the
           softmax ignores a constant added to every logit of a row; measured 4e-7 apart)
"""

import json
import math
import shutil

import pytest
from conftest import ROOT
from golden import cases

with open(cases.GOLDEN, encoding="utf-8") as f:
  GOLDEN = json.load(f)

# Each case's result in this process (its first run is also the twice-run test's first run).
_RUNS = {}

RTOL, ATOL = 1e-4, 1e-6
RTOL_PARAMS, ATOL_PARAMS = 1e-4, 1e-5
# Steps 3 and 4 of the fixture's run, resumed from its step-2 checkpoint (train/loss reprs).
RESUMED = {3: "2.7929751873016357", 4: "2.777278423309326"}


def _close(got: float, want: float, rtol: float = RTOL, atol: float = ATOL) -> bool:
  both_nan = math.isnan(got) and math.isnan(want)
  return both_nan or math.isclose(got, want, rel_tol=rtol, abs_tol=atol)


def _metric_diffs(name: str, got_steps: list, want_steps: list) -> list[str]:
  out = []
  for step, (g, w) in enumerate(zip(got_steps, want_steps), 1):
    if set(g) != set(w):
      out.append(f"{name}: step {step} metrics {sorted(set(g) ^ set(w))} appeared or vanished")
    for key in sorted(set(g) & set(w)):
      if not _close(float(g[key]), float(w[key])):
        out.append(f"{name}: step {step} {key} = {g[key]}, recorded {w[key]}")
  return out


def _param_diffs(name: str, got: dict, want: dict) -> list[str]:
  if set(got) != set(want):
    return [f"{name}: param leaves {sorted(set(got) ^ set(want))} appeared or vanished"]
  out = []
  for leaf, (g, w) in sorted((k, (got[k], want[k])) for k in want):
    scale = max(abs(w[1]), 1e-12)  # the leaf's sum |x|
    for stat, gv, wv in zip(("sum", "sum|x|", "l2", "dot"), g, w):
      if abs(gv - wv) > RTOL_PARAMS * scale + ATOL_PARAMS:
        out.append(f"{name}: {leaf} {stat} = {gv!r}, recorded {wv!r} (leaf sum|x| {scale:.4g})")
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_run_reproduces_golden_metrics_and_params(name):
  got = _RUNS[name] = cases.run_case(name)
  want = GOLDEN[name]
  assert len(got["steps"]) == len(want["steps"])
  diffs = _metric_diffs(name, got["steps"], want["steps"])
  diffs += _param_diffs(name, got["params"], want["params"])
  assert not diffs, "differs from tests/golden/golden.json beyond float32 rounding:\n" + "\n".join(
    diffs[:20]
  )


def test_the_comparison_catches_real_changes():
  # The tolerance must not hide a real change: a 1e-3 relative move of one metric, or of one
  # leaf, fails; a 1e-6 one (rounding between processors) passes.
  want = GOLDEN["smoke"]
  moved = [dict(step) for step in want["steps"]]
  moved[-1]["train/loss"] = repr(float(moved[-1]["train/loss"]) * (1 + 1e-3))
  assert _metric_diffs("smoke", moved, want["steps"])
  moved[-1]["train/loss"] = repr(float(want["steps"][-1]["train/loss"]) * (1 + 1e-6))
  assert not _metric_diffs("smoke", moved, want["steps"])
  leaf = max(want["params"], key=lambda k: want["params"][k][1])  # the largest sum |x|
  params = dict(want["params"])
  params[leaf] = [v + 1e-3 * abs(params[leaf][1]) for v in params[leaf]]
  assert _param_diffs("smoke", params, want["params"])


@pytest.mark.slow
def test_a_case_run_twice_in_one_process_is_bit_for_bit_the_same():
  # Physics on one machine: the same compiled programs on the same inputs. The first run is
  # the golden test's of this case where it ran in this process (loadfile: it did, just before).
  first = _RUNS.get("online_topk") or cases.run_case("online_topk")
  second = cases.run_case("online_topk")
  assert first["steps"] == second["steps"] and first["sha256"] == second["sha256"]


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
  diffs = [s for s, want in RESUMED.items() if not _close(float(rows[s]), float(want))]
  assert not diffs, {s: (rows[s], RESUMED[s]) for s in diffs}
