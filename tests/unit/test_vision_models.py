"""Image classifiers (models/cnn.py, resnet.py, vision_config.py) and their path through the
models API: parameter counts against hand arithmetic, feature maps only on request, BatchNorm
train / eval semantics, a sharded forward equal to the single-device one, config errors naming
the key. Shapes come from ``jax.eval_shape`` where no numbers are needed (nothing compiles)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.models import cnn, resnet
from jaxdistill.models.vision_config import FieldError, VisionConfig
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib

F32 = precision.parse_policy("p=f32", "student.policy")
TEACHER = dict(arch="cnn", cnn_channels="32,64", cnn_fc=512)
STUDENT = dict(arch="cnn", cnn_channels="16,32", cnn_fc=256)
DIGITS = dict(image_size=28, image_channels=1)


def section(**overrides):
  """A ``student`` config section (the schema's defaults: 32x32x3, 10 classes) with overrides."""
  s = config_lib.default_config().student
  s.update(overrides)
  return s


def abstract(model):
  return jax.eval_shape(lambda r: models.init_variables(model, r, 0), jax.random.key(0))


def out_shapes(model, batch=2, **request):
  """Shapes of ``models.apply``'s outputs on a [batch, S, S, C] input, without running it."""
  cfg = model.config
  images = jax.ShapeDtypeStruct(
    (batch, cfg.image_size, cfg.image_size, cfg.image_channels), jnp.float32
  )
  fn = lambda v, x: models.apply(model, nn.unbox(v), {"inputs": x}, **request)  # noqa: E731
  return jax.tree.map(lambda a: a.shape, jax.eval_shape(fn, abstract(model), images))


# --- parameter counts, against the arithmetic -----------------------------------------------


def test_classic_pair_parameter_counts():
  teacher = models.build(section(**TEACHER), F32, "teacher")
  student = models.build(section(**STUDENT), F32, "student")
  assert isinstance(teacher, cnn.SimpleCNN)
  t_vars, s_vars = abstract(teacher), abstract(student)
  assert set(t_vars) == {"params"}  # no BatchNorm, no batch_stats
  # conv 3->32 (3*3*3*32 + 32), conv 32->64, fc 8*8*64 -> 512, fc 512 -> 10 (weights + biases)
  assert models.count_params(t_vars) == 2_122_186
  assert models.count_params(t_vars) == (
    (27 * 32 + 32) + (9 * 32 * 64 + 64) + (4096 * 512 + 512) + (512 * 10 + 10)
  )
  assert models.count_params(s_vars) == (
    (27 * 16 + 16) + (9 * 16 * 32 + 32) + (2048 * 256 + 256) + (256 * 10 + 10)
  )
  assert models.count_params(s_vars) == 532_202
  kernels = {k: v["kernel"].shape for k, v in nn.unbox(t_vars)["params"].items()}
  assert kernels == {
    "conv_1": (3, 3, 3, 32),
    "conv_2": (3, 3, 32, 64),
    "fc": (4096, 512),
    "head": (512, 10),
  }
  digits = abstract(models.build(section(**STUDENT, **DIGITS), F32, "student"))
  assert nn.unbox(digits)["params"]["fc"]["kernel"].shape == (7 * 7 * 32, 256)


def test_resnet20_parameter_count_is_the_papers():
  model = models.build(section(arch="resnet", depth=20), F32, "student")
  assert isinstance(model, resnet.ResNet)
  variables = abstract(model)
  conv = lambda cin, cout: 9 * cin * cout  # noqa: E731  (3x3, no bias)
  bn = lambda c: 2 * c  # noqa: E731  (scale, bias; mean and var are batch_stats)
  stem = conv(3, 16) + bn(16)
  stage1 = 3 * (conv(16, 16) + conv(16, 16) + 2 * bn(16))
  stage2 = conv(16, 32) + conv(32, 32) + 2 * bn(32) + 2 * (2 * conv(32, 32) + 2 * bn(32))
  stage3 = conv(32, 64) + conv(64, 64) + 2 * bn(64) + 2 * (2 * conv(64, 64) + 2 * bn(64))
  head = 64 * 10 + 10
  want = stem + stage1 + stage2 + stage3 + head  # option-A shortcuts hold no params
  assert want == 269_722
  assert models.count_params(variables["params"]) == want
  # 19 BatchNorms: the stem's and two per block, mean and var each
  assert models.count_params(variables["batch_stats"]) == 2 * (16 + 3 * 2 * 16 + 6 * 32 + 6 * 64)
  assert models.count_params(abstract(models.build(section(arch="resnet", depth=56), F32, "s"))[
    "params"
  ]) == 853_018  # fmt: skip


def test_wrn_16_2_parameter_count():
  model = models.build(section(arch="wrn", depth=16, widen=2), F32, "student")
  assert isinstance(model, resnet.WideResNet)
  conv = lambda cin, cout, k=3: k * k * cin * cout  # noqa: E731
  bn = lambda c: 2 * c  # noqa: E731

  def stage(cin, c):  # two blocks; the first projects through a 1x1 conv
    first = bn(cin) + conv(cin, c) + bn(c) + conv(c, c) + conv(cin, c, 1)
    return first + 2 * bn(c) + 2 * conv(c, c)

  want = conv(3, 16) + stage(16, 32) + stage(32, 64) + stage(64, 128) + bn(128) + 128 * 10 + 10
  assert want == 691_674
  assert models.count_params(abstract(model)["params"]) == want


def test_flops_per_example_counts_convs_and_fcs():
  classic = VisionConfig(**{**TEACHER, "cnn_channels": (32, 64)})
  macs = 32 * 32 * 27 * 32 + 16 * 16 * 9 * 32 * 64 + 4096 * 512 + 512 * 10
  assert models.flops_per_example(classic) == 2 * macs == 15_411_200
  # ResNet-20: the 40.55M multiply-adds the literature quotes
  assert models.flops_per_example(VisionConfig("resnet", depth=20)) == 2 * 40_551_040


# --- outputs: only what was requested, in the policy's dtypes ------------------------------


@pytest.mark.parametrize(
  "arch,shape,want",
  [
    (TEACHER, DIGITS, {1: (14, 14, 32), 2: (7, 7, 64)}),
    (TEACHER, {}, {1: (16, 16, 32), 2: (8, 8, 64)}),
    (dict(arch="resnet", depth=20), {}, {1: (32, 32, 16), 2: (16, 16, 32), 3: (8, 8, 64)}),
    (
      dict(arch="wrn", depth=16, widen=2),
      DIGITS,
      {1: (28, 28, 32), 2: (14, 14, 64), 3: (7, 7, 128)},
    ),
  ],
)
def test_features_and_pre_logits_only_on_request(arch, shape, want):
  model = models.build(section(**arch, **shape), F32, "student")
  assert model.config.stage_shapes == tuple(want[s] for s in sorted(want))
  assert model.config.num_stages == len(want)
  assert out_shapes(model, 3) == {"logits": (3, 10)}
  # train=True adds only the updated statistics of BatchNorm models
  batch_norm = {"batch_stats"} if arch["arch"] != "cnn" else set()
  assert set(out_shapes(model, 3, train=True, feature_stages=())) == {"logits"} | batch_norm
  got = out_shapes(model, 3, feature_stages=tuple(want), return_pre_logits=True)
  assert got["features"] == {s: (3, *hwc) for s, hwc in want.items()}
  assert got["pre_logits"] == (3, model.config.pre_logits_dim)
  last = max(want)
  assert out_shapes(model, 3, feature_stages=(last,))["features"] == {last: (3, *want[last])}
  with pytest.raises(ValueError, match="feature stage"):
    out_shapes(model, 3, feature_stages=(last + 1,))


def test_dtypes_follow_the_policy():
  policy = precision.parse_policy("p=f32,c=bf16,o=f32", "student.policy")
  model = models.build(section(arch="resnet", depth=8, image_size=8), policy, "student")
  variables = abstract(model)
  x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  fn = lambda v, x: models.apply(model, nn.unbox(v), {"inputs": x}, feature_stages=(1,), train=True)
  out = jax.eval_shape(fn, variables, x)
  assert out["logits"].dtype == jnp.float32
  assert out["features"][1].dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree.leaves(nn.unbox(variables)["params"])} == {
    jnp.dtype(jnp.float32)
  }
  assert {a.dtype for a in jax.tree.leaves(out["batch_stats"])} == {jnp.dtype(jnp.float32)}


