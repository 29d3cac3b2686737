import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # noqa: E501,E702

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxdistill.models.flops import flops_per_token
from jaxdistill.models.layers import Norm, apply_rope
from jaxdistill.models.transformer import Transformer, TransformerConfig, count_params

V, D, L, H, F, MAXLEN = 64, 16, 2, 2, 32, 16


def config(**kw):
  base = dict(vocab_size=V, d_model=D, num_layers=L, num_heads=H, d_ff=F, max_len=MAXLEN)
  base.update(kw)
  return TransformerConfig(**base)


def make(**kw):
  """Model + params; params are filled from numpy on the abstract init tree.

  This skips compiling the random initializers (seconds per config on CPU);
  test_init_statistics covers the real ``model.init``.
  """
  cfg = config(**kw)
  model = Transformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
    lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype), abstract
  )
  return cfg, model, params


def tokens(b=2, t=8, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


COMBOS = list(
  itertools.product(
    ("rmsnorm", "layernorm"), ("rope", "learned"), (True, False), ("swiglu", "gelu")
  )
)


@pytest.mark.parametrize("norm,pos,tie,act", COMBOS)
def test_shapes_and_default_keys(norm, pos, tie, act):
  cfg, model, params = make(norm=norm, pos=pos, tie_embeddings=tie, activation=act)
  out = model.apply(params, tokens())
  assert set(out) == {"logits"}
  assert out["logits"].shape == (2, 8, V)
  assert out["logits"].dtype == jnp.float32
  assert np.isfinite(np.asarray(out["logits"])).all()
  p = nn.unbox(params)["params"]
  assert ("lm_head" in p) == (not tie)
  assert ("pos_embed" in p) == (pos == "learned")
  assert ("bias" in p["final_norm"]) == (norm == "layernorm")
  mlp_names = {"wi_gate", "wi_up", "wo"} if act == "swiglu" else {"wi", "wo"}
  assert set(p["block_0"]["mlp"]) == mlp_names
  assert sorted(k for k in p if k.startswith("block_")) == ["block_0", "block_1"]


def test_init_statistics():
  cfg = config(tie_embeddings=False, norm="layernorm")
  # rbg keys compile much faster than threefry on CPU.
  params = jax.jit(Transformer(cfg).init)(
    jax.random.key(0, impl="rbg"), jnp.zeros((1, 4), jnp.int32)
  )
  p = nn.unbox(params)["params"]
  np.testing.assert_array_equal(p["final_norm"]["scale"], 1.0)
  np.testing.assert_array_equal(p["block_1"]["mlp_norm"]["bias"], 0.0)
  assert 0.015 < np.std(p["token_embed"]["embedding"]) < 0.025
  assert 0.015 < np.std(p["lm_head"]["kernel"]) < 0.025
  # Residual-branch outputs are scaled down by 1/sqrt(2L).
  out_std = np.std(p["block_0"]["attn"]["out"]["kernel"])
  assert 0.7 * 0.02 / np.sqrt(2 * L) < out_std < 1.3 * 0.02 / np.sqrt(2 * L)


def test_intermediates_only_on_request():
  _, model, params = make()
  x = tokens()
  out = model.apply(params, x, hidden_layers=(1,))
  assert set(out) == {"logits", "hidden"} and set(out["hidden"]) == {1}
  out = model.apply(params, x, attn_layers=(0,), qkv_layers=(1,), return_logits=False)
  assert set(out) == {"final_hidden", "head", "attn", "qkv"}
  assert set(out["attn"]) == {0} and set(out["qkv"]) == {1}
  for t in out["qkv"][1]:
    assert t.shape == (2, 8, H, D // H)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_hidden_conventions(pos):
  cfg, model, params = make(pos=pos, tie_embeddings=False)
  x = tokens()
  out = model.apply(params, x, hidden_layers=tuple(range(L + 1)))
  p = nn.unbox(params)["params"]
  emb = p["token_embed"]["embedding"][x]
  if pos == "learned":
    emb = emb + p["pos_embed"]["embedding"][jnp.arange(8)][None]
  np.testing.assert_allclose(out["hidden"][0], emb, rtol=1e-6, atol=1e-7)
  assert not np.allclose(out["hidden"][1], out["hidden"][0])
  normed = Norm(cfg).apply({"params": p["final_norm"]}, out["hidden"][L])
  logits = normed @ p["lm_head"]["kernel"]
  np.testing.assert_allclose(logits, out["logits"], rtol=1e-5, atol=1e-6)


def test_attention_probs_and_qkv():
  cfg, model, params = make()
  out = model.apply(params, tokens(), attn_layers=(0, 1), qkv_layers=(1,))
  for i in (0, 1):
    a = np.asarray(out["attn"][i])
    assert a.shape == (2, H, 8, 8) and a.dtype == np.float32
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
    assert np.all(a[..., np.triu_indices(8, k=1)[0], np.triu_indices(8, k=1)[1]] == 0)
    assert np.all(np.diagonal(a, axis1=-2, axis2=-1) > 0)
  # q and k are returned after RoPE: they reproduce the attention probs.
  q, k, _ = out["qkv"][1]
  s = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.head_dim)
  s = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), s, -1e30)
  np.testing.assert_allclose(jax.nn.softmax(s, -1), out["attn"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_final_hidden_times_head_equals_logits(tie):
  _, model, params = make(tie_embeddings=tie)
  x = tokens()
  logits = model.apply(params, x)["logits"]
  out = model.apply(params, x, return_logits=False)
  assert set(out) == {"final_hidden", "head"}
  assert out["final_hidden"].shape == (2, 8, D) and out["head"].shape == (D, V)
  p = nn.unbox(params)["params"]
  want = p["token_embed"]["embedding"].T if tie else p["lm_head"]["kernel"]
  np.testing.assert_array_equal(out["head"], want)
  np.testing.assert_allclose(out["final_hidden"] @ out["head"], logits, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_segments_are_isolated(pos):
  _, model, params = make(pos=pos)
  n1, n2 = 3, 5
  seg = jnp.array([[1] * n1 + [2] * n2] * 2)
  positions = jnp.array([list(range(n1)) + list(range(n2))] * 2)
  x = tokens(1)
  other = tokens(1, seed=7)
  doc1_changed = x.at[:, :n1].set(other[:, :n1])
  doc2_changed = x.at[:, n1:].set(other[:, n1:])

  def logits(rows):
    return model.apply(params, jnp.concatenate(rows), segment_ids_BxT=seg, positions_BxT=positions)[
      "logits"
    ]

  base, out2 = logits([x, doc2_changed])
  out1, _ = logits([doc1_changed, x])
  np.testing.assert_allclose(out2[:n1], base[:n1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out2[n1:], base[n1:], atol=1e-3)
  np.testing.assert_allclose(out1[n1:], base[n1:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out1[:n1], base[:n1], atol=1e-3)
  alone = model.apply(params, x[:, n1:])["logits"][0]
  np.testing.assert_allclose(base[n1:], alone, rtol=1e-5, atol=1e-6)


def test_rope_properties():
  x = jax.random.normal(jax.random.key(2), (1, 6, 2, 8))
  zeros = jnp.zeros((1, 6), jnp.int32)
  np.testing.assert_allclose(apply_rope(x, zeros, 1e4), x, rtol=1e-6)
  pos = jnp.arange(6)[None] * 3
  rot = apply_rope(x, pos, 1e4)
  np.testing.assert_allclose(jnp.linalg.norm(rot, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  assert not np.allclose(rot, x, atol=1e-2)
  # q.k depends only on the position offset.
  q, k = x[:, :1], x[:, 1:2]

  @jax.jit
  def dot(m, n):
    return jnp.sum(
      apply_rope(q, jnp.full((1, 1), m), 1e4) * apply_rope(k, jnp.full((1, 1), n), 1e4)
    )

  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-5)
  assert not np.isclose(dot(5, 2), dot(5, 4), rtol=1e-3)


def test_model_uses_positions():
  _, model, params = make()
  x = tokens()
  base = model.apply(params, x)["logits"]
  gapped = model.apply(
    params, x, positions_BxT=jnp.arange(8)[None] * 2 + jnp.zeros((2, 1), jnp.int32)
  )["logits"]
  assert not np.allclose(base[:, 1:], gapped[:, 1:], atol=1e-3)


def test_causal_without_segments():
  _, model, params = make()
  x = tokens()
  base = model.apply(params, x)["logits"]
  changed = model.apply(params, x.at[:, 5:].set(0))["logits"]
  np.testing.assert_allclose(changed[:, :5], base[:, :5], rtol=1e-5, atol=1e-6)
  assert not np.allclose(changed[:, 5:], base[:, 5:], atol=1e-4)


def test_padding_segment_no_nan():
  _, model, params = make()
  seg = jnp.array(
    [
      [0, 0, 0, 1, 1, 2, 0, 0],  # left and right padding
      [0] * 8,
    ]
  )  # all padding
  out = model.apply(
    params, tokens(), segment_ids_BxT=seg, attn_layers=(0, 1), hidden_layers=(0, 1, 2)
  )
  for leaf in jax.tree_util.tree_leaves(out):
    assert np.isfinite(np.asarray(leaf)).all()
  a = np.asarray(out["attn"][1])
  # Left-padding queries attend only to padding keys.
  assert np.all(a[0, :, :3, 3:] == 0) and np.all(a[0, :, 6:, 3:6] == 0)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
  "pos,tie,norm", [("rope", True, "rmsnorm"), ("learned", False, "layernorm")]
)
def test_every_param_has_logical_names(pos, tie, norm):
  model = Transformer(config(pos=pos, tie_embeddings=tie, norm=norm))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  specs = nn.get_partition_spec(abstract)
  shapes = nn.unbox(abstract)
  spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
  shape_leaves = jax.tree_util.tree_leaves(shapes)
  assert len(spec_leaves) == len(shape_leaves) > 0
  for spec, leaf in zip(spec_leaves, shape_leaves):
    assert isinstance(spec, P) and len(spec) == leaf.ndim
  p = specs["params"]
  assert p["token_embed"]["embedding"] == P("vocab", "embed")
  assert p["block_0"]["attn"]["query"]["kernel"] == P("embed", "heads", "kv")
  assert p["block_0"]["attn"]["out"]["kernel"] == P("heads", "kv", "embed")
  assert p["block_0"]["mlp"]["wo"]["kernel"] == P("mlp", "embed")
  if not tie:
    assert p["lm_head"]["kernel"] == P("embed", "vocab")
    assert p["pos_embed"]["embedding"] == P(None, "embed")


def test_dtype_policy():
  _, model, params = make(param_dtype=jnp.bfloat16)
  for leaf in jax.tree_util.tree_leaves(nn.unbox(params)):
    assert leaf.dtype == jnp.bfloat16
  _, model, params = make(dtype=jnp.bfloat16, output_dtype=jnp.float32)
  for leaf in jax.tree_util.tree_leaves(nn.unbox(params)):
    assert leaf.dtype == jnp.float32
  out = model.apply(params, tokens(), hidden_layers=(1,), attn_layers=(0,))
  assert out["logits"].dtype == jnp.float32
  assert out["hidden"][1].dtype == jnp.bfloat16
  assert out["attn"][0].dtype == jnp.float32
  out = model.apply(params, tokens(), return_logits=False)
  assert out["final_hidden"].dtype == jnp.bfloat16
  assert out["head"].dtype == jnp.bfloat16
  _, model, params = make(output_dtype=jnp.bfloat16)
  assert model.apply(params, tokens())["logits"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
  "kw,field",
  [
    (dict(d_model=15, num_heads=2), "d_model"),
    (dict(norm="batchnorm"), "norm"),
    (dict(pos="alibi"), "pos"),
    (dict(activation="relu"), "activation"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_layers=-1), "num_layers"),
    (dict(d_ff=0), "d_ff"),
    (dict(max_len=0), "max_len"),
    (dict(d_model=6, num_heads=2), "head_dim"),  # odd head_dim with rope
  ],
)
def test_config_validation(kw, field):
  with pytest.raises(ValueError, match=field):
    config(**kw)


def test_config_odd_head_dim_ok_without_rope():
  cfg = config(d_model=6, num_heads=2, pos="learned")
  assert cfg.head_dim == 3


@pytest.mark.parametrize(
  "kw",
  [
    dict(hidden_layers=(L + 1,)),
    dict(hidden_layers=(-1,)),
    dict(attn_layers=(L,)),
    dict(qkv_layers=(L,)),
  ],
)
def test_layer_index_out_of_range(kw):
  _, model, params = make()
  with pytest.raises(ValueError):
    model.apply(params, tokens(), **kw)


def test_count_params_and_flops():
  cfg, _, params = make(tie_embeddings=False, pos="learned")
  per_block = 4 * D * D + 3 * D * F + 2 * D
  want = V * D + MAXLEN * D + L * per_block + D + D * V
  assert count_params(params) == want
  fl = flops_per_token(cfg, 8)
  # Causal attention counted at half: 2 * T * D per layer (models/flops.py).
  assert fl == 2 * (L * (4 * D * D + 3 * D * F) + D * V) + 2 * L * 8 * D
  gelu = config(activation="gelu")
  assert flops_per_token(gelu, 8) == fl - 2 * L * D * F


# The project's one rules table: the test checks the model against what runs.
from jaxdistill.parallel.sharding import LOGICAL_RULES as RULES  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("tie", [True, False])
def test_sharded_apply_matches_unsharded(tie):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (host) devices")
  _, model, params = make(tie_embeddings=tie)
  x = tokens(4, 8)
  seg = jnp.array([[1] * 8, [1] * 4 + [2] * 4, [1] * 6 + [0] * 2, [3] * 8])
  want = model.apply(params, x, segment_ids_BxT=seg)["logits"]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    got = jax.jit(lambda p, t, s: model.apply(p, t, segment_ids_BxT=s))(params, x, seg)["logits"]
  assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- models.build / apply / variables: the one way callers make and run a model -------------

ENCODER_SECTION = dict(
  vocab_size=V, d_model=D, num_layers=L, num_heads=H, d_ff=F, max_len=MAXLEN, norm="layernorm",
  pos="learned", tie_embeddings=True, activation="gelu_erf", num_kv_heads=0, bias="all",
  norm_eps=1e-12, encoder=True, type_vocab_size=2,
)  # fmt: skip
# The encoder's param paths as saved runs and the Hugging Face mapping know them: never renamed.
ENCODER_BLOCK_PARAMS = [
  f"{layer}/{leaf}"
  for layer in ("attn/query", "attn/key", "attn/value", "attn/out", "attn_norm")
  + ("mlp/wi", "mlp/wo", "mlp_norm")
  for leaf in (("scale", "bias") if layer.endswith("norm") else ("kernel", "bias"))
]
ENCODER_PARAMS = {
  "token_embed/embedding": (V, D),
  "pos_embed/embedding": (MAXLEN, D),
  "type_embed/embedding": (2, D),
  "embed_norm/scale": (D,),
  "embed_norm/bias": (D,),
}


def _paths(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
  return {"/".join(k.key for k in path): leaf.shape for path, leaf in flat}


def test_build_picks_the_encoder_module_with_the_encoder_param_paths():
  from jaxdistill import models
  from jaxdistill.models import bert, hf
  from jaxdistill.parallel import precision

  policy = precision.parse_policy("p=f32", "student.policy")
  encoder = models.build(ENCODER_SECTION, policy, "student")
  assert isinstance(encoder, bert.Encoder) and encoder.config.encoder
  decoder = models.build(dict(ENCODER_SECTION, encoder=False), policy, "student")
  assert isinstance(decoder, Transformer)
  abstract = jax.eval_shape(lambda r: models.init_variables(encoder, r, 8), jax.random.key(0))
  assert set(abstract) == {"params"}
  paths = _paths(abstract["params"])
  block_paths = {p for p in paths if p.startswith("block_")}
  assert block_paths == {f"block_{i}/{p}" for i in range(L) for p in ENCODER_BLOCK_PARAMS}
  assert {p: s for p, s in paths.items() if p not in block_paths} == ENCODER_PARAMS
  assert paths["block_1/attn/query/kernel"] == (D, H, D // H)
  # The Hugging Face mapping names exactly these params (so BERT checkpoints still load).
  assert set(hf.param_map(hf.HFModel("bert", encoder.config))) == {
    tuple(p.split("/")) for p in paths
  }
  # The decoder module refuses an encoder config rather than building a different model.
  with pytest.raises(ValueError, match="bert.Encoder"):
    Transformer(encoder.config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


@pytest.mark.slow
def test_apply_and_variables_on_a_mesh():
  """create_variables == unsharded init, in the shardings abstract_variables promises."""
  from jaxdistill import models
  from jaxdistill.parallel import sharding as sharding_lib

  model = Transformer(config(tie_embeddings=False))
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rng = jax.random.key(3)
  variables, shardings = models.create_variables(model, rng, mesh, 8, ("params",))
  assert set(variables) == set(shardings) == {"params"}
  target = models.abstract_variables(model, mesh, 8)["params"]
  assert models.variable_shardings(model, mesh, 8)["params"] == shardings["params"]
  reference = nn.unbox(jax.jit(lambda r: models.init_variables(model, r, 8))(rng))["params"]
  kernel = variables["params"]["lm_head"]["kernel"]
  assert kernel.sharding == target["lm_head"]["kernel"].sharding
  assert not kernel.sharding.is_fully_replicated  # the rules table did shard it
  jax.tree.map(np.testing.assert_array_equal, variables["params"], reference)
  batch = {"inputs": tokens(), "segment_ids": jnp.ones((2, 8), jnp.int32)}
  out = models.apply(model, {"params": reference}, batch, hidden_layers=(1,))
  direct = model.apply({"params": reference}, batch["inputs"], segment_ids_BxT=batch["segment_ids"])
  np.testing.assert_array_equal(out["logits"], direct["logits"])
  assert set(out) == {"logits", "hidden"}
