"""Evaluation metrics against a float64 NumPy reference, on a sharded mesh."""

import jax
import numpy as np
import pytest

from jaxdistill.data.synthetic import SyntheticData
from jaxdistill.evaluation import evaluate
from jaxdistill.models.transformer import Transformer, TransformerConfig
from jaxdistill.parallel import sharding


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.slow
def test_metrics_match_numpy_reference():
  student = Transformer(TransformerConfig(48, 16, 1, 2, 32, 16))
  teacher = Transformer(TransformerConfig(48, 32, 2, 2, 64, 16))
  data = SyntheticData(48, 16, 8, seed=3, pad_fraction=0.5)
  batches = [data.global_batch(i) for i in range(2)]
  tokens = np.zeros((1, 16), np.int32)
  s_params = student.init(jax.random.key(0), tokens)["params"]
  t_params = teacher.init(jax.random.key(1), tokens)["params"]
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  got = evaluate.evaluate({"s": (student, s_params)}, batches, mesh, teacher=(teacher, t_params))

  sums = dict(loss=0.0, agree=0.0, kl=0.0, correct=0.0, n=0.0, t_loss=0.0)
  per_batch = {"weights": [], "val_loss": [], "accuracy": []}  # each batch's own
  for b in batches:
    apply = lambda m, p: np.asarray(
      m.apply({"params": p}, b["inputs"], segment_ids_BxT=b["segment_ids"])["logits"], np.float64
    )
    ls, lt = _log_softmax(apply(student, s_params)), _log_softmax(apply(teacher, t_params))
    w, y = b["weights"].astype(np.float64), b["targets"]
    pick = lambda logp: np.take_along_axis(logp, y[..., None], -1)[..., 0]
    sums["loss"] += -(w * pick(ls)).sum()
    sums["t_loss"] += -(w * pick(lt)).sum()
    sums["kl"] += (w * (np.exp(lt) * (lt - ls)).sum(-1)).sum()
    sums["agree"] += (w * (ls.argmax(-1) == lt.argmax(-1))).sum()
    sums["correct"] += (w * (ls.argmax(-1) == y)).sum()
    sums["n"] += w.sum()
    per_batch["weights"].append(w.sum())
    per_batch["val_loss"].append(-(w * pick(ls)).sum() / w.sum())
    per_batch["accuracy"].append((w * (ls.argmax(-1) == y)).sum() / w.sum())
  s, t = got["s"], got["teacher"]
  assert s["tokens"] == t["tokens"] == sums["n"] > 0
  assert s["val_loss"] == pytest.approx(sums["loss"] / sums["n"], rel=1e-5)
  assert s["val_ppl"] == pytest.approx(np.exp(sums["loss"] / sums["n"]), rel=1e-5)
  assert s["kl_to_teacher"] == pytest.approx(sums["kl"] / sums["n"], rel=1e-4, abs=1e-6)
  assert s["agreement"] == pytest.approx(sums["agree"] / sums["n"])
  assert s["accuracy"] == pytest.approx(sums["correct"] / sums["n"])
  assert t["val_loss"] == pytest.approx(sums["t_loss"] / sums["n"], rel=1e-5)
  # Each batch's weight and means, in order: the samples of the report's standard error.
  assert s["batch_weights"] == per_batch["weights"] == t["batch_weights"]
  assert s["batch_val_loss"] == pytest.approx(per_batch["val_loss"], rel=1e-5)
  assert s["batch_accuracy"] == pytest.approx(per_batch["accuracy"])
  assert per_batch["val_loss"][0] != pytest.approx(per_batch["val_loss"][1])  # two samples


@pytest.mark.slow
def test_a_model_agrees_with_itself():
  model = Transformer(TransformerConfig(32, 16, 1, 2, 32, 16))
  params = model.init(jax.random.key(0), np.zeros((1, 16), np.int32))["params"]
  batch = SyntheticData(32, 16, 8, seed=0).global_batch(0)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  got = evaluate.evaluate({"same": (model, params)}, [batch], mesh, teacher=(model, params))
  assert got["same"]["agreement"] == 1.0
  assert got["same"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
