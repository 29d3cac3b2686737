"""Continual distillation end to end: the snapshot taken inside the step at each window's start
(train/lwf.py), the teacher's refresh (train/continual.py), the per-window evaluation and its
forgetting table, and a run resumed mid-window that is bitwise the uninterrupted one."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxdistill.config import load_config
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import continual as continual_lib
from jaxdistill.train import run as run_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cfg(steps=8, window=4):
  """configs/continual.py's test size, shortened: a random teacher (no pretraining), windows
  of ``window`` steps with 8 held-out rows, a refresh every 3 steps of 2 CE steps."""
  cfg = load_config(f"{ROOT}/configs/continual.py:snapshot,test")
  cfg.teacher.source = "random"
  cfg.continual.update(window_steps=window, eval_rows=8, refresh_every=3, teacher_steps=2)
  cfg.optim.update(steps=steps, warmup_steps=1)
  cfg.eval.every = window
  cfg.log.update(every=1, progress=False)
  return cfg


def _leaves(tree):
  """The tree's leaves as NumPy arrays (a PRNG key as its key data)."""
  host = lambda x: (
    jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  )
  return [np.asarray(jax.device_get(host(x))) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # one step and one tuner compile: about 20 s
def test_snapshot_is_taken_at_each_window_start_and_weighs_nothing_in_window_0():
  cfg = _cfg()
  run = run_lib.build_run(cfg)
  hooks = continual_lib.Continual(run, "/nonexistent")  # refreshes only: nothing is written
  window = cfg.continual.window_steps
  metrics = []
  for step in range(window + 2):
    hooks.before_step(step)
    if step == window:  # the student as window 1 opens: what the snapshot must become
      expected = _leaves(run.state.params["student"])
    batch = sharding_lib.shard_batch(next(run.data_iter), run.mesh)
    metrics.append(jax.device_get(run.step(batch)))
    if step == window:
      for got, want in zip(_leaves(run.state.snapshot_params), expected, strict=True):
        np.testing.assert_array_equal(got, want)
  weights = [float(m["train/snapshot_weight"]) for m in metrics]
  assert weights == [0.0] * window + [cfg.continual.snapshot_weight] * 2
  # The first step of window 1 reads a snapshot equal to the student: a zero KL; then it moves.
  assert float(metrics[window]["train/snapshot_kl"]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics[window + 1]["train/snapshot_kl"]) > 1e-6
  # Refreshed at steps 3 (and 0: the loaded teacher): the teacher is no longer the loaded one.
  assert hooks.refreshed == 3
  moved = zip(_leaves(run.teacher_vars["params"]), _leaves(hooks.loaded["params"]), strict=True)
  assert any(not np.array_equal(a, b) for a, b in moved)


def _rows(workdir, after=0):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [
    {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows if r["step"] > after
  ]


@pytest.mark.slow  # three short runs (one resumed): about a minute on 2 cores
def test_a_run_resumed_mid_window_is_bitwise_the_uninterrupted_one(tmp_path):
  # 3 windows of 4 steps; the checkpoint at step 6 is mid window 1, after the refresh at step 6
  # is due but before it ran: the resumed run recomputes that refresh, restores the snapshot
  # of step 4 and the stream's position, and must log and end exactly like the reference.
  import orbax.checkpoint as ocp

  from jaxdistill.train import loop

  cfg = _cfg(steps=12)
  cfg.ckpt.update(every=6, async_save=False)
  ref, resumed = tmp_path / "ref", tmp_path / "resumed"
  loop.train(cfg, str(ref))
  loop.train(cfg, str(resumed), resume_from=str(ref / "checkpoints" / "6"))
  assert _rows(resumed) == _rows(ref, after=6) and len(_rows(ref)) > 12
  with ocp.StandardCheckpointer() as ckptr:
    a = ckptr.restore(str(resumed / "checkpoints" / "12" / "state"))
    b = ckptr.restore(str(ref / "checkpoints" / "12" / "state"))
  assert jax.tree.leaves(a["snapshot_params"])
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  # Every window seen so far is evaluated at each window's end; the table shows forgetting.
  found = json.loads((ref / "forgetting.json").read_text())
  assert [sorted(k for k in r if k.startswith("eval/window_")) for r in found["rows"]] == [
    ["eval/window_0/loss"],
    ["eval/window_0/loss", "eval/window_1/loss"],
    ["eval/window_0/loss", "eval/window_1/loss", "eval/window_2/loss"],
  ]
  table = (ref / "forgetting.md").read_text().splitlines()
  assert table[0] == "| step | window | w0 | w1 | w2 |" and table[-1].startswith("| forgetting |")
  assert len(found["domains"]) == 4


def test_a_refresh_picks_up_the_newest_teacher_checkpoint_at_its_step(tmp_path):
  # DIR/4/final_params holds other teacher params; refreshes every 3 steps: the loaded teacher
  # at steps 0 and 3, the checkpoint from step 6 on (4 <= 6), nothing fine-tuned.
  from jaxdistill.train import checkpoint

  teachers = tmp_path / "teachers"
  teachers.mkdir()
  cfg = _cfg()
  cfg.continual.teacher_dir = str(teachers)
  run = run_lib.build_run(cfg, data=False)
  hooks = continual_lib.Continual(run, str(tmp_path))
  other = jax.tree.map(lambda a: a * 0.5 + 0.01, run.teacher_vars["params"])
  checkpoint.save_params(str(teachers / "4" / "final_params"), other)
  for step, want in ((0, hooks.loaded["params"]), (3, hooks.loaded["params"]), (6, other)):
    hooks.before_step(step)
    for got, expected in zip(_leaves(run.teacher_vars["params"]), _leaves(want), strict=True):
      np.testing.assert_array_equal(got, expected)
  assert hooks.tuner is None and hooks.picked == str(teachers / "4")


@pytest.mark.slow  # the whole test size, its teacher pretrained in the run: about 90 s
def test_the_continual_config_trains_at_its_test_size(tmp_path):
  from jaxdistill.train import loop

  cfg = load_config(f"{ROOT}/configs/continual.py:snapshot,test")
  cfg.log.progress = False
  summary = loop.train(cfg, str(tmp_path))
  assert summary["last_step"] == cfg.optim.steps == 4 * cfg.continual.window_steps
  found = json.loads((tmp_path / "forgetting.json").read_text())
  assert [r["step"] for r in found["rows"]] == [24, 48, 72, 96]
  last = found["rows"][-1]
  assert all(np.isfinite(last[f"eval/window_{k}/loss"]) for k in range(4))
  # Every window was learnt: its loss at its own window's end is below the untrained ~log(V).
  assert all(
    r[f"eval/window_{k}/loss"] < np.log(cfg.student.vocab_size) for k, r in enumerate(found["rows"])
  )
  assert (tmp_path / "forgetting.md").read_text().splitlines()[-1].startswith("| forgetting |")
