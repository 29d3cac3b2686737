"""`jaxdistill eval`: metrics against float64 NumPy references (sharded == one device), a run's
final params and checkpoints, other data, and bad input."""

import json

import jax
import numpy as np
import pytest
from conftest import ROOT

from jaxdistill.cli import commands as cli
from jaxdistill.data.synthetic import SyntheticData
from jaxdistill.evaluation import evaluate
from jaxdistill.models.transformer import Transformer, TransformerConfig
from jaxdistill.parallel import sharding


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ece(logits, reference, weights, bins=15):
  """Guo et al.'s ECE with equal-width bins (m/M, (m+1)/M], float64."""
  conf = np.exp(_log_softmax(logits)).max(-1)
  correct = (logits.argmax(-1) == reference).astype(np.float64)
  idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
  total, gap = weights.sum(), 0.0
  for m in range(bins):
    w = weights * (idx == m)
    gap += abs((w * correct).sum() - (w * conf).sum())
  return gap / total


def _models():
  student = Transformer(TransformerConfig(48, 16, 1, 2, 32, 16))
  teacher = Transformer(TransformerConfig(48, 32, 2, 2, 64, 16))
  tokens = np.zeros((1, 16), np.int32)
  s_params = student.init(jax.random.key(0), tokens)["params"]
  t_params = teacher.init(jax.random.key(1), tokens)["params"]
  return (student, s_params), (teacher, t_params)


