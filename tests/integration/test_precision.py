"""Mixed precision: float16 with dynamic loss scaling, FP8 matmuls, policies honoured."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT
from testing import host_variables

from jaxdistill import config as config_lib
from jaxdistill import data as data_lib
from jaxdistill.config import validate
from jaxdistill.errors import ConfigError
from jaxdistill.models.layers import FP8_STATE, EinsumDense
from jaxdistill.models.transformer import TransformerConfig
from jaxdistill.parallel import precision, sharding
from jaxdistill.train import checkpoint, loop
from jaxdistill.train import teacher as teacher_lib
from jaxdistill.train.run import model_of


def _small(cfg):
  """``tiny_config`` with one-layer models and logit + CE losses only: quick to compile."""
  cfg = cfg.copy_and_resolve_references()
  cfg.student.num_layers = cfg.teacher.num_layers = 1
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  return cfg


def _f16_config(cfg, policy="p=f32,c=f16,o=f32", scale=2.0**8, period=2000):
  cfg = _small(cfg)
  cfg.student.policy = policy
  cfg.optim.update(loss_scale="dynamic", loss_scale_init=scale, loss_scale_period=period)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg


def _build(cfg, host=False):
  """``host``: student and teacher variables filled on the host (tests/testing.py), so that
  no random init compiles; for tests about the step, not about the init or its dtypes."""
  validate.validate(cfg)
  if not host:
    return loop.build_run(cfg, devices=jax.devices()[:1])
  given = {side: host_variables(model_of(cfg, side)) for side in ("student", "teacher")}
  return loop.build_run(
    cfg, devices=jax.devices()[:1], student_vars=given["student"], teacher_vars=given["teacher"]
  )


def _step(run, batch):
  """One step on ``batch``; returns (old state host copy, metrics)."""
  old = jax.device_get(run.state)
  with sharding.rules_context(run.mesh):
    run.state, metrics = run.step_fn(run.state, run.teacher_vars, batch)
  return old, jax.device_get(metrics)


def _batch(run):
  return sharding.shard_batch(next(run.data_iter), run.mesh)


def _tree_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_differs(a, b):
  return any(
    not np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def test_update_loss_scale_halves_on_overflow_and_doubles_after_period():
  ls = precision.LossScale(jnp.float32(8.0), jnp.int32(0))
  ls = precision.update_loss_scale(ls, jnp.bool_(True), period=2)
  assert (float(ls.scale), int(ls.good_steps)) == (8.0, 1)
  ls = precision.update_loss_scale(ls, jnp.bool_(True), period=2)
  assert (float(ls.scale), int(ls.good_steps)) == (16.0, 0)
  ls = precision.update_loss_scale(ls, jnp.bool_(True), period=2)
  ls = precision.update_loss_scale(ls, jnp.bool_(False), period=2)
  assert (float(ls.scale), int(ls.good_steps)) == (8.0, 0)
  # Never below 1 (a scale of 0 would zero every gradient).
  low = precision.update_loss_scale(precision.LossScale(jnp.float32(1.0), jnp.int32(0)), False, 2)
  assert float(low.scale) == 1.0


@pytest.mark.slow
def test_injected_overflow_skips_that_update_halves_scale_and_recovers(tiny_config):
  run = _build(_f16_config(tiny_config, scale=2.0**8, period=2))
  assert run.state.loss_scale.scale.dtype == jnp.float32
  # 1. A normal step: finite, applied, scale unchanged (1 of 2 good steps).
  old, m = _step(run, _batch(run))
  assert (m["train/overflow"], m["train/loss_scale"], m["train/nonfinite"]) == (0.0, 256.0, 0.0)
  assert np.isfinite(m["train/loss"])
  assert _tree_differs(run.state.opt_state, old.opt_state)  # applied (lr is 0 at step 0)
  # 2. Injected overflow: a scale float16 cannot hold in the backward pass.
  #    Exactly this update is skipped, the scale halves, the step still counts.
  run.state = run.state.replace(
    loss_scale=precision.LossScale(jnp.float32(2.0**24), run.state.loss_scale.good_steps)
  )
  old, m = _step(run, _batch(run))
  assert m["train/overflow"] == 1.0 and m["train/loss_scale"] == 2.0**24
  assert m["train/nonfinite"] == 0.0  # the loss itself is finite: not a nan_policy stop
  _tree_equal(run.state.params, old.params)
  _tree_equal(run.state.opt_state, old.opt_state)
  assert float(run.state.loss_scale.scale) == 2.0**23
  assert int(run.state.loss_scale.good_steps) == 0
  assert int(run.state.step) == int(old.step) + 1
  # 3. Recovery: the scale keeps halving until the gradients fit, then the
  #    updates apply again and the loss stays finite.
  history = [_step(run, _batch(run))[1] for _ in range(14)]
  overflow = [h["train/overflow"] for h in history]
  assert overflow[0] == 1.0 and overflow[-1] == 0.0, overflow
  assert all(np.isfinite(h["train/loss"]) for h in history)
  assert float(run.state.loss_scale.scale) < 2.0**23
  last = jax.device_get(run.state)
  _step(run, _batch(run))
  assert _tree_differs(run.state.params, last.params)


@pytest.mark.slow
def test_loss_scaling_is_exact_and_invisible_in_f32(tiny_config):
  """Power-of-two scaling commutes with f32 arithmetic: the same loss and gradient norm bit
  for bit, and the same params (bitwise on an Intel Xeon; on an AMD EPYC XLA's CPU code for
  the two programs differs in the last bits of a few Adam updates, <= 6e-6 relative after 3
  steps, so params are compared to 1e-5 relative, 1e-8 absolute near zero)."""
  cfg = _small(tiny_config)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  plain = _build(cfg, host=True)
  # Off (the default): no loss-scale leaves, no loss-scale metrics.
  assert plain.state.loss_scale is None
  scaled = _build(_f16_config(tiny_config, policy="p=f32,c=f32,o=f32", scale=2.0**10), True)
  for _ in range(3):
    batch = _batch(plain)
    _, m_plain = _step(plain, batch)
    _, m_scaled = _step(scaled, batch)
  assert "train/loss_scale" not in m_plain and "train/overflow" not in m_plain
  assert m_scaled["train/loss"] == m_plain["train/loss"]
  assert m_scaled["train/grad_norm"] == m_plain["train/grad_norm"]
  for x, y in zip(jax.tree.leaves(scaled.state.params), jax.tree.leaves(plain.state.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
  "overrides, key, message",
  [
    ({"student.policy": "p=f16,c=f16"}, "student.policy", "optim.loss_scale=dynamic"),
    ({"student.policy": "p=f32,c=f16"}, "student.policy", "loss scaling"),
    ({"optim.loss_scale": "static"}, "optim.loss_scale", "choose from"),
    ({"optim.loss_scale": "dynamic", "optim.loss_scale_init": 0.0}, "optim.loss_scale_init", ">"),
  ],
)
def test_impossible_policies_are_config_errors(tiny_config, overrides, key, message):
  cfg = tiny_config.copy_and_resolve_references()
  for k, v in overrides.items():
    section, leaf = k.split(".")
    cfg[section][leaf] = v
  with pytest.raises(ConfigError, match=message) as e:
    validate.validate(cfg)
  assert e.value.key == key


def _dot_dtypes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  found = set()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "dot_general":
        found.add(tuple(jnp.dtype(v.aval.dtype).name for v in eqn.invars))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jaxpr.jaxpr)
  return found


@pytest.mark.slow
def test_policies_are_honoured_for_teacher_and_student_separately(tiny_config):
  cfg = _f16_config(tiny_config, policy="p=f16,c=f16,o=f32")
  cfg.teacher.policy = "p=bf16,c=bf16,o=f32"
  run = _build(cfg)
  student_dtypes = {x.dtype for x in jax.tree.leaves(run.state.params["student"])}
  teacher_dtypes = {x.dtype for x in jax.tree.leaves(run.teacher_params)}
  assert student_dtypes == {jnp.dtype(jnp.float16)}
  assert teacher_dtypes == {jnp.dtype(jnp.bfloat16)}
  inputs = jnp.zeros((2, cfg.data.seq_len), jnp.int32)
  s_dots = _dot_dtypes(
    lambda p: run.student.apply({"params": p}, inputs), run.state.params["student"]
  )
  t_dots = _dot_dtypes(lambda p: run.teacher.apply({"params": p}, inputs), run.teacher_params)
  # Matmuls run in the compute dtype; only attention scores / logits may be f32.
  assert ("float16", "float16") in s_dots and not any("bfloat16" in d for d in s_dots), s_dots
  assert ("bfloat16", "bfloat16") in t_dots and not any("float16" in d for d in t_dots), t_dots


# --- FP8 ----------------------------------------------------------------------------------------


def _e4m3_qdq(x, scale):
  """NumPy reference of Flax's e4m3 quantise-dequantise: clip to +-448, round, rescale."""
  q = np.clip(x / scale, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return q, scale


def test_fp8_matmul_matches_numpy_reference():
  cfg = TransformerConfig(
    vocab_size=8, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=8, fp8=True, fp8_history=4
  )
  layer = EinsumDense(cfg, (16, 32), ("embed", "mlp"), "btd,df->btf")
  x_BxTxD = 2.0 * jax.random.normal(jax.random.key(1), (2, 3, 16), jnp.float32)
  variables = nn.unbox(layer.init(jax.random.key(0), x_BxTxD))
  # Delayed scaling: this step's scales come from the amax HISTORIES (earlier steps).
  fp8 = dict(variables[FP8_STATE]["fp8"])
  fp8["input_amax_history"] = jnp.array([3.0, 1.0, 0.0, 0.0], jnp.float32)
  fp8["kernel_amax_history"] = jnp.array([0.01, 0.04, 0.0, 0.0], jnp.float32)
  variables = {"params": variables["params"], FP8_STATE: {"fp8": fp8}}
  out_BxTxF = np.asarray(layer.apply(variables, x_BxTxD))

  x, kernel = np.asarray(x_BxTxD), np.asarray(variables["params"]["kernel"])
  scale = lambda amax: np.float32(1.0) / (np.float32(448.0) / np.float32(amax))
  qx, sx = _e4m3_qdq(x, scale(3.0))
  qk, sk = _e4m3_qdq(kernel, scale(0.04))
  ref_BxTxF = np.einsum("btd,df->btf", qx, qk) * (sx * sk)
  np.testing.assert_allclose(out_BxTxF, ref_BxTxF, rtol=1e-5, atol=1e-7)
  # ... and the rounding really happened: the plain matmul differs.
  plain = np.einsum("btd,df->btf", x, kernel)
  assert np.abs(plain - ref_BxTxF).max() > 1e-3 * np.abs(plain).max()
  # Without its FP8 state (params saved alone) the layer is a plain matmul.
  np.testing.assert_allclose(
    np.asarray(layer.apply({"params": variables["params"]}, x_BxTxD)), plain, rtol=1e-5, atol=1e-6
  )


def _fp8_config(cfg):
  cfg = _small(cfg)
  cfg.student.policy = "p=f32,c=fp8,o=f32"
  # Loss scaling is harmless with bf16 compute; on here so one checkpoint holds both states.
  cfg.optim.update(loss_scale="dynamic", loss_scale_init=2.0**8, loss_scale_period=1)
  cfg.mesh.update(data=1, fsdp=2, tensor=2)
  return cfg


@pytest.mark.slow
def test_fp8_state_is_overwritten_not_optimised_and_checkpointed(tiny_config, tmp_path):
  cfg = _fp8_config(tiny_config)
  validate.validate(cfg)
  run = loop.build_run(cfg, devices=jax.devices()[:4])
  state = run.state.model_state[FP8_STATE]
  wo = lambda s: s["block_0"]["mlp"]["wo"]["fp8"]
  assert set(state["block_0"]["attn"]) == {"query", "key", "value", "out"}
  # Per-tensor scales and histories: replicated over the mesh, outside the optimizer.
  assert wo(state)["kernel_amax_history"].shape == (1024,)
  assert wo(state)["kernel_amax_history"].sharding.is_fully_replicated
  assert not any(a.shape == (1024,) for a in jax.tree.leaves(run.state.opt_state))
  kernel = np.asarray(run.state.params["student"]["block_0"]["mlp"]["wo"]["kernel"])
  batch = _batch(run)
  _step(run, batch)
  state = jax.device_get(run.state.model_state[FP8_STATE])
  history = wo(state)["kernel_amax_history"]
  # The newest amax is this step's max |kernel| in the bf16 compute dtype.
  assert history[0] == np.abs(kernel.astype(jnp.bfloat16)).max().astype(np.float32)
  assert np.all(history[1:] == 0.0)
  assert wo(state)["output_grad_amax_history"][0] > 0.0 and wo(state)["input_amax_history"][0] > 0
  _step(run, _batch(run))
  state = jax.device_get(run.state.model_state[FP8_STATE])
  # Flax rolls left and writes the newest at 0: the previous amax moved to the end.
  assert wo(state)["kernel_amax_history"][-1] == history[0]
  assert wo(state)["kernel_scale"][0] == np.float32(1) / (np.float32(448) / history[0])

  manager = checkpoint.make_manager(str(tmp_path), cfg.ckpt)
  checkpoint.save(manager, 2, run.state, run.data_iter, {}, force=True)
  manager.wait_until_finished()
  fresh = loop.build_run(cfg, devices=jax.devices()[:4], create_state=False)
  restored, _ = checkpoint.restore(manager, 2, fresh.state, fresh.data_iter)
  _tree_equal(restored.model_state, run.state.model_state)
  # The loss scale is part of the state too (period 1: doubled after each finite step).
  assert float(restored.loss_scale.scale) == float(run.state.loss_scale.scale) == 2.0**10
  assert int(restored.loss_scale.good_steps) == 0


@pytest.mark.slow
def test_fp8_loss_tracks_bf16_on_the_smoke_config():
  cfg = config_lib.load_config(str(ROOT / "configs" / "smoke.py"))
  cfg.optim.steps = 8
  cfg.log.progress = False
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  losses = {}
  for compute in ("bf16", "fp8"):
    cfg.student.policy = f"p=f32,c={compute},o=f32"
    run = _build(cfg)
    hist = []
    loop.run_steps(run, 8, lambda step, m, s: hist.append(float(m["train/loss"])))
    losses[compute] = hist
  # Both learn, and FP8 stays within 2% of bf16 at every step.
  assert losses["fp8"][-1] < losses["fp8"][0] - 0.1, losses
  np.testing.assert_allclose(losses["fp8"], losses["bf16"], rtol=0.02)


def test_fp8_policy_errors(tiny_config):
  with pytest.raises(ConfigError, match="c=fp8"):
    precision.parse_policy("p=fp8,c=bf16", "student.policy")
  assert precision.parse_policy("p=f32,c=fp8").fp8
  assert str(precision.parse_policy("c=fp8,p=f32")) == "p=float32,c=fp8,o=bfloat16"
  cfg = tiny_config.copy_and_resolve_references()
  cfg.teacher.policy = "p=f32,c=fp8"
  validate.validate(cfg)  # FP8 teachers run with calibrated static scales
  cfg.teacher.fp8_calibration_batches = 0
  with pytest.raises(ConfigError, match="int >= 1") as e:
    validate.validate(cfg)
  assert e.value.key == "teacher.fp8_calibration_batches"


# --- FP8 teacher: calibrated static scales ------------------------------------------------------


def _fp8_teacher_config(cfg):
  cfg = _small(cfg)
  cfg.teacher.update(policy="p=f32,c=fp8,o=f32", fp8_calibration_batches=3)
  cfg.mesh.update(data=1, fsdp=1, tensor=2)
  return cfg


def _with_histories_scaled(state, factor):
  scale = lambda path, x: x * factor if "amax_history" in jax.tree_util.keystr(path) else x
  return jax.tree_util.tree_map_with_path(scale, state)


@pytest.mark.slow
def test_fp8_teacher_is_calibrated_frozen_in_the_step_and_recalibrated_on_resume(tiny_config):
  cfg = _fp8_teacher_config(tiny_config)
  validate.validate(cfg)
  run = loop.build_run(cfg, devices=jax.devices()[:2])
  wo = lambda s: s[FP8_STATE]["block_0"]["mlp"]["wo"]["fp8"]
  teacher_state = {k: v for k, v in run.teacher_vars.items() if k != "params"}
  fp8 = jax.device_get(wo(teacher_state))
  # Calibration moved the scales off their init (1.0): the input scale is the largest
  # activation amax seen in 3 batches, the kernel scale the weights' own max |w| (exact).
  assert np.count_nonzero(fp8["input_amax_history"]) == 3
  e4m3_scale = lambda amax: np.float32(1) / (np.float32(448) / amax)
  assert fp8["input_scale"][0] == e4m3_scale(fp8["input_amax_history"].max())
  kernel = np.asarray(run.teacher_params["block_0"]["mlp"]["wo"]["kernel"])
  amax = np.abs(kernel.astype(jnp.bfloat16)).max().astype(np.float32)
  assert fp8["kernel_scale"][0] == e4m3_scale(amax) != 1.0
  # Per-tensor scalars: replicated, while the kernel they belong to is sharded.
  assert wo(teacher_state)["kernel_scale"].sharding.is_fully_replicated
  assert not run.teacher_params["block_0"]["mlp"]["wo"]["kernel"].sharding.is_fully_replicated
  assert run.state.model_state is None  # the student (f32) has no FP8 state

  before = jax.device_get(teacher_state)
  first_batch = next(run.data_iter)  # the run's stream starts where a fresh one does
  batch = sharding.shard_batch(first_batch, run.mesh)
  # The step donates its state: one copy of the initial student state per call.
  s1, s2, s3 = (jax.tree.map(lambda x: x.copy(), run.state) for _ in range(3))
  with sharding.rules_context(run.mesh):
    _, m1 = run.step_fn(s1, run.teacher_vars, batch)
    run.state, _ = run.step_fn(run.state, run.teacher_vars, _batch(run))
    _, m2 = run.step_fn(s2, run.teacher_vars, batch)
    # The step reads the teacher's scales: coarser ones change the distillation loss.
    coarse = _with_histories_scaled(run.teacher_vars, 64.0)
    _, m3 = run.step_fn(s3, coarse, batch)
  m1, m2, m3 = jax.device_get((m1, m2, m3))
  # Same student state and batch after another step ran: bitwise the same teacher
  # targets and loss, and the FP8 state itself is untouched (an input, never an output).
  assert m1["distill/kl"] == m2["distill/kl"] and m1["train/loss"] == m2["train/loss"]
  assert m3["distill/kl"] != m1["distill/kl"]
  _tree_equal({k: v for k, v in run.teacher_vars.items() if k != "params"}, before)

  # A resumed run recalibrates (build_run calls this) to identical scales, whatever its
  # data stream's position: calibration reads a fresh iterator, never the run's own.
  again, _ = teacher_lib.calibrate_fp8(cfg, run.teacher, run.teacher_params, run.mesh)
  _tree_equal(again, before)
  assert not _tree_differs(first_batch, next(data_lib.make_iterator(cfg, "train")))


@pytest.mark.slow
def test_fp8_teacher_logits_close_to_bf16_on_the_smoke_config():
  cfg = config_lib.load_config(str(ROOT / "configs" / "smoke.py"))
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  batch = sharding.shard_batch(next(data_lib.make_iterator(cfg, "validation")), mesh)
  # The same (random, f32) teacher params under both policies.
  params = teacher_lib.load(cfg, model_of(cfg, "teacher"), mesh, None)[0]["params"]
  logits = {}
  for compute in ("bf16", "fp8"):
    cfg.teacher.policy = f"p=f32,c={compute},o=f32"
    teacher = model_of(cfg, "teacher")
    variables = {"params": params}
    if compute == "fp8":
      variables.update(teacher_lib.calibrate_fp8(cfg, teacher, params, mesh)[0])
    with sharding.rules_context(mesh):
      out = jax.jit(teacher.apply)(variables, batch["inputs"])
    logits[compute] = np.asarray(out["logits"], np.float32)
  rms = lambda x: np.sqrt(np.mean(np.square(x)))
  err = rms(logits["fp8"] - logits["bf16"]) / rms(logits["bf16"])
  # e4m3 keeps 3 mantissa bits (bf16: 8): the FP8 teacher's logits differ from the bf16
  # teacher's, but by under 10% RMS (measured: 4.3%).
  assert 0 < err < 0.10, err


def test_pretraining_a_low_precision_teacher(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.teacher.update(source="pretrain", pretrain_steps=2, policy="p=f16,c=f16,o=f32")
  t = teacher_lib.pretrain_config(cfg)
  assert (t.student.policy, t.optim.loss_scale) == ("p=f32,c=float16,o=f32", "dynamic")
  validate.validate(t)  # check_trainable accepts it
  cfg.teacher.policy = "p=bf16,c=fp8,o=f32"  # trains in bf16; scales are calibrated later
  t = teacher_lib.pretrain_config(cfg)
  assert (t.student.policy, t.optim.loss_scale) == ("p=f32,c=bfloat16,o=f32", "none")
