"""The jobs that read and write workdirs beside training, with everything in ``gs://``: prune,
quantize (PTQ), export, embed and the compression pipeline, on the local fake of Cloud Storage
(``fake_gcs`` in tests/conftest.py: a plain ``os`` / ``open`` / ``shutil`` call on a ``gs://``
path finds nothing, or leaves ``./gs:`` in the empty cwd, which the fixture refuses).

The source runs are made without training (config.json + final_params of initialised params,
as ``jaxdistill train`` writes them), so only the jobs' own forwards compile.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import BUCKET, ROOT
from safetensors.numpy import load as load_safetensors

from jaxdistill import config as config_lib
from jaxdistill import models, paths
from jaxdistill.cli import commands as cli
from jaxdistill.models import hf
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding
from jaxdistill.train import workdir as workdir_lib

BERT = str(ROOT / "tests" / "fixtures" / "hf" / "bert_tiny")
TOKENIZER = os.path.join(BERT, "tokenizer.json")
T = 16


def _source_run(workdir: str, student: dict) -> dict:
  """A finished-looking run in ``workdir`` (config.json, final_params, tokenizer.json): the
  student of ``student``'s shape keys at its random init. Returns its params (NumPy)."""
  cfg = config_lib.default_config()
  cfg.student.update(student)
  cfg.teacher.source = "none"
  cfg.distill.logit.weight, cfg.distill.ce.weight = 0.0, 1.0
  cfg.data.update(batch_size=8, seq_len=T)  # one row per device of the 8-device mesh
  cfg.log.progress = False
  workdir_lib.prepare(cfg, workdir)
  policy = precision.parse_policy("p=f32,c=f32,o=f32", "student.policy")
  module = models.build(cfg.student, policy, "student")
  variables = models.init_variables(module, jax.random.key(0), T)
  params = jax.tree.map(np.asarray, nn.unbox(variables)["params"])
  workdir_lib.save_final_params(workdir, params)
  paths.copy(TOKENIZER, paths.join(workdir, "tokenizer.json"))
  return params


def _files(local_dir) -> set[str]:
  """Every file under a local directory, relative to it."""
  return {
    os.path.relpath(os.path.join(root, name), local_dir)
    for root, _, names in os.walk(local_dir)
    for name in names
  }


def _run(argv, capsys) -> str:
  code = cli.main(argv)
  out, err = capsys.readouterr()
  assert code == 0, err
  return out


DECODER = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=T)


def test_prune_quantize_and_export_a_gs_workdir(fake_gcs, capsys):
  """``jaxdistill prune``, ``quantize`` and ``export`` of a gs:// run into gs:// outputs."""
  src, bucket = f"{BUCKET}/src", fake_gcs / "bucket"
  params = _source_run(src, DECODER)
  argv = ["prune", "--workdir", src, "--output", f"{BUCKET}/pruned", "--targets", "d_ff=0.5"]
  assert f"wrote {BUCKET}/pruned" in _run(argv + ["--calibration_batches", "1"], capsys)
  pruned = bucket / "pruned"
  assert {"config.json", "prune.json", "tokenizer.json"} <= _files(pruned)
  assert json.loads((pruned / "prune.json").read_text())["changed"] == {"d_ff": 32}
  hfm, small = workdir_lib.load_workdir(f"{BUCKET}/pruned")  # a run like any other
  assert hfm.config.d_ff == 32 and small["block_0"]["mlp"]["wi_up"]["kernel"].shape[-1] == 32

  argv = ["quantize", "--workdir", src, "--output", f"{BUCKET}/int8", "--calibration_batches", "1"]
  _run(argv, capsys)
  int8 = bucket / "int8"
  expected = {"config.json", "quantize.json", "tokenizer.json", "int8/model.safetensors"}
  assert expected | {"int8/int8.json"} == _files(int8)
  assert not (bucket / "int8.partial").exists()  # moved into place: the copy, then deleted
  assert "c=int8" in json.loads((int8 / "config.json").read_text())["student"]["policy"]
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  _, variables, meta = workdir_lib.load_int8(f"{BUCKET}/int8/int8", mesh)
  assert meta["section"]["d_ff"] == 64 and variables["params"]

  _run(["export", "--workdir", src, "--output", f"{BUCKET}/hf"], capsys)
  assert _files(bucket / "hf") == {"config.json", "model.safetensors", "tokenizer.json"}
  assert hf.read_config(f"{BUCKET}/hf").model_type == "llama"  # read through epath
  tensors = load_safetensors((bucket / "hf" / "model.safetensors").read_bytes())
  np.testing.assert_array_equal(
    tensors["model.embed_tokens.weight"], params["token_embed"]["embedding"]
  )


