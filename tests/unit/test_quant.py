"""Int8 quantisation (models/quant.py, quantize.py): qwix's fake quantisation against NumPy,
the straight-through gradient, int8 matmuls against float, static scales through a checkpoint,
QAT distillation runs, PTQ and int8 files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing import host_variables

# The 8 fake devices of the test session as one data-parallel mesh for `eval`.
ONE_MESH = [("mesh.data", "-1")]


def _quantise_np(x, scale, zero_point=0):
  """NumPy int8: round half to even (np.rint, as jnp.round), then saturate to [-128, 127]
  (jax's float -> int8 conversion clamps); in float32, as qwix computes it (in float64 a
  value at max|w| is exactly 127.5 and may round the other way)."""
  q = np.float32(x) / np.float32(scale) + np.float32(zero_point)
  return np.clip(np.rint(q), -128, 127).astype(np.int64)


def _einsum_dense(equation, shape, x, act="symmetric"):
  """A QAT EinsumDense-like module (named "query", so the transformer rule matches)."""
  import flax.linen as nn

  from jaxdistill.models import quant

  class Proj(nn.Module):
    @nn.compact
    def __call__(self, x):
      k = self.param("kernel", nn.initializers.normal(1.0), shape)
      return jnp.einsum(equation, x, k)

  class Outer(nn.Module):
    config = None

    @nn.compact
    def __call__(self, x):
      return Proj(name="query")(x)

  return quant.qat_model(Outer(), act)


@pytest.mark.parametrize("act", ["symmetric", "asymmetric"])
def test_fake_quantisation_matches_numpy_int8(act):
  """Weights per output channel (max|w| / 127.5: qwix's bound is qmax + 0.5), activations per
  tensor with the calibrated static scale; values outside it saturate."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32) * 3
  model = _einsum_dense("btd,dhk->bthk", (8, 2, 4), x, act)
  w = rng.normal(size=(8, 2, 4)).astype(np.float32)
  # Each channel's max |w| divides to exactly 127.5 (a tie); XLA's division may land 1 ulp off,
  # which decides -128 or -127 for a negative maximum. Positive maxima (127.5 -> 128 -> 127 or
  # 127.49.. -> 127) are unambiguous, so the channels are signed to have them.
  at = np.abs(w).reshape(8, -1).argmax(axis=0)
  w *= np.sign(w.reshape(8, -1)[at, np.arange(8)]).reshape(1, 2, 4)
  variables = {**model.init(jax.random.key(0), x), "params": {"query": {"kernel": jnp.asarray(w)}}}
  calib = x * 0.5  # a smaller range: x then overflows it and must saturate
  # Under jit, as training runs it: qwix tells weights from activations by tracing an operand
  # back to a param (eagerly it can only guess by shape).
  _, upd = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats"]))(variables, calib)
  y = np.asarray(jax.jit(model.apply)({**variables, **upd}, x))

  w_scale = np.abs(w).max(axis=0, keepdims=True) / np.float32(127.5)  # [1, H, K], float32
  w_q = _quantise_np(w, w_scale)
  assert w_q.max() == 127 and w_q.min() >= -127
  if act == "symmetric":
    x_scale, zp = np.abs(calib).max() / np.float32(127.5), 0
  else:  # minmax over [min(x, 0), max(x, 0)] onto [-128, 127], zero point rounded
    lo, hi = min(calib.min(), 0), max(calib.max(), 0)
    x_scale = np.float32(hi - lo) / np.float32(255)
    zp = np.rint(np.float32(-128) - np.float32(lo) / x_scale)
  x_q = _quantise_np(x, x_scale, zp)
  assert x_q.max() == 127 and x_q.min() == -128  # saturated
  acc = np.einsum("btd,dhk->bthk", x_q - zp, w_q)
  want = acc * x_scale * w_scale
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=1e-5 * np.abs(want).max())
  # Rounding is half to even: 2.5 -> 2, 3.5 -> 4 (np.rint), the same as jnp.round.
  np.testing.assert_array_equal(np.asarray(jnp.round(jnp.array([2.5, 3.5, -2.5]))), [2, 4, -2])


