"""The library API without a config file: a run from given variables, no data iterator, the
compiled step, validation that cannot be skipped, and the explicit teacher-pretraining stage."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import sharding
from jaxdistill.train import loop
from jaxdistill.train import teacher as teacher_lib


def _cfg(tiny_config):
  cfg = tiny_config
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.mesh.update(data=2, fsdp=1, tensor=1)
  cfg.optim.warmup_steps = 0  # the first step already moves the params
  return cfg


def _counting_init(monkeypatch):
  """Counts traces of any model's ``init`` (abstract or computed)."""
  calls = []
  original = nn.Module.init

  def init(self, *args, **kwargs):
    calls.append(type(self).__name__)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(nn.Module, "init", init)
  return calls


def _hand_made(abstract, value):
  return jax.tree.map(lambda a: jnp.full(a.shape, value, a.dtype), abstract)


@pytest.mark.slow
def test_run_from_given_variables_skips_their_init(tiny_config, monkeypatch):
  cfg = _cfg(tiny_config)
  devices = jax.devices()[:2]
  reference = loop.build_run(cfg, devices=devices, data=False)
  assert reference.data_iter is None
  student = _hand_made(reference.state.params["student"], 0.01)
  teacher = _hand_made(reference.teacher_params, -0.02)

  calls = _counting_init(monkeypatch)
  loop.build_run(cfg, devices=devices, data=False)
  assert calls.count("Transformer") >= 2  # random: traced for shapes, then computed
  calls.clear()

  def no_loading(*args, **kwargs):
    raise AssertionError("teacher_lib.load ran although teacher variables were given")

  monkeypatch.setattr(teacher_lib, "load", no_loading)
  run = loop.build_run(
    cfg,
    devices=devices,
    data=False,
    student_vars={"params": student},
    teacher_vars={"params": teacher},
  )
  # One abstract trace per model, for shapes and shardings; computing an init would trace it a
  # second time under jit (as the random run above did).
  assert calls == ["Transformer", "Transformer"], calls
  for got, want in zip(jax.tree.leaves(run.state.params["student"]), jax.tree.leaves(student)):
    np.testing.assert_array_equal(got, want)
  for got, ref in zip(
    jax.tree.leaves(run.teacher_params), jax.tree.leaves(reference.teacher_params)
  ):
    assert got.sharding == ref.sharding and float(got.reshape(-1)[0]) == np.float32(-0.02)

  # One step from a hand-made batch; the compiled step for memory analysis.
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.student.vocab_size, (8, cfg.data.seq_len + 1), dtype=np.int32)
  local = dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    weights=np.ones((8, cfg.data.seq_len), np.float32),
    segment_ids=np.ones((8, cfg.data.seq_len), np.int32),
    positions=np.tile(np.arange(cfg.data.seq_len, dtype=np.int32), (8, 1)),
  )
  batch = sharding.shard_batch(local, run.mesh)
  compiled = run.compile(batch)
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  metrics = jax.device_get(run.step(batch))
  assert np.isfinite(metrics["train/loss"]) and int(run.state.step) == 1
  leaves = zip(jax.tree.leaves(run.state.params["student"]), jax.tree.leaves(student))
  assert any(not np.array_equal(new, old) for new, old in leaves)


@pytest.mark.slow
def test_given_variables_that_do_not_fit_are_named(tiny_config):
  cfg = _cfg(tiny_config)
  ref = loop.build_run(cfg, devices=jax.devices()[:2], data=False)
  student = jax.device_get(ref.state.params["student"])
  student["embed"] = {"embedding": np.zeros((3, 3), np.float32)}
  with pytest.raises(JaxdistillError, match="embed"):
    loop.build_run(cfg, devices=jax.devices()[:2], data=False, student_vars={"params": student})
  with pytest.raises(JaxdistillError, match="teacher variables"):
    loop.build_run(
      cfg, devices=jax.devices()[:2], data=False, teacher_vars={"params": {}, "extra": {}}
    )


def test_build_run_validates(tiny_config):
  cfg = _cfg(tiny_config)
  cfg.distill.temperature = -1.0
  with pytest.raises(ConfigError, match="distill.temperature"):
    loop.build_run(cfg, devices=jax.devices()[:2], data=False)


@pytest.mark.slow
def test_pretrained_teacher_is_an_explicit_stage(tiny_config, tmp_path):
  cfg = _cfg(tiny_config)
  cfg.teacher.update(source="pretrain", pretrain_steps=2)
  with pytest.raises(JaxdistillError, match="pretraining stage"):
    loop.build_run(cfg, str(tmp_path), devices=jax.devices()[:2], data=False)
  path = loop.pretrain_teacher(cfg, str(tmp_path), devices=jax.devices()[:2])
  assert path == str(tmp_path / "teacher" / "final_params")
  run = loop.build_run(cfg, str(tmp_path), devices=jax.devices()[:2], data=False)
  assert run.teacher_path == path


@pytest.mark.slow
def test_the_pairing_example_runs():
  import os
  import subprocess
  import sys

  from conftest import ROOT

  env = dict(os.environ, PYTHONPATH=str(ROOT))
  out = subprocess.run(
    [sys.executable, str(ROOT / "examples" / "pair_step.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  losses = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("loss")]
  assert len(losses) == 3 and losses[2] < losses[0], out.stdout
  assert (ROOT / "examples" / "pair_step.py").read_text().count("\n") < 40