@pytest.mark.slow
def test_lm_top5_and_calibration_match_numpy_and_the_sharded_mesh():
  (student, s_params), (teacher, t_params) = _models()
  data = SyntheticData(48, 16, 8, seed=5, pad_fraction=0.5)
  batches = [data.global_batch(i) for i in range(2)]
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  got = {
    name: evaluate.evaluate({"s": (student, s_params)}, batches, mesh, teacher=(teacher, t_params))[
      "s"
    ]
    for name, mesh in (("one", one), ("eight", eight))
  }
  apply = lambda m, p, b: np.asarray(
    m.apply({"params": p}, b["inputs"], segment_ids_BxT=b["segment_ids"])["logits"], np.float64
  )
  ls = np.concatenate([apply(student, s_params, b).reshape(-1, 48) for b in batches])
  lt = np.concatenate([apply(teacher, t_params, b).reshape(-1, 48) for b in batches])
  y = np.concatenate([b["targets"].reshape(-1) for b in batches])
  w = np.concatenate([b["weights"].reshape(-1) for b in batches]).astype(np.float64)
  rank = (ls > np.take_along_axis(ls, y[:, None], -1)).sum(-1)
  top5 = (w * (rank < 5)).sum() / w.sum()
  for m in got.values():
    assert m["top5_accuracy"] == pytest.approx(top5)
    assert m["ece"] == pytest.approx(_ece(ls, y, w), abs=1e-5)
    assert m["ece_to_teacher"] == pytest.approx(_ece(ls, lt.argmax(-1), w), abs=1e-5)
  assert 0 < top5 < 1  # a random model: neither trivially right nor wrong
  for key in ("val_loss", "kl_to_teacher", "top5_accuracy", "ece", "agreement"):
    assert got["one"][key] == pytest.approx(got["eight"][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_encoder_cosine_to_the_teacher_matches_numpy():
  from jaxdistill.models.bert import Encoder

  cfg = dict(vocab_size=40, max_len=16, norm="layernorm", pos="learned", encoder=True)
  student = Encoder(TransformerConfig(d_model=16, num_layers=1, num_heads=2, d_ff=32, **cfg))
  # Same width: cosine compares embeddings of one space (the MiniLM recipe's student keeps
  # the teacher's width).
  teacher = Encoder(TransformerConfig(d_model=16, num_layers=2, num_heads=2, d_ff=64, **cfg))
  tokens = np.zeros((1, 16), np.int32)
  s_params = student.init(jax.random.key(0), tokens)["params"]
  t_params = teacher.init(jax.random.key(1), tokens)["params"]
  batch = SyntheticData(40, 16, 8, seed=2, pad_fraction=0.5).global_batch(0)
  batch["weights"][-1] = 0  # a padding row: not a sentence
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  got = evaluate.evaluate({"s": (student, s_params)}, [batch], mesh, teacher=(teacher, t_params))

  def emb(model, params):
    out = model.apply({"params": params}, batch["inputs"], segment_ids_BxT=batch["segment_ids"])
    e = np.asarray(out["embedding"], np.float64)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)

  cos = (emb(student, s_params) * emb(teacher, t_params)).sum(-1)[:-1]
  assert got["s"]["sentences"] == 7
  assert got["s"]["cosine_to_teacher"] == pytest.approx(cos.mean(), rel=1e-5)
  assert got["teacher"]["sentences"] == 7 and "cosine_to_teacher" not in got["teacher"]


def _train_smoke(workdir, steps=4):
  from jaxdistill import config as config_lib
  from jaxdistill.train import loop

  overrides = dict(optim__steps=str(steps), ckpt__every="2", ckpt__async_save="false")
  overrides.update(log__progress="false", eval__batches="2")
  cfg = config_lib.load_config(
    str(ROOT / "configs" / "smoke.py"), [(k.replace("__", "."), v) for k, v in overrides.items()]
  )
  loop.train(cfg, str(workdir))


@pytest.mark.slow
def test_eval_of_a_run_final_and_checkpoint_agree_and_bad_input_is_one_line(tmp_path, capsys):
  work = tmp_path / "run"
  _train_smoke(work)
  assert cli.main(["eval", "--workdir", str(work)]) == 0
  final = json.loads((work / "eval" / "validation.json").read_text())
  assert final["step"] == 4 and final["params_source"] == "final_params"
  assert final["task"] == "text" and final["data"]["batches"] == 2  # eval.batches: synthetic
  assert set(final["models"]) == {"student", "teacher"}
  # The student as its teacher's speculative draft (greedy; the teacher has no such entry).
  assert 0 <= final["models"]["student"]["draft_acceptance"] <= 1
  assert "draft_acceptance" not in final["models"]["teacher"]
  assert final["size"]["student"]["params"] < final["size"]["teacher"]["params"]
  assert "| student |" in capsys.readouterr().out

  assert cli.main(["eval", "--workdir", str(work), "--step", "4"]) == 0
  step4 = json.loads((work / "eval" / "validation-step4.json").read_text())
  assert step4["params_source"] == "checkpoints/4"
  for name, metrics in final["models"].items():  # the same params, measured twice
    for key, value in metrics.items():
      if not key.endswith("_per_s"):
        assert step4["models"][name][key] == pytest.approx(value, rel=1e-6), (name, key)
  assert cli.main(["eval", "--workdir", str(work), "--step", "2", "--name", "early"]) == 0
  early = json.loads((work / "eval" / "early.json").read_text())
  assert early["models"]["student"]["val_loss"] != final["models"]["student"]["val_loss"]

  other = ["--config.data.seed_unused=1"]
  cases = {
    ("--step", "3"): "no checkpoint of that step",
    ("--config.optim.lr=1",): "only data.* / mesh.* / cache_dir",
    tuple(other): "unknown key",
  }
  for extra, message in cases.items():
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(work), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err
  (work / "final_params").rename(work / "moved")
  assert cli.main(["eval", "--workdir", str(work)]) == 2
  assert "has no final_params/" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  assert "is not a jaxdistill run" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_other_text_refuses_a_different_tokenizer(tmp_path, capsys):
  from jaxdistill import config as config_lib
  from jaxdistill.train import loop

  cfg = config_lib.load_config(str(ROOT / "configs" / "quickstart.py") + ":baseline,test")
  cfg.optim.steps, cfg.log.progress, cfg.cache_dir = 2, False, str(tmp_path / "cache")
  work = tmp_path / "run"
  loop.train(cfg, str(work))
  texts = tmp_path / "texts"
  texts.mkdir()
  (texts / "a.txt").write_text("def f(x):\n    return x + 1\n" * 40)
  files = f"--config.data.eval_files={texts}/*.txt"
  args = ["eval", "--workdir", str(work), "--config.data.source=text", files]
  assert cli.main(args) == 0
  (result,) = (work / "eval").glob("data-*.json")
  got = json.loads(result.read_text())
  assert got["data"]["source"] == "text" and got["models"]["student"]["tokens"] > 0
  bert = ROOT / "tests" / "fixtures" / "hf" / "bert_tiny" / "tokenizer.json"
  capsys.readouterr()
  assert cli.main([*args, f"--config.data.tokenizer={bert}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: data.tokenizer") and "not the tokenizer the model" in err
