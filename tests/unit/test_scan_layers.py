"""Scanned decoder blocks (``scan_layers``) and per-block remat (issue 29).

A scanned model with params converted by ``models.scan.stack_blocks`` computes what the
unrolled one does (logits, gradients, per-layer outputs, cached greedy decoding); the layout
conversion is exact both ways and saved params load into either layout; remat keeps the
gradients and lowers the backward pass's temporary memory; bad settings are ConfigErrors.
"""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import testing

from jaxdistill import config as config_lib
from jaxdistill import generate, models
from jaxdistill.config import validate
from jaxdistill.errors import ConfigError
from jaxdistill.generate import cache as cache_lib
from jaxdistill.models import hf, scan
from jaxdistill.models.transformer import Transformer, TransformerConfig
from jaxdistill.parallel import sharding
from jaxdistill.train import checkpoint

from conftest import ROOT

V, T, B = 64, 16, 2
FAMILIES = {
  "rope_gqa_swiglu": dict(num_heads=4, num_kv_heads=2),
  "gpt2_shape": dict(
    norm="layernorm", pos="learned", activation="gelu", bias="all", tie_embeddings=False
  ),
}
TOKENS = np.random.default_rng(0).integers(0, V, (B, T)).astype(np.int32)


def _config(**kw) -> TransformerConfig:
  base = dict(vocab_size=V, d_model=32, num_layers=3, num_heads=4, d_ff=64, max_len=32)
  return TransformerConfig(**{**base, **kw})


def _pair(**kw):
  """(unrolled model, scanned model, unrolled variables, the same converted)."""
  cfg = _config(**kw)
  unrolled, scanned = Transformer(cfg), Transformer(dataclasses.replace(cfg, scan_layers=True))
  variables = jax.tree.map(jnp.asarray, testing.host_variables(unrolled))
  return unrolled, scanned, variables, scan.stack_blocks(variables, cfg.num_layers)


def _grad_fn(model):
  """jit of params, tokens -> ((CE loss, logits), grads)."""

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens)["logits"]
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1)), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _close(a, b, tol=1e-6):
  """Equal to ``tol`` (absolute, and relative for entries above 1: XLA fuses the loop body
  differently from the unrolled blocks, so float32 sums round in another order)."""
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=tol, rtol=tol), a, b)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_logits_and_grads_equal_unrolled(family):
  unrolled, scanned, v, sv = _pair(**FAMILIES[family])
  (loss, logits), grads = _grad_fn(unrolled)(v["params"], TOKENS)
  (s_loss, s_logits), s_grads = _grad_fn(scanned)(sv["params"], TOKENS)
  _close(s_logits, logits)
  _close(s_loss, loss)
  assert set(s_grads) == set(sv["params"]) and "blocks" in s_grads
  _close(scan.unstack_blocks(s_grads), grads)


def test_scanned_params_are_stacked_with_a_replicated_layers_axis():
  _, scanned, _, sv = _pair()
  boxed = jax.eval_shape(scanned.init, jax.random.key(0), TOKENS)["params"]
  assert not any(k.startswith("block_") for k in boxed)
  kernel = boxed["blocks"]["attn"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "kv") and kernel.value.shape[0] == 3
  # stack_blocks of the unrolled params has the scanned model's tree and shapes
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, tree)  # noqa: E731
  assert shapes(nn.unbox(boxed)) == shapes(sv["params"])
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": -1})
  spec = sharding.shardings_of(boxed, mesh)["blocks"]["attn"]["query"]["kernel"].spec
  assert spec[0] is None and spec[2] == "tensor"  # layers replicated, heads split


def test_stack_unstack_round_trip_is_exact():
  unrolled, scanned, v, sv = _pair()
  back = scan.unstack_blocks(sv)
  assert jax.tree.structure(back) == jax.tree.structure(v)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  # numpy leaves, boxed leaves and optimizer states convert alike
  as_np = jax.tree.map(np.asarray, v)
  assert isinstance(scan.stack_blocks(as_np)["params"]["blocks"]["mlp_norm"]["scale"], np.ndarray)
  boxed = unrolled.init(jax.random.key(0), TOKENS)
  stacked = scan.stack_blocks(boxed)
  assert stacked["params"]["blocks"]["mlp"]["wo"]["kernel"].names == ("layers", "mlp", "embed")
  unboxed_back = nn.unbox(scan.unstack_blocks(stacked))
  jax.tree.map(np.testing.assert_array_equal, unboxed_back, nn.unbox(boxed))
  opt = optax.adamw(1e-3).init(v["params"])
  s_opt = scan.stack_blocks(opt)
  assert jax.tree.structure(s_opt) == jax.tree.structure(optax.adamw(1e-3).init(sv["params"]))
  assert scan.layout(v) == "unrolled" and scan.layout(sv) == "scanned"
  with pytest.raises(ValueError, match="block_0..block_3"):
    scan.stack_blocks(v["params"], 4)


