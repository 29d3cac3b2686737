"""The distill step with image classifiers: BatchNorm state in the pure step, the sharded step
== one device (params AND batch_stats), gradient accumulation's per-micro-batch statistics, no
teacher gradient, a frozen teacher, function matching, exact resume after SIGKILL."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from testing import host_variables
from test_step import _assert_close  # the same leaf-by-leaf comparison

from jaxdistill import models
from jaxdistill.config import default_config, validate
from jaxdistill.distill import objective as objective_lib
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import sharding
from jaxdistill.train import loop
from jaxdistill.train import run as run_lib

IMAGE = dict(num_classes=10, image_size=8, image_channels=3)


def _config(student="resnet", teacher="resnet"):
  """ResNet-8 (BatchNorm) student <- ResNet-14 teacher (random), on 8x8 synthetic images,
  every vision loss on; or the classic CNN pair (no BatchNorm) with a feature-map projection."""
  cfg = default_config()
  shapes = {
    "resnet": dict(arch="resnet", depth=8),
    "cnn": dict(arch="cnn", cnn_channels="4,8", cnn_fc=16),
  }
  cfg.student.update(**shapes[student], **IMAGE)
  t_shape = (
    dict(shapes[teacher], depth=14)
    if teacher == "resnet"
    else dict(arch="cnn", cnn_channels="8,16", cnn_fc=32)
  )
  cfg.teacher.update(source="random", **t_shape, **IMAGE)
  d = cfg.distill
  d.temperature = 2.0
  d.logit.weight = 0.5
  d.ce.weight = 0.5
  d.attention_transfer.update(weight=1.0, stage_map="uniform")
  d.feature_map.update(weight=0.1, stage_map="last")
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(batch_size=8)
  cfg.log.progress = False
  return cfg


def _run(cfg, n_devices, steps=3, **given):
  validate.validate(cfg)
  run = loop.build_run(cfg, devices=jax.devices()[:n_devices], **given)
  history = []
  loop.run_steps(run, steps, lambda step, m, s: history.append(jax.device_get(m)))
  return run, history


@pytest.fixture(scope="module")
def resnet_run():
  """The ResNet pair's run on one device, randomly initialised (its init is what compiles
  slowest on CPU, so it is built once per module), before and after 3 steps:
  (run after the steps, its 3 steps' metrics, the initial {"student": variables, "teacher":
  variables} on the host). The other ResNet runs here start from these initial variables
  (``build_run(student_vars=, teacher_vars=)``): their random init never compiles."""
  cfg = _config()
  validate.validate(cfg)
  run = loop.build_run(cfg, devices=jax.devices()[:1])
  initial = jax.device_get(
    {
      "student": {"params": run.state.params["student"], **run.state.model_state},
      "teacher": run.teacher_vars,
    }
  )
  history = []
  loop.run_steps(run, 3, lambda step, m, s: history.append(jax.device_get(m)))
  return run, history, initial


def _given(initial):
  return dict(student_vars=initial["student"], teacher_vars=initial["teacher"])


def test_objective_of_an_image_model_reads_stage_maps():
  cfg = _config("cnn", "cnn")
  validate.validate(cfg)
  obj = objective_lib.make_objective(cfg)
  assert [t.name for t in obj.terms] == ["dense", "attention_transfer", "feature_map"]
  assert obj.student_request()["feature_stages"] == (1, 2)
  # Student stage 2 has 8 channels, the teacher's 16: a learned 1x1 conv maps them.
  assert [(p.name, p.d_in, p.d_out, p.conv) for p in obj.projections] == [
    ("stage_2_to_2", 8, 16, True)
  ]


@pytest.mark.slow
def test_sharded_step_equals_single_device_with_batch_stats(resnet_run):
  single, h1, initial = resnet_run
  cfg = _config()
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  # From the single device's initial variables, placed into the mesh's shardings (a sharded
  # random init is tests/integration/test_step.py's; here it would only add its compile).
  sharded, h8 = _run(cfg, 8, **_given(initial))
  assert "batch_stats" in single.state.model_state
  # The state really is sharded: conv output channels are split over tensor.
  specs = {x.sharding.spec for x in jax.tree.leaves(sharded.state.params["student"])}
  assert jax.sharding.PartitionSpec(None, None, None, "tensor") in specs
  assert len(h1) == len(h8) == 3
  for step, (m1, m8) in enumerate(zip(h1, h8)):
    for key in m1:
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=f"{step} {key}")
  # Adam turns a float-reordering difference in a near-zero gradient into up to ~lr * 1e-3:
  # the params agree to 2e-5 after 3 steps at lr 1e-2 (the metrics above to 2e-5 relative).
  _assert_close(
    jax.device_get(sharded.state.params), jax.device_get(single.state.params), "params", atol=2e-5
  )
  _assert_close(
    jax.device_get(sharded.state.model_state), jax.device_get(single.state.model_state), "stats"
  )


@pytest.mark.slow
def test_teacher_is_frozen_and_gets_no_gradient(resnet_run):
  run, _, initial = resnet_run  # the run after its 3 steps; its random teacher as initialised
  before = initial["teacher"]
  assert set(before) == {"params", "batch_stats"}
  batch = sharding.shard_batch(next(run.data_iter), run.mesh)
  obj = run.objective
  s_vars = {"params": run.state.params["student"], **run.state.model_state}

  def loss_wrt_teacher(teacher_vars):
    s = models.apply(run.student, s_vars, batch, train=True, **obj.student_request())
    s.pop("batch_stats")
    t = models.apply(run.teacher, teacher_vars, batch, **obj.teacher_request())
    proj = run.state.params["proj"]
    return objective_lib.compute_loss(obj, 0, proj, s, jax.lax.stop_gradient(t), batch, 8.0)[0]

  grads = jax.device_get(jax.jit(jax.grad(loss_wrt_teacher))(run.teacher_vars))
  assert all(np.abs(g).max() == 0.0 for g in jax.tree.leaves(grads))
  # The teacher runs in inference mode: its running statistics never moved in the 3 steps.
  _assert_close(jax.device_get(run.teacher_vars), before, "teacher", rtol=0, atol=0)


@pytest.mark.slow
def test_grad_accumulation_normalises_each_micro_batch_by_its_own_statistics(resnet_run):
  """With grad_accum=2 the step's new batch_stats are the running averages updated by micro-batch
  0 then micro-batch 1 (rows 0, 2, 4.. and 1, 3, 5..), each normalised by its own statistics."""
  cfg = _config("resnet", "resnet")
  cfg.optim.grad_accum = 2
  validate.validate(cfg)
  run = loop.build_run(cfg, devices=jax.devices()[:1], **_given(resnet_run[2]))
  local = next(run.data_iter)
  stats = run.state.model_state["batch_stats"]
  params = run.state.params["student"]
  for a in range(2):
    micro = {k: jnp.asarray(v[a::2]) for k, v in local.items()}
    out = models.apply(run.student, {"params": params, "batch_stats": stats}, micro, train=True)
    stats = out["batch_stats"]
  expected = jax.device_get(stats)
  with sharding.rules_context(run.mesh):
    state, _ = run.step_fn(run.state, run.teacher_vars, sharding.shard_batch(local, run.mesh))
  _assert_close(
    jax.device_get(state.model_state["batch_stats"]), expected, "batch_stats", atol=1e-6
  )


@pytest.mark.slow  # builds and compiles a whole run
def test_function_matching_teacher_and_student_see_the_same_array(monkeypatch):
  cfg = _config("cnn", "cnn")
  cfg.data.update(crop_padding=2, flip=True, mixup=0.5)
  validate.validate(cfg)
  # Host-filled variables: what is checked is the traced step, not the random init.
  given = {side: host_variables(run_lib.model_of(cfg, side)) for side in ("student", "teacher")}
  seen = []
  apply = models.apply

  def recording(model, variables, batch, **kw):
    seen.append(batch["inputs"])
    return apply(model, variables, batch, **kw)

  monkeypatch.setattr(models, "apply", recording)
  run = loop.build_run(
    cfg, devices=jax.devices()[:1], student_vars=given["student"], teacher_vars=given["teacher"]
  )
  run.step(sharding.shard_batch(next(run.data_iter), run.mesh))
  assert len(seen) == 2 and seen[0] is seen[1]  # one traced array feeds both models


@pytest.mark.parametrize(
  "change, key",
  [
    (lambda c: c.teacher.update(arch="transformer"), "teacher.arch"),
    (lambda c: c.teacher.update(num_classes=100), "teacher.num_classes"),
    (lambda c: c.distill.hidden.update(weight=0.1), "distill.hidden.weight"),
    (lambda c: c.distill.logit.update(kind="topk_renorm"), "distill.logit.kind"),
    (lambda c: c.distill.attention_transfer.update(kind="l1"), "distill.attention_transfer.kind"),
    (
      lambda c: c.distill.attention_transfer.update(stage_map="0:1"),
      "attention_transfer.stage_map",
    ),
    (lambda c: c.distill.feature_map.update(project=False), "distill.feature_map.project"),
    (lambda c: c.student.update(cnn_channels="4,x"), "student.cnn_channels"),
    (lambda c: c.student.update(arch="resnet", depth=9), "student.depth"),
    (lambda c: c.data.update(source="stdlib"), "data.source"),
  ],
)
def test_bad_image_configs_name_the_key(change, key):
  cfg = _config("cnn", "cnn")
  change(cfg)
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate.validate(cfg)


def _cli(workdir, *extra):
  cmd = [
    sys.executable,
    "-m",
    "jaxdistill.cli",
    "train",
    "--config",
    "configs/smoke_vision.py",
    "--config.log.progress=false",
    "--workdir",
    str(workdir),
    *extra,
  ]
  return cmd


def _train_here(workdir, *extra):
  """The same ``jaxdistill train`` as ``_cli`` (``cli.main``) in this process, which has the
  same 8 devices: for the runs that are not killed (no process start, no second import of
  JAX). Returns the exit code."""
  from jaxdistill.cli import commands as cli

  args = [str(ROOT / a) if a.startswith("configs/") else a for a in _cli(workdir, *extra)[3:]]
  return cli.main(args)


@pytest.mark.slow
def test_resume_of_a_cnn_run_after_sigkill_is_bitwise(tmp_path, capsys):
  import os
  import time

  from jaxdistill.config import load_config
  from jaxdistill.train import workdir as workdir_lib

  # The smoke run's teacher (ResNet-14) as a teacher run on disk, filled on the host: the three
  # processes load it instead of each compiling its random init (the slowest program of the
  # run); a random teacher re-created on resume is tests/e2e/test_checkpoint.py's.
  teacher_dir = tmp_path / "teacher"
  smoke = load_config(str(ROOT / "configs" / "smoke_vision.py"))
  teacher = host_variables(run_lib.model_of(smoke, "teacher"))
  workdir_lib.save_final_params(str(teacher_dir), teacher.pop("params"), teacher)
  loaded = ("--config.teacher.source=workdir", f"--config.teacher.path={teacher_dir}")
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  ref = tmp_path / "reference"
  # The reference and the resume run here; only the killed run needs a process of its own.
  assert _train_here(ref, *loaded) == 0, capsys.readouterr().err[-3000:]
  run = tmp_path / "run"
  proc = subprocess.Popen(
    _cli(run, *loaded), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  start = time.time()
  while not (run / "checkpoints" / "10").is_dir():
    assert proc.poll() is None and time.time() - start < 300
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  capsys.readouterr()
  rc = _train_here(run, *loaded)
  out, err = capsys.readouterr()
  assert rc == 0, err[-3000:]
  assert "resumed from step" in out + err
  rows = lambda w: [
    {k: v for k, v in json.loads(x).items() if not k.startswith("perf/")}
    for x in (w / "metrics.jsonl").read_text().splitlines()
  ]
  assert rows(run) == rows(ref) and len(rows(ref)) == 30
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    a = ckptr.restore(str(run / "final_params"))
    b = ckptr.restore(str(ref / "final_params"))
  assert set(a) == {"params", "batch_stats"}  # a BatchNorm student's final variables
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_image_channels_must_split_over_the_tensor_axis():
  cfg = _config("cnn", "cnn")  # student channels 4, 8, fc 16
  validate.check_mesh(cfg, dict(data=1, fsdp=1, tensor=4))
  with pytest.raises(ConfigError, match="mesh.tensor.*student .cnn. has a layer of 4"):
    validate.check_mesh(cfg, dict(data=1, fsdp=1, tensor=8))
