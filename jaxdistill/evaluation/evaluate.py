"""Evaluation of language models and image classifiers on the validation split.

``evaluate(models, batches, mesh, teacher=...)`` runs every model (and the
teacher once per batch) over the same batches and returns, per model:

  val_loss       cross-entropy per valid token (nats); ``val_ppl`` = exp(val_loss)
  accuracy       top-1 next-token accuracy
  agreement      share of tokens where the model's top-1 equals the teacher's
  kl_to_teacher  KL(teacher || model) per token at temperature 1
  top5_accuracy  share of tokens whose target is among the model's 5 highest logits
  ece            expected calibration error of the top-1 against the labels (15 equal-width
                 confidence bins); ``ece_to_teacher`` against the teacher's top-1
  tokens, eval_tokens_per_s
  batch_weights, batch_val_loss, batch_accuracy
                 per evaluated batch: its valid tokens (images, sentences) and its own mean of
                 the metric, in order; what the report's noise (a standard error over the
                 batches, ``report.noise``) is computed from
  classifiers ([B, C] logits): the same per image, with images / eval_images_per_s instead of
  tokens and no perplexity
  encoders (no logits: a sentence ``embedding`` [B, D]): cosine_to_teacher (mean over
  sentences of cos(student, teacher embedding); only when both have the same width D),
  sentences, eval_sentences_per_s

Sums are accumulated on device over the global (sharded) batches, so several
processes agree without extra communication. The losses are ``losses.py``'s,
with ``denom=1`` to get sums. ``Periodic`` is what the loop calls every
``eval.every`` steps: CE / accuracy of the student on the first ``eval.batches``
validation batches (always the same ones, so the curve is comparable).

Shape legend: B batch rows, T sequence length, V vocabulary.
"""

import functools
import itertools
import math
import time
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import data as data_lib
from jaxdistill import models as models_lib  # ``models`` is evaluate()'s argument
from jaxdistill.distill import losses
from jaxdistill.evaluation import classify as classify_metrics
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import checkpoint

_LOGITS_FNS: dict = {}  # model config -> its jitted forward, so repeated evaluations reuse it


def _logits_fn(module: nn.Module):
  key = (type(module), module.config)
  if key not in _LOGITS_FNS:
    _LOGITS_FNS[key] = _make_logits_fn(module)
  return _LOGITS_FNS[key]


def _make_logits_fn(module: nn.Module):
  encoder = getattr(module.config, "encoder", False)

  def logits(params, state, batch):
    # ``state``: the model's non-param collections (an FP8 model's scales) or None; without
    # them an FP8 model would silently fall back to plain matmuls.
    out = models_lib.apply(module, {"params": params, **(state or {})}, batch)
    # An encoder has no logits: its output is the sentence embedding [B, D].
    return (out["embedding"] if encoder else out["logits"]).astype(jnp.float32)

  return jax.jit(logits)