def test_saved_params_load_into_the_other_layout(tmp_path):
  unrolled, scanned, v, sv = _pair()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  for module, saved, want in ((scanned, v, sv), (unrolled, sv, v)):
    path = str(tmp_path / module.config.scan_layers.__repr__())
    checkpoint.save_params(path, saved["params"])
    target = models.abstract_variables(module, mesh, T)["params"]
    got = checkpoint.load_params(path, target)
    assert jax.tree.structure(got) == jax.tree.structure(want["params"])
    jax.tree.map(np.testing.assert_array_equal, got, want["params"])


def test_per_layer_outputs_under_scan():
  unrolled, scanned, v, sv = _pair()
  request = dict(hidden_layers=(0, 1, 3), attn_layers=(0, 2), qkv_layers=(1,))
  run = lambda model, variables: jax.jit(lambda x: model.apply(x, TOKENS, **request))(variables)  # noqa: E731
  want, got = run(unrolled, v), run(scanned, sv)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  _close(got, want)
  only_hidden = scanned.apply(sv, TOKENS, hidden_layers=(2,))
  assert set(only_hidden) == {"logits", "hidden"} and set(only_hidden["hidden"]) == {2}


def test_greedy_decoding_of_a_scanned_model_equals_unrolled():
  unrolled, scanned, v, sv = _pair(**FAMILIES["rope_gqa_swiglu"])
  prompts = [[3, 9, 27, 17, 51], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
  got = generate.Sampler(scanned, sv).generate(prompts, max_new_tokens=6, logprobs=True)
  want = generate.Sampler(unrolled, v).generate(prompts, max_new_tokens=6, logprobs=True)
  for g, w in zip(got, want):
    assert g.token_ids == w.token_ids
    np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5, rtol=0)
  # the cache keeps its per-block tuple form through a scanned step
  out = scanned.apply(sv, TOKENS[:1, :5], cache=cache_lib.init(scanned.config, 1, 16))
  assert len(out["cache"]["layers"]) == 3 and out["cache"]["layers"][0][0].shape[0] == 1


@pytest.mark.parametrize("remat,scanned", [("full", False), ("dots", True), ("full", True)])
def test_remat_keeps_grads(remat, scanned):
  unrolled, _, v, sv = _pair()
  _, want = _grad_fn(unrolled)(v["params"], TOKENS)
  cfg = dataclasses.replace(unrolled.config, remat=remat, scan_layers=scanned)
  _, got = _grad_fn(Transformer(cfg))((sv if scanned else v)["params"], TOKENS)
  _close(scan.unstack_blocks(got), want)


