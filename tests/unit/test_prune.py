"""Structured pruning (models/prune.py, models/prune_scores.py, prune_run.py).

A model is first given units whose contribution is exactly zero (a head's value columns and
out-projection rows, an MLP neuron's up and down projections, a residual channel in every tensor
that writes the residual stream, a conv channel's kernel and bias); both scores must rank exactly
those lowest, and removing them must leave the function unchanged.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.compress import prune_job as prune_run
from jaxdistill.config import validate
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.evaluation import evaluate
from jaxdistill.evaluation import job as eval_run
from jaxdistill.models import prune, prune_scores, surgery
from jaxdistill.models.transformer_config import TransformerConfig
from jaxdistill.models.vision_config import VisionConfig
from jaxdistill.parallel import sharding
from jaxdistill.train import workdir

T = 8


def _random_params(module, seed=0):
  """Random params with random (not zero / one) biases and norm scales, as NumPy."""
  params = nn.unbox(models.init_variables(module, jax.random.key(seed), T))["params"]
  rng = np.random.default_rng(seed)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, leaf in flat:
    keys = [k.key for k in path]
    a = np.array(leaf)
    if keys[-1] == "bias":
      a = 0.1 * rng.standard_normal(a.shape).astype(a.dtype)
    elif keys[-1] == "scale":
      a = (1 + 0.2 * rng.standard_normal(a.shape)).astype(a.dtype)
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = a
  return out


def _batch(cfg, seed=1, b=3):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, T), np.int32)
  seg[0, 5:] = 0  # padding
  seg[1, 4:] = 2  # a second document
  return {
    "inputs": rng.integers(0, cfg.vocab_size, (b, T)).astype(np.int32),
    "targets": rng.integers(0, cfg.vocab_size, (b, T)).astype(np.int32),
    "weights": (seg != 0).astype(np.float32),
    "segment_ids": seg,
    "positions": np.where(seg == 2, np.arange(T) - 4, np.arange(T)).astype(np.int32),
  }


def _out(module, params, batch):
  out = models.apply(module, {"params": params}, batch)
  return np.asarray(out["embedding" if module.config.encoder else "logits"])


def _zero_heads(p, i, heads, cfg):
  group = cfg.num_heads // cfg.kv_heads
  attn = p[f"block_{i}"]["attn"]
  attn["out"]["kernel"][heads] = 0.0
  kv = sorted({h // group for h in heads})
  attn["value"]["kernel"][:, kv] = 0.0
  if "bias" in attn["value"]:
    attn["value"]["bias"][kv] = 0.0


def _zero_neurons(p, i, idx):
  mlp = p[f"block_{i}"]["mlp"]
  mlp["wo"]["kernel"][idx] = 0.0
  up = mlp["wi_up" if "wi_up" in mlp else "wi"]
  up["kernel"][:, idx] = 0.0
  if "bias" in up:
    up["bias"][idx] = 0.0


def _zero_channels(p, idx):
  """Residual channels ``idx`` zero everywhere: every tensor that writes the residual stream."""
  for name in ("token_embed", "pos_embed", "type_embed"):
    if name in p:
      p[name]["embedding"][:, idx] = 0.0
  for key, block in p.items():
    if key.startswith("block_"):
      for proj in (block["attn"]["out"], block["mlp"]["wo"]):
        proj["kernel"][..., idx] = 0.0
        if "bias" in proj:
          proj["bias"][idx] = 0.0


GQA = dict(num_heads=4, num_kv_heads=2, tie_embeddings=False, bias="qkv")
TIED = dict(num_heads=4, tie_embeddings=True)
CASES = {"gqa_untied": GQA, "tied": TIED}


def _cfg(**kw):
  base = dict(vocab_size=40, d_model=32, num_layers=2, d_ff=48, max_len=16)
  return TransformerConfig(**{**base, **kw})


@pytest.mark.parametrize("case", ["gqa_untied", "tied", "bert"])
def test_pruning_to_full_size_is_the_identical_function(case):
  if case == "bert":
    from jaxdistill.models import bert

    cfg = bert.encoder_config(
      vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_len=16
    )
  else:
    cfg = _cfg(**CASES[case])
  module = models.module_for(cfg)
  params = _random_params(module)
  batch = _batch(cfg)
  scores = prune_scores.score(module, {"params": params}, [batch])
  keep = prune.keep_transformer(scores, cfg, {"num_heads": 1.0, "d_ff": cfg.d_ff})
  new, changed = prune.prune_transformer(params, cfg, keep)
  assert changed == {}
  jax.tree.map(np.testing.assert_array_equal, new, params)
  np.testing.assert_array_equal(_out(module, new, batch), _out(module, params, batch))


@pytest.mark.parametrize("method", ["activation", "gradient"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_zeroed_units_score_lowest_and_pruning_them_keeps_the_function(case, method):
  cfg = _cfg(**CASES[case])
  module = models.module_for(cfg)
  p = _random_params(module)
  group = cfg.num_heads // cfg.kv_heads
  dead_heads = {0: [2, 3], 1: [0, 1]} if group == 2 else {0: [1], 1: [3]}
  dead_mlp = {0: [0, 5, 47], 1: [7, 8]}
  dead_mlp[1] += [1]  # the same count per layer: d_ff is one key
  dead_embed = [3, 17, 30]
  for i in range(cfg.num_layers):
    _zero_heads(p, i, dead_heads[i], cfg)
    _zero_neurons(p, i, dead_mlp[i])
  _zero_channels(p, dead_embed)
  batch = _batch(cfg)
  scores = prune_scores.score(module, {"params": p}, [batch, _batch(cfg, seed=2)], method)
  for i in range(cfg.num_layers):  # exactly the dead units are the lowest
    assert set(np.argsort(scores["heads"][i])[: len(dead_heads[i])]) == set(dead_heads[i])
    assert (
      scores["heads"][i][dead_heads[i]].max()
      < 1e-6
      < np.delete(scores["heads"][i], dead_heads[i]).min()
    )
    assert set(np.argsort(scores["mlp"][i])[:3]) == set(dead_mlp[i])
  assert set(np.argsort(scores["embed"])[:3]) == set(dead_embed)

  targets = {"num_heads": cfg.num_heads - len(dead_heads[0]), "d_ff": cfg.d_ff - 3, "d_model": 29}
  keep = prune.keep_transformer(scores, cfg, targets)
  for i in range(cfg.num_layers):
    assert not set(keep["heads"][i]) & set(dead_heads[i])
  new, changed = prune.prune_transformer(p, cfg, keep)
  assert changed["num_heads"] == 4 - len(dead_heads[0]) and changed["d_ff"] == 45
  assert changed["d_model"] == 29 and changed["head_size"] == 8  # K kept: 29 != H * 8
  assert changed.get("num_kv_heads", 0) == (1 if cfg.num_kv_heads else 0)
  small = dataclasses.replace(cfg, **changed)
  want = nn.unbox(models.init_variables(models.module_for(small), jax.random.key(0), T))["params"]
  assert jax.tree.map(np.shape, new) == jax.tree.map(np.shape, want)
  np.testing.assert_allclose(
    _out(models.module_for(small), new, batch), _out(module, p, batch), atol=1e-5, rtol=1e-5
  )


def test_encoder_heads_and_neurons_prune_exactly():
  from jaxdistill.models import bert

  cfg = bert.encoder_config(
    vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_len=16
  )
  module = models.module_for(cfg)
  p = _random_params(module)
  for i, heads in enumerate(([0], [2])):
    _zero_heads(p, i, heads, cfg)
    _zero_neurons(p, i, [1, 2])
  batch = _batch(cfg)
  scores = prune_scores.score(module, {"params": p}, [batch])
  keep = prune.keep_transformer(scores, cfg, {"num_heads": 3, "d_ff": 46})
  assert [list(k) for k in keep["heads"]] == [[1, 2, 3], [0, 1, 3]]
  new, changed = prune.prune_transformer(p, cfg, keep)
  assert changed == {"num_heads": 3, "d_ff": 46, "head_size": 8}
  small = models.module_for(dataclasses.replace(cfg, **changed))
  np.testing.assert_allclose(_out(small, new, batch), _out(module, p, batch), atol=1e-5)
  # LayerNorm's mean over all channels: d_model pruning is approximate, but shapes are right.
  keep = prune.keep_transformer(scores, cfg, {"d_model": 0.75})
  new, changed = prune.prune_transformer(p, cfg, keep)
  assert changed == {"d_model": 24, "head_size": 8} and new["embed_norm"]["scale"].shape == (24,)
  assert np.isfinite(_out(models.module_for(dataclasses.replace(cfg, **changed)), new, batch)).all()


def test_head_activation_scores_match_a_numpy_reference():
  cfg = _cfg(**GQA)
  module = models.module_for(cfg)
  p = _random_params(module)
  batch = _batch(cfg)
  out = models.apply(module, {"params": p}, batch, attn_layers=(0, 1), qkv_layers=(0, 1))
  valid = np.asarray(batch["segment_ids"] != 0, np.float64)
  got = prune_scores.score(module, {"params": p}, [batch])["heads"]
  for i in range(2):
    probs = np.asarray(out["attn"][i], np.float64)  # [B, H, T, S]
    v = np.asarray(out["qkv"][i][2], np.float64)  # [B, S, H, K], already repeated to H
    ctx = np.einsum("bhts,bshk->bthk", probs, v)
    want = (np.abs(ctx).mean(-1) * valid[..., None]).sum((0, 1)) / valid.sum()
    np.testing.assert_allclose(got[i], want, rtol=1e-5)


def test_gradient_head_score_is_the_derivative_of_the_loss_by_a_head_gate():
  # Michel et al.: |dL / d gate_h| per example; with one example, a finite difference of the
  # loss with head h's out-projection rows scaled by (1 + eps) is that derivative.
  cfg = _cfg(**TIED)
  module = models.module_for(cfg)
  p = _random_params(module)
  batch = {k: v[1:2] for k, v in _batch(cfg).items()}
  got = prune_scores.score(module, {"params": p}, [batch], "gradient")["heads"]

  def loss(params):
    logits = np.asarray(_out(module, params, batch), np.float64)
    top = logits.max(-1)
    lse = top + np.log(np.exp(logits - top[..., None]).sum(-1))
    picked = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    return float(np.sum((lse - picked) * batch["weights"]) / batch["weights"].sum())

  eps = 1e-2
  for i in range(2):
    for h in range(4):
      plus, minus = jax.tree.map(np.copy, p), jax.tree.map(np.copy, p)
      plus[f"block_{i}"]["attn"]["out"]["kernel"][h] *= 1 + eps
      minus[f"block_{i}"]["attn"]["out"]["kernel"][h] *= 1 - eps
      fd = abs(loss(plus) - loss(minus)) / (2 * eps)
      assert got[i, h] == pytest.approx(fd, rel=2e-2, abs=1e-5), (i, h)


def test_layer_removal_reuses_the_layer_selection():
  cfg = _cfg(num_heads=4, num_layers=3)
  module = models.module_for(cfg)
  p = _random_params(module)
  scores = prune_scores.score(module, {"params": p}, [_batch(cfg)])
  keep = prune.keep_transformer(scores, cfg, {"num_layers": 2, "layers": "every_other"})
  new, changed = prune.prune_transformer(p, cfg, keep)
  assert keep["layers"] == surgery.select_layers("every_other", 3, 2) == (0, 2)
  assert changed == {"num_layers": 2}
  jax.tree.map(np.testing.assert_array_equal, new, surgery.init_from_teacher(p, (0, 2)))


def _cnn():
  cfg = VisionConfig(
    arch="cnn", num_classes=5, image_size=8, image_channels=2, cnn_channels=(6, 8), cnn_fc=10
  )
  module = models.module_for(cfg)
  p = jax.tree.map(
    np.array, nn.unbox(models.init_variables(module, jax.random.key(0), 0))["params"]
  )
  rng = np.random.default_rng(0)
  for name in ("conv_1", "conv_2", "fc"):
    p[name]["bias"] = 0.1 * rng.standard_normal(p[name]["bias"].shape).astype(np.float32)
  images = rng.standard_normal((4, 8, 8, 2)).astype(np.float32)
  batch = {
    "inputs": images,
    "targets": np.arange(4, dtype=np.int32) % 5,
    "weights": np.ones(4, np.float32),
  }
  return cfg, module, p, batch


@pytest.mark.parametrize("method", ["activation", "gradient"])
def test_cnn_zeroed_channels_score_lowest_and_pruning_them_keeps_the_function(method):
  cfg, module, p, batch = _cnn()
  dead = {1: [1, 4], 2: [0, 7]}
  for s, idx in dead.items():
    p[f"conv_{s}"]["kernel"][..., idx] = 0.0
    p[f"conv_{s}"]["bias"][idx] = -1.0  # ReLU(-1) = 0: the channel is dead after the ReLU
  p["fc"]["bias"][:] = 1.0  # every other fc unit alive
  p["fc"]["kernel"][:, [3]] = 0.0
  p["fc"]["bias"][[3]] = -1.0
  scores = prune_scores.score(module, {"params": p}, [batch], method)
  for s, idx in dead.items():
    assert set(np.argsort(scores["channels"][s])[:2]) == set(idx)
  assert np.argmin(scores["fc"]) == 3
  keep = prune.keep_cnn(scores, cfg, {"cnn_channels": (4, 6), "cnn_fc": 9})
  new, changed = prune.prune_cnn(p, cfg, keep)
  assert changed == {"cnn_channels": "4,6", "cnn_fc": 9}
  assert new["conv_2"]["kernel"].shape == (3, 3, 4, 6) and new["fc"]["kernel"].shape == (
    2 * 2 * 6,
    9,
  )
  small = models.module_for(dataclasses.replace(cfg, cnn_channels=(4, 6), cnn_fc=9))
  got = models.apply(small, {"params": new}, batch)["logits"]
  np.testing.assert_allclose(got, models.apply(module, {"params": p}, batch)["logits"], atol=1e-5)


def _message(fn, *args):
  with pytest.raises((ConfigError, JaxdistillError, ValueError)) as e:
    fn(*args)
  text = str(e.value)
  assert "\n" not in text, text
  return text


def test_impossible_targets_are_one_line_errors():
  cfg = _cfg(**GQA)
  scores = {"heads": np.ones((2, 4)), "mlp": np.ones((2, 48)), "embed": np.ones(32)}
  keep = lambda t: prune.keep_transformer(scores, cfg, t)  # noqa: E731
  assert "must be in [1, 4]" in _message(keep, {"num_heads": 5})
  assert "prune.num_heads" in _message(keep, {"num_heads": 0})
  assert "multiple of 2" in _message(keep, {"num_heads": 3})
  assert "in (0, 1]" in _message(keep, {"d_ff": 1.5})
  assert "prune.d_model" in _message(keep, {"d_model": 0})
  assert "no transformer target" in _message(keep, {"heads": 2})
  assert "prune.layers" in _message(keep, {"num_layers": 1, "layers": "0,1"})
  assert "int count or a float" in _message(keep, {"d_ff": "half"})
  resnet = VisionConfig(arch="resnet", depth=8)
  assert "arch 'cnn'" in _message(prune.keep_cnn, {}, resnet, {})
  from jaxdistill.models import bert

  enc = models.module_for(
    bert.encoder_config(vocab_size=40, d_model=32, num_layers=1, num_heads=4, d_ff=48, max_len=16)
  )
  assert "encoder has none" in _message(prune_scores.score, enc, {}, [], "gradient")
  assert "method must be" in _message(prune_scores.score, enc, {}, [], "taylor")


def _source_run(tmp_path, student):
  """A finished-looking run (config.json + final_params of dead-unit params), no training."""
  cfg = config_lib.default_config()
  cfg.student.update(vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_len=16)
  cfg.student.update(student)
  cfg.data.update(batch_size=4, seq_len=T)
  # A distillation run whose losses pair the source's heads and width with the teacher's.
  cfg.teacher.update(source="random", vocab_size=40, d_model=32, num_layers=2, num_heads=4)
  cfg.teacher.update(d_ff=48, max_len=16)
  cfg.distill.attention.update(weight=0.1, value_weight=0.1)
  cfg.distill.hidden.update(weight=0.1, layer_map="uniform", project=False)
  src = str(tmp_path / "src")
  workdir.prepare(cfg, src)
  policy = models.config_from_section(cfg.student, _f32(), "student")
  module = models.module_for(policy)
  p = _random_params(module)
  for i in range(2):
    _zero_heads(p, i, [2, 3] if policy.kv_heads == 2 else [1], policy)
    _zero_neurons(p, i, [4, 9])
  _zero_channels(p, [0, 5])
  workdir.save_final_params(src, p)
  return cfg, src, module, p


def _f32():
  from jaxdistill.parallel import precision

  return precision.parse_policy("p=f32,c=f32,o=f32", "student.policy")


@pytest.mark.parametrize("student", [GQA, TIED], ids=["gqa_untied", "tied"])
def test_prune_workdir_writes_a_run_whose_model_loads_and_computes_the_same(tmp_path, student):
  cfg, src, module, p = _source_run(tmp_path, student)
  dst = str(tmp_path / "dst")
  heads = 2 if student is GQA else 3
  targets = {"num_heads": heads, "d_ff": 46, "d_model": 30}
  record = prune_run.prune_workdir(src, dst, targets, calibration_batches=2)
  assert record["changed"]["d_model"] == 30 and record["params_after"] < record["params_before"]
  assert json.loads((tmp_path / "dst" / "prune.json").read_text()) == record
  saved = json.loads((tmp_path / "dst" / "config.json").read_text())["student"]
  assert (saved["num_heads"], saved["d_ff"], saved["d_model"], saved["head_size"]) == (
    heads,
    46,
    30,
    8,
  )
  assert saved["num_kv_heads"] == (1 if student is GQA else 0)
  # Still a valid run (eval and init_from rebuild it): MiniLM attention transfer, which pairs
  # heads one to one, is off; the hidden loss projects the narrower width.
  pruned_cfg = eval_run.run_config(dst)
  validate.validate(pruned_cfg)
  assert pruned_cfg.distill.attention.weight == 0 and pruned_cfg.distill.hidden.project
  assert record["kept"]["embed"] == [c for c in range(32) if c not in (0, 5)]
  small = models.build(saved, _f32(), "student")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  variables, _ = evaluate.load_variables(small, str(tmp_path / "dst" / "final_params"), mesh, T)
  q = variables["params"]["block_0"]["attn"]["query"]["kernel"]
  assert q.shape == (30, heads, 8)
  batch = _batch(module.config)
  np.testing.assert_allclose(
    _out(small, jax.device_get(variables["params"]), batch), _out(module, p, batch), atol=1e-5
  )
  assert "not empty" in _message(prune_run.prune_workdir, src, dst, targets)
  assert "not a jaxdistill run" in _message(
    prune_run.prune_workdir, str(tmp_path), str(tmp_path / "x"), {}
  )


@pytest.mark.slow
def test_a_pruned_workdir_starts_a_distillation_and_teaches_one(tmp_path, capsys):
  from jaxdistill.cli import commands as cli
  from jaxdistill.train import loop

  cfg, src, _, _ = _source_run(tmp_path, TIED)
  dst = str(tmp_path / "dst")
  prune_run.prune_workdir(src, dst, {"num_heads": 3, "d_ff": 0.5}, calibration_batches=1)
  pruned = json.loads((tmp_path / "dst" / "config.json").read_text())["student"]
  run = config_lib.default_config()
  shape = {k: pruned[k] for k in models.MODEL_KEYS}
  run.student.update(shape, init_from=dst)
  run.teacher.update(shape, source="workdir", path=dst)  # the pruned model teaches too
  run.optim.update(steps=2, lr=1e-6, warmup_steps=1)
  run.data.update(batch_size=8, seq_len=T)
  run.log.progress = False
  summary = loop.train(run, str(tmp_path / "run"))
  assert summary["last_step"] == 2
  final = evaluate.load_params(
    models.build(run.student, _f32(), "student"),
    str(tmp_path / "run" / "final_params"),
    sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}),
    T,
  )
  start = evaluate.load_params(
    models.build(run.student, _f32(), "student"),
    str(tmp_path / "dst" / "final_params"),
    sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}),
    T,
  )
  # lr 1e-6 for 2 steps: the student ends where the pruned params started, not at random init.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), final, start)
  # A head-pruned Llama-shaped model exports with its head_dim.
  assert cli.main(["export", "--workdir", dst, "--output", str(tmp_path / "hf")]) == 0
  exported = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert (exported["num_attention_heads"], exported["head_dim"]) == (3, 8)


def test_a_pruned_encoder_workdir_loads_for_embed(tmp_path):
  from jaxdistill.models import bert

  enc = dict(encoder=True, norm="layernorm", pos="learned", activation="gelu_erf", bias="all")
  cfg, src, module, p = _source_run(tmp_path, dict(enc, type_vocab_size=2))
  assert module.config == bert.encoder_config(
    **{
      k: getattr(module.config, k)
      for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len")
    }
  )
  dst = str(tmp_path / "dst")
  assert "encoder has none" in _message(prune_run.prune_workdir, src, dst, {}, 1, "gradient")
  prune_run.prune_workdir(src, dst, {"num_heads": 3, "d_ff": 46}, calibration_batches=1)
  hfm, params = workdir.load_workdir(dst)  # what `jaxdistill embed` / `export` read
  assert (hfm.model_type, hfm.config.num_heads, hfm.config.head_dim) == ("bert", 3, 8)
  batch = _batch(module.config)
  np.testing.assert_allclose(_out(hfm.module(), params, batch), _out(module, p, batch), atol=1e-5)