def test_embed_and_export_an_encoder_in_gs(fake_gcs, capsys):
  """``jaxdistill embed`` of a gs:// encoder workdir (gs:// input and output), its export to
  gs://, and ``embed`` of that gs:// Hugging Face directory: the same embeddings."""
  keys = hf.model_keys(BERT)
  src, bucket = f"{BUCKET}/enc", fake_gcs / "bucket"
  _source_run(src, keys)
  paths.write_text(f"{BUCKET}/in.txt", "the cat sat.\na\nit was the best of times\n")
  argv = ["embed", "--input", f"{BUCKET}/in.txt", "--batch_size", "2"]
  out = _run(argv + ["--model", src, "--output", f"{BUCKET}/out/run.npy"], capsys)
  assert "done: 3 embeddings" in out
  from_run = np.load(bucket / "out" / "run.npy")
  assert from_run.shape == (3, keys["d_model"]) and from_run.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(from_run, axis=1), 1.0, atol=1e-5)

  _run(["export", "--workdir", src, "--output", f"{BUCKET}/hf"], capsys)
  exported = _files(bucket / "hf")
  for name in ("config.json", "model.safetensors", "tokenizer.json", "modules.json"):
    assert name in exported
  assert {"1_Pooling/config.json", "sentence_bert_config.json"} <= exported
  _run(argv + ["--model", f"{BUCKET}/hf", "--output", f"{BUCKET}/out/hf.npy"], capsys)
  np.testing.assert_allclose(np.load(bucket / "out" / "hf.npy"), from_run, atol=1e-6)


def test_an_incomplete_remote_move_is_redone(fake_gcs, tmp_path):
  """``paths.move_tree`` into gs:// copies, then deletes the source: until then the pipeline
  treats the stage as unfinished (``_finished``), and a move clears a leftover copy."""
  from jaxdistill.compress import pipeline

  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "a" / "b" / "x.bin").write_bytes(b"1")
  (tmp_path / "a" / "y.json").write_text("{}")
  paths.copytree(str(tmp_path / "a"), f"{BUCKET}/stage.partial")  # local -> gs
  paths.copytree(f"{BUCKET}/stage.partial", f"{BUCKET}/stage")  # gs -> gs, cut short here
  paths.write_text(f"{BUCKET}/stage/stale.txt", "from the cut-short move")
  assert not pipeline._finished(f"{BUCKET}/stage")
  paths.move_tree(f"{BUCKET}/stage.partial", f"{BUCKET}/stage")
  assert pipeline._finished(f"{BUCKET}/stage")
  assert _files(fake_gcs / "bucket" / "stage") == {"b/x.bin", "y.json"}
  paths.copytree(f"{BUCKET}/stage", str(tmp_path / "back"))  # gs -> local
  assert (tmp_path / "back" / "b" / "x.bin").read_bytes() == b"1"
  paths.rmtree(f"{BUCKET}/nothing", missing_ok=True)
  paths.rmtree(str(tmp_path / "nothing"), missing_ok=True)
  with pytest.raises(FileNotFoundError):
    paths.rmtree(str(tmp_path / "nothing"))


PIPELINE = """
from jaxdistill.config import default_config


def _cfg(steps):
  cfg = default_config()
  cfg.student.update(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=16)
  cfg.teacher.source = "none"
  cfg.distill.logit.weight, cfg.distill.ce.weight = 0.0, 1.0
  cfg.optim.update(steps=steps, warmup_steps=1)
  cfg.data.update(batch_size=8, seq_len=16)
  cfg.eval.batches = 1
  cfg.log.update(progress=False, tensorboard=False)
  return cfg


def get_pipeline(arg=""):
  return {
    "teacher": "",
    "batch_sizes": (1,),
    "stages": [
      {"name": "base", "action": "train", "config": _cfg(2)},
      {"name": "prune", "action": "prune", "targets": {"d_ff": 0.5}, "calibration_batches": 1},
      {"name": "ptq", "action": "quantise", "from": "prune", "calibration_batches": 1},
      {"name": "int8", "action": "export", "from": "ptq"},
      {"name": "hf", "action": "export", "from": "prune", "format": "hf"},
    ],
  }
"""


@pytest.mark.slow
def test_a_pipeline_in_gs(fake_gcs, tmp_path):
  """train -> prune -> quantise -> export (int8 and Hugging Face), every stage evaluated and
  timed, the report written: the whole pipeline in gs://, then a rerun that skips it all."""
  from jaxdistill.compress import pipeline

  (tmp_path / "tiny_pipeline.py").write_text(PIPELINE)
  workdir, local = f"{BUCKET}/pipe", fake_gcs / "bucket" / "pipe"
  state = pipeline.run(str(tmp_path / "tiny_pipeline.py"), workdir, repeats=1, log=lambda m: None)
  assert state["complete"] and [s["status"] for s in state["stages"]] == ["done"] * 5
  names = set(os.listdir(local))
  assert {"00-base", "01-prune", "02-ptq", "03-int8", "04-hf", "pipeline.json"} <= names
  assert {"report.md", "report.json"} <= names and not [n for n in names if "partial" in n]
  assert {"int8.json", "model.safetensors", "config.json"} <= _files(local / "03-int8")
  assert "model.safetensors" in _files(local / "04-hf")
  evaluation = json.loads((local / "02-ptq" / "eval" / "pipeline.json").read_text())
  assert evaluation["latency"]["batch_sizes"] == [1]
  assert state["report"] == f"{workdir}/report.md"
  again = pipeline.run(str(tmp_path / "tiny_pipeline.py"), workdir, repeats=1, log=lambda m: None)
  assert [s["seconds"] for s in again["stages"]] == [s["seconds"] for s in state["stages"]]
