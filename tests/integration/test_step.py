"""The distill step: sharded == single device, accumulation, no teacher gradient, golden."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.config import validate
from jaxdistill.distill import objective as objective_lib
from jaxdistill.train import loop
from jaxdistill.train import step as train_lib


def _run(cfg, devices, steps=3):
  validate.validate(cfg)
  run = loop.build_run(cfg, devices=devices)
  history = []
  loop.run_steps(run, steps, lambda step, m, s: history.append(m))
  return run, history


_RUNS = {}


def _cached_run(cfg, mesh: str, grad_accum: int, **distill):
  """3 steps of ``cfg`` on mesh "1x1x1" or "2x2x2"; each variant runs once per session.

  ``distill``: overrides of ``cfg.distill`` keys (part of the cache key).
  """
  key = (mesh, grad_accum, tuple(sorted(distill.items())))
  if key not in _RUNS:
    cfg = cfg.copy_and_resolve_references()
    data, fsdp, tensor = map(int, mesh.split("x"))
    cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    cfg.optim.grad_accum = grad_accum
    cfg.distill.update(**distill)
    run, history = _run(cfg, jax.devices()[: data * fsdp * tensor])
    _RUNS[key] = (run, jax.device_get(run.state.params), history)
  return _RUNS[key]


def _assert_close(a, b, what, rtol=1e-5, atol=1e-6):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(x),
      np.asarray(y),
      rtol=rtol,
      atol=atol,
      err_msg=f"{what} {jax.tree_util.keystr(path)}",
    )


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_sharded_step_equals_single_device(tiny_config, grad_accum):
  _, single_params, single_hist = _cached_run(tiny_config, "1x1x1", grad_accum)
  sharded, sharded_params, sharded_hist = _cached_run(tiny_config, "2x2x2", grad_accum)
  # The state really is sharded: the embedding is split over tensor x fsdp.
  embed = sharded.state.params["student"]["token_embed"]["embedding"]
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert len(single_hist) == len(sharded_hist) == 3
  for step, (m1, m8) in enumerate(zip(single_hist, sharded_hist)):
    for key in m1:
      np.testing.assert_allclose(
        m8[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=f"step {step + 1} {key}"
      )
  _assert_close(sharded_params, single_params, "params")


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch(tiny_config):
  _, full_params, full_hist = _cached_run(tiny_config, "2x2x2", 1)
  _, accum_params, accum_hist = _cached_run(tiny_config, "2x2x2", 2)
  for m1, m2 in zip(full_hist, accum_hist):
    for key in (
      "train/loss",
      "task/ce",
      "distill/kl",
      "distill/attention",
      "distill/hidden",
      "distill/value_relation",
      "train/grad_norm",
    ):
      np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-8, err_msg=key)
  _assert_close(accum_params, full_params, "params")


@pytest.mark.slow
@pytest.mark.parametrize(
  "mesh,chunks",
  [("1x1x1", {}), ("2x2x2", dict(token_chunk=8, vocab_chunk=16))],
  ids=["single-default-chunks", "sharded-token-and-vocab-chunks"],
)
def test_fused_step_equals_dense_step(tiny_config, mesh, chunks):
  """distill.fused (the default) gives the dense reference path's metrics and params."""
  _, dense_params, dense_hist = _cached_run(tiny_config, "1x1x1", 1, fused=False)
  _, fused_params, fused_hist = _cached_run(tiny_config, mesh, 1, **chunks)
  for step, (m_dense, m_fused) in enumerate(zip(dense_hist, fused_hist)):
    assert m_dense.keys() == m_fused.keys()
    for key in m_dense:
      np.testing.assert_allclose(
        m_fused[key], m_dense[key], rtol=1e-5, atol=1e-7, err_msg=f"step {step + 1} {key}"
      )
  _assert_close(fused_params, dense_params, "params")


def _dot_count(fn, *args) -> int:
  jaxpr = jax.make_jaxpr(fn)(*args)
  count = 0

  def visit(jx):
    nonlocal count
    for eqn in jx.eqns:
      count += eqn.primitive.name == "dot_general"
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return count


@pytest.mark.slow
def test_no_gradient_reaches_the_teacher(tiny_config):
  cfg = tiny_config
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0  # logit + CE only: the losses add no matmuls
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  run = loop.build_run(cfg, devices=jax.devices()[:1])
  batch = jax.tree.map(jnp.asarray, run.data_iter.data.global_batch(0))
  obj = run.objective

  # 1. The loss's gradient w.r.t. the teacher params is exactly zero.
  def loss_wrt_teacher(teacher_params):
    s_params = {"params": run.state.params["student"]}
    s = run.student.apply(s_params, batch["inputs"], **obj.student_request())
    t = run.teacher.apply({"params": teacher_params}, batch["inputs"], **obj.teacher_request())
    return objective_lib.compute_loss(obj, 0, {}, s, jax.lax.stop_gradient(t), batch, 100.0)[0]

  grads = jax.grad(loss_wrt_teacher)(run.teacher_params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))

  # 2. The step's program holds no teacher backward: its matmuls are exactly
  #    a CE-only student step's plus one teacher forward.
  tx = train_lib.make_optimizer(cfg.optim)
  distill = train_lib.make_distill_step(obj, run.student, run.teacher, tx)
  no_teacher = cfg.copy_and_resolve_references()
  no_teacher.teacher.source = "none"
  no_teacher.distill.logit.weight = 0.0
  ce_only_obj = objective_lib.make_objective(no_teacher)
  assert [t.name for t in ce_only_obj.terms] == ["fused"] and not ce_only_obj.uses_teacher
  ce_only = train_lib.make_distill_step(ce_only_obj, run.student, None, tx)
  teacher_fwd = lambda p, b: run.teacher.apply({"params": p}, b["inputs"])
  n_distill = _dot_count(distill, run.state, run.teacher_vars, batch)
  n_ce = _dot_count(ce_only, run.state, None, batch)
  n_teacher = _dot_count(teacher_fwd, run.teacher_params, batch)
  assert n_teacher > 0 and n_distill == n_ce + n_teacher, (n_distill, n_ce, n_teacher)


# Golden values of `tiny_config` on one device: the first step's metrics and
# the params after 3 steps. If this test fails after a deliberate change to the
# model, losses, init, data or optimizer, check that the change is intended,
# then copy the new numbers from the failure message (and say why in the
# commit). An unintended change means the numerics moved: find out why first.
GOLDEN = {
  "train/loss": 2.0962541103363037,
  "train/grad_norm": 0.48589110374450684,
  "param_abs_sum": 949.4200439453125,
}


@pytest.mark.slow
def test_golden_one_step(tiny_config):
  _, params, hist = _cached_run(tiny_config, "1x1x1", 1)
  got = {
    "train/loss": float(hist[0]["train/loss"]),
    "train/grad_norm": float(hist[0]["train/grad_norm"]),
    "param_abs_sum": float(sum(np.abs(x).sum() for x in jax.tree.leaves(params))),
  }
  assert got == pytest.approx(GOLDEN, rel=1e-5), (
    f"golden values changed: {got!r}. See the comment above GOLDEN before updating."
  )