def _rows(logits_BxTxV, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits [N, C], targets [N], weights [N]): tokens (or images) as rows for the
  classification metrics."""
  c = logits_BxTxV.shape[-1]
  return (
    logits_BxTxV.reshape(-1, c),
    batch["targets"].reshape(-1),
    batch["weights"].reshape(-1),
  )


def _top_sums(logits_BxTxV, teacher_logits_BxTxV, batch) -> dict[str, Any]:
  """Top-5 hits and calibration bins against the targets (and the teacher's top-1), per token
  of a language model or per image of a classifier."""
  logits_NxC, targets_N, weights_N = _rows(logits_BxTxV, batch)
  k = min(5, logits_NxC.shape[-1])
  out = {
    "top5": classify_metrics.topk_correct(logits_NxC, targets_N, weights_N, k),
    "bins": classify_metrics.calibration_bins(logits_NxC, targets_N, weights_N),
  }
  if teacher_logits_BxTxV is not None:
    teacher_top_N = jnp.argmax(teacher_logits_BxTxV, axis=-1).reshape(-1)
    out["bins_teacher"] = classify_metrics.calibration_bins(logits_NxC, teacher_top_N, weights_N)
  return out


def _encoder_sums(emb_BxD, teacher_emb_BxD, batch) -> dict[str, jax.Array]:
  """An encoder's sums: cosine of each sentence's embedding to the teacher's (rows with no
  valid token are padding and count 0)."""
  valid_B = jnp.sum(batch["weights"], axis=-1) > 0
  out = {"sentences": jnp.sum(valid_B.astype(jnp.float32))}
  # Embeddings of different widths live in different spaces: no cosine between them.
  if teacher_emb_BxD is not None and teacher_emb_BxD.shape == emb_BxD.shape:
    unit = lambda e: e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    cos_B = jnp.sum(unit(emb_BxD) * unit(teacher_emb_BxD), axis=-1)
    out["cosine"] = jnp.sum(jnp.where(valid_B, cos_B, 0.0))
  return out


@functools.partial(jax.jit, static_argnames="encoder")
def _sums(logits_BxTxV, teacher_logits_BxTxV, batch, encoder=False) -> dict[str, Any]:
  """Per-batch sums over valid tokens / images (the teacher's terms only when it is given);
  [B, C] logits are a classifier's; an encoder's outputs are embeddings [B, D]."""
  if encoder:
    return _encoder_sums(logits_BxTxV, teacher_logits_BxTxV, batch)
  mask_BxT, targets_BxT = batch["weights"], batch["targets"]
  ce, _ = losses.cross_entropy(logits_BxTxV, targets_BxT, mask_BxT, 1.0)
  top_BxT = jnp.argmax(logits_BxTxV, axis=-1)
  out = {
    "loss": ce,
    "correct": jnp.sum(mask_BxT * (top_BxT == targets_BxT)),
    "tokens": jnp.sum(mask_BxT),
  }
  if teacher_logits_BxTxV is not None:
    kl, _ = losses.logit_loss(
      "kl", logits_BxTxV, teacher_logits_BxTxV, mask_BxT, 1.0, temperature=1.0
    )
    out["kl"] = kl
    out["agree"] = jnp.sum(mask_BxT * (top_BxT == jnp.argmax(teacher_logits_BxTxV, axis=-1)))
  out.update(_top_sums(logits_BxTxV, teacher_logits_BxTxV, batch))
  return out


# Per-batch terms kept for the noise estimate: (count, {metric: sum}) of a model's batch sums.
_PER_BATCH = {"tokens": {"val_loss": "loss", "accuracy": "correct"}}
_PER_BATCH["sentences"] = {"cosine_to_teacher": "cosine"}


def _per_batch(batches: list[dict]) -> dict[str, list]:
  """Each batch's weight (valid tokens / images / sentences) and its own mean of each metric:
  the samples a standard error over batches needs (batches are the evaluation's independent
  units: tokens of one document are not independent of each other)."""
  count = "sentences" if "sentences" in batches[0] else "tokens"
  weights = [float(b[count]) for b in batches]
  out = {"batch_weights": weights}
  for metric, term in _PER_BATCH[count].items():
    if term in batches[0]:
      out[f"batch_{metric}"] = [float(b[term]) / w if w else 0.0 for b, w in zip(batches, weights)]
  return out


def _finish_encoder(sums: dict, seconds: float) -> dict[str, float]:
  n = max(float(sums["sentences"]), 1.0)
  out = {"sentences": int(sums["sentences"]), "eval_sentences_per_s": n / max(seconds, 1e-9)}
  if "cosine" in sums:
    out["cosine_to_teacher"] = float(sums["cosine"]) / n
  return out


def _finish(sums: dict, seconds: float, classifier: bool, batches: list[dict]) -> dict:
  if "sentences" in sums:
    return dict(_finish_encoder(sums, seconds), **_per_batch(batches))
  n = max(float(sums["tokens"]), 1.0)
  out = {
    "val_loss": float(sums["loss"]) / n,
    "accuracy": float(sums["correct"]) / n,
    "top5_accuracy": float(sums["top5"]) / n,
    "ece": float(classify_metrics.ece(sums["bins"])),
    "tokens": int(sums["tokens"]),
    "eval_tokens_per_s": n / max(seconds, 1e-9),
  }
  out["val_ppl"] = math.exp(min(out["val_loss"], 700.0))
  if "kl" in sums:
    out["kl_to_teacher"] = float(sums["kl"]) / n
    out["agreement"] = float(sums["agree"]) / n
    out["ece_to_teacher"] = float(classify_metrics.ece(sums["bins_teacher"]))
  if classifier:  # images, not tokens
    out["images"] = out.pop("tokens")
    out["eval_images_per_s"] = out.pop("eval_tokens_per_s")
    del out["val_ppl"]
  return dict(out, **_per_batch(batches))


def _variables(entry: tuple) -> tuple[Any, Any]:
  """(params, state) of an ``evaluate`` entry (module, params[, state])."""
  return entry[1], entry[2] if len(entry) > 2 else None


def evaluate(
  models: dict[str, tuple[nn.Module, Any]],
  batches: Iterable[dict[str, np.ndarray]],
  mesh: jax.sharding.Mesh,
  teacher: tuple[nn.Module, Any] | None = None,
) -> dict[str, dict[str, float]]:
  """Evaluates each model (and the teacher) on the same batches.

  Args:
    models: name -> (module, params) or (module, params, state); params sharded on
      ``mesh``; state: the model's non-param variables (``TrainState.model_state``, an FP8
      teacher's calibrated scales), or None.
    batches: this process's rows of global batches (dicts of [B_local, T] numpy).
    mesh: the mesh the params live on.
    teacher: optional (module, params[, state]): adds agreement and KL to the teacher, and
      the teacher itself under the name "teacher".

  Returns:
    name -> metrics (see the module docstring).
  """
  names = list(models) + (["teacher"] if teacher else [])
  fns = {name: _logits_fn(models[name][0]) for name in models}
  teacher_fn = _logits_fn(teacher[0]) if teacher else None
  totals = {name: None for name in names}
  # Each batch's scalar sums too (device scalars, fetched once at the end): the noise estimate.
  kept = {name: [] for name in names}
  seconds = dict.fromkeys(names, 0.0)
  add = lambda a, b: b if a is None else jax.tree.map(jnp.add, a, b)
  first = next(iter(models.values()))[0]
  encoder = bool(getattr(first.config, "encoder", False))
  classifier = models_lib.is_vision(first)
  with sharding_lib.rules_context(mesh):
    for local in batches:
      batch = sharding_lib.shard_batch(local, mesh)
      teacher_logits = None
      if teacher:
        start = time.perf_counter()
        teacher_logits = jax.block_until_ready(teacher_fn(*_variables(teacher), batch))
        seconds["teacher"] += time.perf_counter() - start
        sums = _sums(teacher_logits, None, batch, encoder)
        totals["teacher"] = add(totals["teacher"], sums)
        kept["teacher"].append(_scalars(sums))
      for name in models:
        start = time.perf_counter()
        logits = jax.block_until_ready(fns[name](*_variables(models[name]), batch))
        seconds[name] += time.perf_counter() - start
        sums = _sums(logits, teacher_logits, batch, encoder)
        totals[name] = add(totals[name], sums)
        kept[name].append(_scalars(sums))
  if any(t is None for t in totals.values()):
    raise ValueError("evaluate() got no batches")
  totals, kept = jax.device_get((totals, kept))
  return {name: _finish(totals[name], seconds[name], classifier, kept[name]) for name in names}


def _scalars(sums: dict) -> dict:
  """The scalar sums of one batch (not the calibration bins)."""
  return {k: sums[k] for k in ("loss", "correct", "tokens", "cosine", "sentences") if k in sums}


def load_variables(
  module: nn.Module, path: str, mesh: jax.sharding.Mesh, seq_len: int, rules: Any = None
) -> tuple[dict, dict]:
  """A model's variables from a ``final_params`` directory, in the module's shardings (by
  ``rules``, None: ``sharding.LOGICAL_RULES``).

  A final_params directory holds the params tree; a BatchNorm model's holds its variables
  ``{"params", "batch_stats"}`` (``workdir.save_final_params``): which one is decided by the
  module. Frozen FP8 state is never saved (a c=fp8 teacher calibrates its own).

  Returns:
    (variables, shardings): ``{"params": ...}`` plus ``"batch_stats"`` for a BatchNorm model.
  """
  abstract = models_lib.abstract_variables(module, mesh, seq_len, rules)
  target = {k: abstract[k] for k in ("params", "batch_stats") if k in abstract}
  if "batch_stats" in target:
    variables = checkpoint.load_params(path, target)
  else:
    variables = {"params": checkpoint.load_params(path, target["params"])}
  return variables, jax.tree.map(lambda a: a.sharding, target)


def load_params(module: nn.Module, path: str, mesh: jax.sharding.Mesh, seq_len: int) -> Any:
  """A model's params from a ``final_params`` directory, in the module's shardings."""
  target = models_lib.abstract_variables(module, mesh, seq_len)["params"]
  return checkpoint.load_params(path, target)


def validation_batches(cfg: Any, limit: int = 0) -> Iterable[dict[str, np.ndarray]]:
  """This process's validation batches: the whole split (text sources) or ``limit`` of them."""
  it = data_lib.make_iterator(cfg, "validation")
  return itertools.islice(it, limit) if limit else it


class Periodic:
  """The training loop's periodic evaluation: student CE on the first ``eval.batches`` batches
  (and, codistilling, each peer's: ``eval/<peer>/loss`` and ``/accuracy``)."""

  def __init__(self, cfg: Any, student: nn.Module, mesh: jax.sharding.Mesh, peers: dict = None):
    self.cfg, self.student, self.mesh, self.peers = cfg, student, mesh, peers or {}

  def __call__(self, params: Any, state: Any = None, peer_params: dict = None) -> dict[str, float]:
    batches = validation_batches(self.cfg, self.cfg.eval.batches)
    models_ = {"student": (self.student, params, state)}
    models_.update({n: (m, (peer_params or {})[n], None) for n, m in self.peers.items()})
    got = evaluate(models_, batches, self.mesh)
    m = got["student"]
    if "val_loss" not in m:  # an encoder: nothing to measure without its teacher
      return {}
    if "val_ppl" not in m:  # a classifier
      return {
        "eval/loss": m["val_loss"],
        "eval/accuracy": m["accuracy"],
        "eval/top5": m["top5_accuracy"],
      }
    row = {"eval/loss": m["val_loss"], "eval/ppl": m["val_ppl"], "eval/accuracy": m["accuracy"]}
    for n in self.peers:
      row.update({f"eval/{n}/loss": got[n]["val_loss"], f"eval/{n}/accuracy": got[n]["accuracy"]})
    return row