def test_apply_refuses_transformer_requests_for_a_vision_model():
  model = models.build(section(**STUDENT), F32, "student")
  assert out_shapes(model, hidden_layers=(), return_logits=True) == {"logits": (2, 10)}
  with pytest.raises(ValueError, match="hidden_layers"):
    out_shapes(model, hidden_layers=(1,))
  with pytest.raises(ValueError, match="return_logits"):
    out_shapes(model, return_logits=False)
  with pytest.raises(ValueError, match="images must be"):
    jax.eval_shape(
      lambda v: models.apply(model, nn.unbox(v), {"inputs": jnp.zeros((2, 28, 28, 3))}),
      abstract(model),
    )


# --- BatchNorm ------------------------------------------------------------------------------

TINY_RESNET = dict(arch="resnet", depth=8, image_size=8, image_channels=3, num_classes=4)


def _tiny(arch=TINY_RESNET):
  """A small model, its variables filled on the host (no init to compile) and 8 images."""
  model = models.build(section(**arch), F32, "student")
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("mean", "var", "scale"):  # BatchNorm: statistics and scales near their init
      return 0.5 * (name != "mean") + rng.uniform(0.5, 1.0, leaf.shape).astype(np.float32)
    fan_in = np.prod(leaf.shape[:-1]) if name == "kernel" else 10
    return rng.normal(0.0, 1.5 / np.sqrt(fan_in), leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract(model)))
  images = rng.normal(1.0, 2.0, (8, 8, 8, model.config.image_channels)).astype(np.float32)
  return model, variables, images