def test_straight_through_gradient():
  """qwix's backward is the float matmul's (residuals unquantised, no clipping mask for
  absmax): d/dx and d/dw of sum(y * g) equal those of the float einsum, even for x
  outside the static range."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 8)).astype(np.float32)
  model = _einsum_dense("btd,dhk->bthk", (8, 2, 4), x)
  variables = model.init(jax.random.key(0), x)
  _, upd = jax.jit(lambda v, x: model.apply(v, x, mutable=["quant_stats"]))(variables, x * 0.3)
  g = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
  loss = lambda p, x: jnp.sum(model.apply({"params": p, **upd}, x) * g)
  dw, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
  w = np.asarray(variables["params"]["query"]["kernel"])
  np.testing.assert_allclose(np.asarray(dx), np.einsum("bthk,dhk->btd", g, w), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(dw["query"]["kernel"]), np.einsum("btd,bthk->dhk", x, g), rtol=1e-5, atol=1e-6
  )


def test_int8_dot_general_is_exact_int32_and_equals_dequantised_float():
  import qwix

  rng = np.random.default_rng(2)
  a = qwix.quantize(jnp.asarray(rng.normal(size=(5, 64)), jnp.float32), jnp.int8)
  b = qwix.quantize(
    jnp.asarray(rng.normal(size=(64, 7)), jnp.float32), jnp.int8, channelwise_axes=(1,)
  )
  dims = (((1,), (0,)), ((), ()))
  acc = jax.lax.dot_general(a.qvalue, b.qvalue, dims, preferred_element_type=jnp.int32)
  assert acc.dtype == jnp.int32
  exact = np.asarray(a.qvalue, np.int64) @ np.asarray(b.qvalue, np.int64)
  np.testing.assert_array_equal(np.asarray(acc), exact)
  y = qwix.dot_general(a, b, dims)
  deq = np.asarray(qwix.dequantize(a), np.float64) @ np.asarray(qwix.dequantize(b), np.float64)
  np.testing.assert_allclose(np.asarray(y), deq, rtol=1e-5, atol=1e-6)
  hlo = jax.jit(lambda a, b: qwix.dot_general(a, b, dims)).lower(a, b).compile().as_text()
  assert "s32[5,7]" in hlo and "dot(" in hlo  # the compiled matmul is int8 x int8 -> int32


def test_policy_parsing_and_errors():
  from jaxdistill.errors import ConfigError
  from jaxdistill.parallel.precision import parse_policy

  p = parse_policy("p=f32,c=int8", "student.policy")
  assert p.int8 == "symmetric" and not p.fp8 and p.compute_dtype == jnp.float32
  assert parse_policy("c=int8,a=asym").int8 == "asymmetric"
  assert str(parse_policy("c=int8,a=asymmetric")) == "p=float32,c=int8,o=float32,a=asymmetric"
  with pytest.raises(ConfigError, match=r"student.policy.*c=fp8 and c=int8"):
    parse_policy("p=f32,c=fp8,c=int8", "student.policy")
  with pytest.raises(ConfigError, match=r"student.policy.*add c=int8"):
    parse_policy("p=f32,a=symmetric", "student.policy")
  with pytest.raises(ConfigError, match=r"a=sideways"):
    parse_policy("c=int8,a=sideways", "student.policy")
  with pytest.raises(ConfigError, match="matmul mode"):
    parse_policy("p=int8")


def _tiny_qat(tiny_config, act="symmetric"):
  cfg = tiny_config
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.student.policy = f"p=f32,c=int8,a={act}"
  cfg.student.quant_calibration_batches = 2
  cfg.optim.steps = 2
  cfg.teacher.num_layers = 2  # only the KD source: a smaller random teacher compiles faster
  return cfg


def test_teacher_int8_is_a_config_error(tiny_config):
  from jaxdistill.errors import ConfigError
  from jaxdistill.train import loop

  tiny_config.teacher.policy = "p=f32,c=int8"
  with pytest.raises(ConfigError, match="teacher.policy"):
    loop.build_run(tiny_config, devices=jax.devices()[:1])


@pytest.mark.slow
def test_qat_scales_survive_a_checkpoint_and_int8_export(tiny_config, tmp_path):
  """A QAT distillation: calibrated scales in model_state, finite losses, unchanged by the
  steps, restored bitwise from the checkpoint; W/int8 computes what the QAT student does."""
  from jaxdistill import models
  from jaxdistill.compress import ptq as quantize
  from jaxdistill.train import checkpoint, loop
  from jaxdistill.train import run as run_lib

  cfg = _tiny_qat(tiny_config)
  cfg.ckpt.every = 1
  workdir = str(tmp_path / "qat")
  summary = loop.train(cfg, workdir, devices=jax.devices()[:1])
  rows = [json.loads(r) for r in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) == 2 and np.all(np.isfinite(losses)), summary
  # The restore target (abstract state) and the student module; its random teacher is unused
  # here, so host-filled values stand in for it (a random init would only add its compile).
  teacher = host_variables(run_lib.model_of(cfg, "teacher"))
  run = loop.build_run(
    cfg, devices=jax.devices()[:1], create_state=False, teacher_vars=teacher, data=False
  )
  manager = checkpoint.make_manager(workdir, cfg.ckpt)
  state, _ = checkpoint.restore(manager, 2, run.state, None)
  first, _ = checkpoint.restore(manager, 1, run.state, None)
  manager.close()
  stats = jax.device_get(state.model_state["quant_stats"])
  counts = [int(c) for p, c in jax.tree_util.tree_flatten_with_path(stats)[0] if "count" in str(p)]
  assert counts and set(counts) == {2}  # two calibration batches, never updated by training
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(first.model_state["quant_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(jax.device_get(b)))

  module, variables, meta = quantize.load_int8(os.path.join(workdir, "int8"), run.mesh)
  assert meta["act"] == "symmetric" and meta["qwix"] == "0.1.8"
  kernel = variables["params"]["block_0"]["attn"]["query"]["kernel"].array
  assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape == (1, 2, 16)
  batch = {"inputs": np.arange(32, dtype=np.int32).reshape(2, 16) % 64}
  qat_vars = {"params": state.params["student"], **state.model_state}
  logits = lambda m: jax.jit(lambda v, b: models.apply(m, v, b)["logits"])
  want = np.asarray(logits(run.student)(qat_vars, batch))
  got = np.asarray(logits(module)(variables, batch))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # `jaxdistill eval` of a c=int8 run measures that int8 model.
  from jaxdistill.evaluation import job as eval_run

  result = eval_run.evaluate_workdir(workdir, overrides=ONE_MESH, name="v", batches=2)
  assert result["params_source"] == "int8" and np.isfinite(result["models"]["student"]["val_loss"])


@pytest.mark.slow
def test_qat_cnn_steps_and_ptq_of_a_float_student(tiny_config, tmp_path):
  """A CNN student distils under c=int8 (asymmetric) with finite losses; PTQ of a float CNN
  run writes int8 files whose model evaluates close to the float one with int32 convs."""
  from jaxdistill.compress import ptq as quantize
  from jaxdistill.errors import JaxdistillError
  from jaxdistill.evaluation import evaluate
  from jaxdistill.evaluation import job as eval_run
  from jaxdistill.models import quant
  from jaxdistill.train import loop
  from jaxdistill.train import run as run_lib
  from jaxdistill.train import teacher as teacher_lib

  image = dict(arch="cnn", cnn_channels="4,8", cnn_fc=16, num_classes=10, image_size=8)
  cfg = tiny_config
  cfg.student.update(image_channels=3, **image)
  cfg.teacher.update(image_channels=3, **dict(image, cnn_channels="8,8"))
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.data.update(batch_size=8, pad_fraction=0.0)
  cfg = _tiny_qat(cfg, "asymmetric")
  # Host-filled params (the float run below is the one that initialises at random; a CNN's
  # random init is what compiles slowest here), the QAT scales' state zero as initialised.
  given = {side: host_variables(run_lib.model_of(cfg, side)) for side in ("student", "teacher")}
  run = loop.build_run(
    cfg, devices=jax.devices()[:1], student_vars=given["student"], teacher_vars=given["teacher"]
  )
  run.state = teacher_lib.calibrate_int8(cfg, run.student, run.state, run.mesh)
  losses = []
  loop.run_steps(run, 2, lambda step, m, t: losses.append(float(m["train/loss"])))
  assert len(losses) == 2 and np.all(np.isfinite(losses))

  cfg.student.policy = "p=f32,c=f32,o=f32"
  workdir = str(tmp_path / "float")
  loop.train(cfg, workdir, devices=jax.devices()[:1])
  out = quantize.ptq(workdir, calibration_batches=2, act="asymmetric", devices=jax.devices()[:1])
  module, variables, meta = quantize.load_int8(out, run.mesh)
  assert quant.act_of(module) == "asymmetric" and meta["section"]["arch"] == "cnn"
  assert variables["params"]["conv_1"]["kernel"].array.qvalue.dtype == jnp.int8
  batches = list(evaluate.validation_batches(cfg, limit=2))
  float_student = run_lib.model_of(cfg, "student")  # the float run's student module
  fvars, _ = evaluate.load_variables(
    float_student, os.path.join(workdir, "final_params"), run.mesh, 16
  )
  res = evaluate.evaluate(
    {"f32": (float_student, fvars["params"]), "int8": (module, variables["params"])},
    batches,
    run.mesh,
  )
  assert abs(res["int8"]["val_loss"] - res["f32"]["val_loss"]) < 0.05 * res["f32"]["val_loss"]
  hlo = (
    jax.jit(lambda v, x: module.apply(v, x))
    .lower(variables, jnp.zeros((1, 8, 8, 3)))
    .compile()
    .as_text()
  )
  assert "s32[1,8,8,4]" in hlo and "convolution(" in hlo  # int8 conv, int32 accumulation

  # `jaxdistill quantize` makes the PTQ a workdir that `jaxdistill eval` runs through int8/.
  dst = str(tmp_path / "ptq")
  record = quantize.ptq_workdir(workdir, dst, 2, "asymmetric", devices=jax.devices()[:1])
  assert record["act"] == "asymmetric" and not os.path.exists(dst + ".partial")
  result = eval_run.evaluate_workdir(dst, overrides=ONE_MESH, name="v", batches=2)
  assert result["params_source"] == "int8"
  assert result["models"]["student"]["val_loss"] == pytest.approx(res["int8"]["val_loss"], 1e-4)
  assert set(result["size"]["student"]["bytes_by_dtype"]) >= {"int8"}
  with pytest.raises(JaxdistillError, match="not empty"):
    quantize.ptq_workdir(workdir, dst)
  with pytest.raises(JaxdistillError, match="already an int8"):
    quantize.ptq_workdir(dst, str(tmp_path / "again"))