def _temp_bytes(remat: str, scan_layers: bool = False) -> int:
  cfg = TransformerConfig(
    vocab_size=256, d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=512
  )
  model = Transformer(dataclasses.replace(cfg, remat=remat, scan_layers=scan_layers))
  tokens = jax.ShapeDtypeStruct((4, 512), jnp.int32)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
  compiled = _grad_fn(model).lower(params, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_full_needs_less_temporary_memory():
  # Measured on CPU (BENCHMARKS.md): unrolled 461 -> 437 MiB, scanned 519 -> 148 MiB. XLA's
  # CPU scheduler runs most unrolled recomputation early, so there the saving is small.
  none, full = _temp_bytes("none"), _temp_bytes("full")
  assert full < none, (full, none)
  none, full = _temp_bytes("none", scan_layers=True), _temp_bytes("full", scan_layers=True)
  assert full < 0.5 * none, (full, none)


def _cfg(**student):
  cfg = config_lib.default_config()
  cfg.student.update(testing.SMALL_LM, **student)
  cfg.teacher.update(source="random", **testing.SMALL_LM)
  cfg.data.update(seq_len=16, batch_size=8)
  return cfg


def test_config_keys_are_checked():
  validate.validate(_cfg(scan_layers=True, remat="dots"))
  cases = [
    (dict(remat="some"), "student.remat"),
    (dict(scan_layers=True, encoder=True), "student.scan_layers"),
    (dict(scan_layers=True, policy="p=f32,c=int8"), "student.scan_layers"),
    (dict(arch="cnn", scan_layers=True), "student.scan_layers"),
    (dict(arch="resnet", remat="full"), "student.remat"),
  ]
  for student, key in cases:
    with pytest.raises(ConfigError) as e:
      validate.validate(_cfg(**student))
    assert e.value.key == key, (student, e.value)
  cfg = _cfg()
  cfg.teacher.remat = "all"
  with pytest.raises(ConfigError, match="teacher.remat"):
    validate.validate(cfg)
  # a section written before the keys existed builds with their defaults
  section = {k: v for k, v in _cfg().student.items() if k not in ("scan_layers", "remat")}
  built = models.build(section, models_policy(), "student")
  assert not built.config.scan_layers and built.config.remat == "none"
  with pytest.raises(ConfigError) as e:  # a plain dict section (a config.json) is not typed
    models.build(dict(section, scan_layers=1), models_policy(), "teacher")
  assert e.value.key == "teacher.scan_layers"


def models_policy():
  from jaxdistill.parallel import precision

  return precision.parse_policy("p=f32,c=f32,o=f32", "student.policy")


def test_hf_params_load_into_a_scanned_model():
  path = os.path.join(str(ROOT), "tests", "fixtures", "hf", "llama_tiny")
  hfm, params = hf.load(path)
  scanned = dataclasses.replace(hfm, config=dataclasses.replace(hfm.config, scan_layers=True))
  _, s_params = hf.load(path, scanned)
  assert "blocks" in s_params
  want = hfm.module().apply({"params": params}, TOKENS % hfm.config.vocab_size)["logits"]
  got = scanned.module().apply({"params": s_params}, TOKENS % hfm.config.vocab_size)["logits"]
  _close(got, want, tol=1e-5)


def _tokens_batch(cfg):
  rng = np.random.default_rng(0)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  tokens = rng.integers(0, cfg.student.vocab_size, (b, t + 1), dtype=np.int32)
  return dict(
    inputs=tokens[:, :-1],
    targets=tokens[:, 1:],
    weights=np.ones((b, t), np.float32),
    segment_ids=np.ones((b, t), np.int32),
    positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
  )


@pytest.mark.slow
def test_distill_step_with_scanned_remat_models_equals_unrolled():
  """One real step (logit, CE, attention and hidden-state losses) with a scanned student
  (remat dots) and a scanned teacher (remat full) equals the unrolled step."""
  from jaxdistill.train import run as run_lib

  cfg = testing.tiny_config()
  student = Transformer(models.build(cfg.student, models_policy(), "student").config)
  teacher = Transformer(models.build(cfg.teacher, models_policy(), "teacher").config)
  given = dict(student=testing.host_variables(student), teacher=testing.host_variables(teacher, 1))
  results = []
  for scanned in (False, True):
    if scanned:
      cfg.student.update(scan_layers=True, remat="dots")
      cfg.teacher.update(scan_layers=True, remat="full")
    variables = {k: scan.to_layout(v, scanned) for k, v in given.items()}
    run = run_lib.build_run(
      cfg,
      devices=jax.devices()[:1],
      student_vars=variables["student"],
      teacher_vars=variables["teacher"],
      data=False,
    )
    metrics = jax.device_get(run.step(sharding.shard_batch(_tokens_batch(cfg), run.mesh)))
    results.append((metrics, jax.device_get(scan.unstack_blocks(run.state.params["student"]))))
  (m0, p0), (m1, p1) = results
  for key in ("train/loss", "train/attention", "train/hidden"):
    if key in m0:
      np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, atol=1e-6)
  _close(p1, p0, tol=1e-5)


def test_student_from_teacher_blocks_across_layouts():
  from jaxdistill.models import surgery
  from jaxdistill.train import teacher as teacher_lib

  cfg = _cfg(init_layers="0,2")
  cfg.teacher.update(num_layers=3)
  t_cfg = _config(**{k: cfg.teacher[k] for k in ("d_model", "num_heads", "d_ff", "num_layers")})
  t_params = jax.tree.map(jnp.asarray, testing.host_variables(Transformer(t_cfg)))["params"]
  want = surgery.init_from_teacher(t_params, (0, 2))
  for t_scanned, s_scanned in ((True, False), (False, True), (True, True)):
    student = scan.to_layout(want, s_scanned)
    got = teacher_lib.student_from_teacher(cfg, scan.to_layout(t_params, t_scanned), student)
    assert scan.layout(got) == ("scanned" if s_scanned else "unrolled")
    jax.tree.map(np.testing.assert_array_equal, scan.to_layout(got, False), want)


def test_resume_ignores_remat_and_refuses_another_layout():
  saved = _cfg().to_dict()
  assert "student.remat" in checkpoint.check_compatible(saved, _cfg(remat="full").to_dict(), "W")
  with pytest.raises(Exception, match="student.scan_layers"):
    checkpoint.check_compatible(saved, _cfg(scan_layers=True).to_dict(), "W")


def test_weight_only_int8_decoding_of_a_scanned_model():
  from jaxdistill.generate import int8_weights

  unrolled, scanned, v, sv = _pair()
  m8, v8 = int8_weights.quantize(unrolled, v)
  s8, sv8 = int8_weights.quantize(scanned, sv)
  run = lambda m, x: jax.jit(lambda y: m.apply(y, TOKENS)["logits"])(x)  # noqa: E731
  np.testing.assert_array_equal(run(s8, sv8), run(m8, v8))


@pytest.mark.slow
def test_encoder_remat_keeps_grads():
  from jaxdistill.models import bert

  cfg = _config(encoder=True, norm="layernorm", pos="learned", activation="gelu_erf", bias="all")
  plain = bert.Encoder(cfg)
  v = jax.tree.map(jnp.asarray, testing.host_variables(plain))

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, TOKENS)["embedding"] ** 3)  # noqa: E731
    return jax.jit(jax.grad(loss))(v["params"])

  _close(grads(bert.Encoder(dataclasses.replace(cfg, remat="full"))), grads(plain))