def test_batchnorm_train_updates_statistics_and_eval_uses_them():
  model, variables, images = _tiny()
  run = lambda v, x, train: models.apply(model, v, {"inputs": x}, train=train)  # noqa: E731

  @jax.jit
  def everything(variables, images):
    train, evaluated = run(variables, images, True), run(variables, images, False)
    updated = dict(variables, batch_stats=train["batch_stats"])
    return dict(
      train=train,
      eval=evaluated,
      eval_row=run(variables, images[:1], False),
      train_row=run(variables, images[:1], True),
      eval_updated=run(updated, images, False),
    )

  got = everything(variables, images)
  stats, old = got["train"]["batch_stats"], variables["batch_stats"]
  assert jax.tree.structure(stats) == jax.tree.structure(old)
  # The stem BN's new running mean / var: momentum 0.9 towards the batch's (biased) statistics
  # over B, H, W of the stem conv's output.
  conv_BxHxWxC = jax.lax.conv_general_dilated(
    images,
    variables["params"]["stem"]["kernel"],
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  mean_C, var_C = conv_BxHxWxC.mean(axis=(0, 1, 2)), conv_BxHxWxC.var(axis=(0, 1, 2))
  want_mean = 0.9 * old["stem_bn"]["mean"] + 0.1 * mean_C
  want_var = 0.9 * old["stem_bn"]["var"] + 0.1 * var_C
  np.testing.assert_allclose(stats["stem_bn"]["mean"], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["stem_bn"]["var"], want_var, rtol=1e-4, atol=1e-5)
  # Eval mode: no statistics returned, each example's logits independent of its batch, and the
  # stored statistics (not the batch's) used.
  assert set(got["eval"]) == {"logits"}
  np.testing.assert_allclose(got["eval_row"]["logits"], got["eval"]["logits"][:1], rtol=1e-5)
  assert not np.allclose(got["train_row"]["logits"], got["train"]["logits"][:1], atol=1e-3)
  assert not np.allclose(got["eval_updated"]["logits"], got["eval"]["logits"], atol=1e-3)


# --- sharding: a (data=2, fsdp=2, tensor=2) mesh computes what one device does ----------------


@pytest.mark.parametrize(
  "arch",
  [
    TINY_RESNET,
    dict(arch="wrn", depth=10, widen=2, image_size=8, num_classes=4),
    dict(arch="cnn", cnn_channels="8,16", cnn_fc=16, image_size=8, image_channels=1),
  ],
  ids=["resnet", "wrn", "cnn"],
)
def test_sharded_forward_equals_single_device(arch):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (host) devices")
  model, single, images = _tiny(arch)
  stages = tuple(range(1, model.config.num_stages + 1))
  fwd = lambda v, x: models.apply(  # noqa: E731
    model, v, {"inputs": x}, train=True, feature_stages=stages, return_pre_logits=True
  )
  want = jax.jit(fwd)(single, images)  # one device
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  # The shardings create_variables / abstract_variables use (random init is slow to compile on
  # CPU, so the same host-filled values are placed in them instead).
  shardings = models.variable_shardings(model, mesh, 0)
  assert set(shardings) == ({"params"} if arch["arch"] == "cnn" else {"params", "batch_stats"})
  specs = {s.spec for s in jax.tree.leaves(shardings["params"])}
  assert P(None, None, None, "tensor") in specs  # conv output channels split over tensor
  assert P("tensor") in specs  # and their biases / BatchNorm scales
  variables = jax.device_put(single, shardings)
  x = jax.device_put(images, sharding_lib.batch_sharding(mesh))
  with sharding_lib.rules_context(mesh):
    got = jax.jit(fwd)(variables, x)
  assert got["logits"].sharding.spec == P(("data", "fsdp"))
  assert got["features"][1].sharding.spec == P(("data", "fsdp"), None, None, "tensor")
  # BatchNorm statistics are the global batch's: equal to the single device's
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


# --- config errors name the key ----------------------------------------------------------------


@pytest.mark.parametrize(
  "overrides,key",
  [
    (dict(arch="vit"), "student.arch"),
    (dict(arch="resnet", depth=21), "student.depth"),
    (dict(arch="wrn", depth=20, widen=2), "student.depth"),
    (dict(arch="resnet", widen=2), "student.widen"),
    (dict(arch="resnet", image_size=30), "student.image_size"),
    (dict(arch="cnn", image_size=30), "student.image_size"),
    (dict(arch="cnn", cnn_channels="32,x"), "student.cnn_channels"),
    (dict(arch="cnn", cnn_channels=""), "student.cnn_channels"),
    (dict(arch="cnn", cnn_fc=0), "student.cnn_fc"),
    (dict(arch="cnn", num_classes=1), "student.num_classes"),
    (dict(arch="wrn", depth=16, image_channels=0), "student.image_channels"),
    (dict(arch="wrn", depth=16, widen=0), "student.widen"),
  ],
)
def test_bad_vision_keys_raise_config_error_naming_the_key(overrides, key):
  with pytest.raises(ConfigError) as e:
    models.build(section(**overrides), F32, "student")
  assert e.value.key == key and str(e.value).startswith(key + ": ")


def test_fp8_policy_is_refused_for_a_vision_model():
  fp8 = precision.parse_policy("c=fp8", "teacher.policy")
  with pytest.raises(ConfigError) as e:
    models.build(section(**TEACHER), fp8, "teacher")
  assert e.value.key == "teacher.policy"


def test_vision_config_parses_channels_and_names_bad_fields():
  cfg = VisionConfig("cnn", cnn_channels="16, 32")
  assert cfg.cnn_channels == (16, 32) and cfg == VisionConfig("cnn", cnn_channels=(16, 32))
  with pytest.raises(FieldError, match="^depth: resnet depth must be 6n\\+2"):
    VisionConfig("resnet", depth=22)
  assert models.is_vision(cfg) and models.is_vision(models.module_for(cfg))
  assert models.is_vision(section(arch="wrn")) and not models.is_vision(section())
  assert models.shape_keys(section(arch="cnn")) == models.VISION_KEYS
  assert models.shape_keys(section()) == models.MODEL_KEYS


# --- the keys that copy / compare model shapes outside models/ ---------------------------------


def test_pretrained_teacher_config_copies_the_vision_keys():
  from jaxdistill.train import teacher

  cfg = config_lib.default_config()
  cfg.student.update(STUDENT)
  cfg.teacher.update(arch="wrn", depth=16, widen=2, num_classes=100, image_size=28)
  cfg.teacher.update(source="pretrain", pretrain_steps=5)
  cfg.distill.attention_transfer.weight = 1.0
  t = teacher.pretrain_config(cfg)
  assert {k: t.student[k] for k in models.VISION_KEYS} == {
    k: cfg.teacher[k] for k in models.VISION_KEYS
  }
  assert t.distill.attention_transfer.weight == 0.0


def test_checkpoint_refuses_a_changed_vision_shape():
  from jaxdistill.train import checkpoint

  old = config_lib.default_config()
  old.student.update(STUDENT)
  new = config_lib.default_config()
  new.student.update(STUDENT)
  new.log.every = old.log.every + 1
  assert checkpoint.check_compatible(old.to_dict(), new.to_dict(), "ckpt") == ["log.every"]
  new.student.cnn_fc = 128
  with pytest.raises(JaxdistillError, match="student.cnn_fc"):
    checkpoint.check_compatible(old.to_dict(), new.to_dict(), "ckpt")
  new.student.update(cnn_fc=256, arch="transformer")
  with pytest.raises(JaxdistillError, match="student.arch"):
    checkpoint.check_compatible(old.to_dict(), new.to_dict(), "ckpt")


def test_transformer_apply_ignores_train():
  # Passing the flag on would fail at trace time (the transformers take no train argument).
  model = models.build(
    section(vocab_size=16, d_model=8, num_layers=1, num_heads=2, d_ff=16), F32, "s"
  )
  assert not models.is_vision(model)
  batch = {"inputs": jax.ShapeDtypeStruct((2, 4), jnp.int32)}
  out = jax.eval_shape(
    lambda v: models.apply(model, nn.unbox(v), batch, train=True), abstract(model)
  )
  assert jax.tree.map(lambda a: a.shape, out) == {"logits": (2, 4, 16)}
