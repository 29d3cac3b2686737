"""Pruning a finished run: ``prune_workdir(src, dst, targets)`` writes a smaller model's workdir.

The student of ``src`` (its ``final_params/``) is scored on ``calibration_batches`` batches of
its own training data (``models.prune_scores``: activation magnitude, or gradient x activation
per head), the lowest-scoring heads / MLP neurons / residual channels / layers (or a SimpleCNN's
conv channels and fc units) are cut out (``models.prune``), and ``dst`` gets:

  config.json     the source run's config with the new student shape keys (and init_from /
                  init_layers cleared), so ``dst`` reads like any finished run
  final_params/   the pruned params (``workdir.save_final_params``)
  tokenizer.json  the source's, copied
  prune.json      what was done: source, method, targets, the changed keys, the kept unit
                  indices, params before and after (the dict ``prune_workdir`` returns)

``dst`` then serves as ``student.init_from`` (with the same student keys), as
``teacher.source=workdir``, and for ``jaxdistill export`` / ``embed``. The distillation
projections of the source run (``TrainState.params["projections"]``) are not part of
``final_params`` and are not carried: the next run starts fresh ones for the new width.

Runs on one device of one process (calibration is a few forward passes of a small model).
"""

import copy
import itertools
import json
from typing import Any, Iterable

import jax
import numpy as np

from jaxdistill import data as data_lib
from jaxdistill import models, paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.evaluation import evaluate
from jaxdistill.evaluation import job as eval_run
from jaxdistill.models import prune, prune_scores
from jaxdistill.parallel import sharding
from jaxdistill.train import run as run_lib
from jaxdistill.train import workdir as workdir_lib


def _one_device_mesh() -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices()[:1]).reshape((1,) * len(sharding.MESH_AXES))
  return jax.sharding.Mesh(devices, sharding.MESH_AXES)


def load_student(src_workdir: str) -> tuple[Any, Any, dict]:
  """(the run's config, its student module, its final variables on one device).

  Raises:
    JaxdistillError: ``src_workdir`` is no finished jaxdistill run.
  """
  cfg = eval_run.run_config(src_workdir)
  # Pruning scores and cuts block_{i}: a scan_layers run's params load unrolled (models.scan).
  cfg.student.scan_layers = False
  own = paths.join(src_workdir, "tokenizer.json")
  if paths.isfile(own) and not data_lib.is_image_model(cfg):
    cfg.data.tokenizer = own  # calibration text tokenised as the model was trained
  path = paths.join(src_workdir, "final_params")
  if not paths.isdir(path):
    raise JaxdistillError(f"{src_workdir!r} has no final_params/ (the run has not finished)")
  module = run_lib.model_of(cfg, "student")
  variables, _ = evaluate.load_variables(module, path, _one_device_mesh(), cfg.data.seq_len)
  return cfg, module, variables


def _surgery(module: Any, params: Any, scores: dict, targets: dict) -> tuple[dict, dict, dict]:
  """(new params, changed config keys, kept unit indices as lists) for the module's kind."""
  if models.is_vision(module):
    keep = prune.keep_cnn(scores, module.config, targets)
    new_params, changed = prune.prune_cnn(params, module.config, keep)
    kept = {"channels": [k.tolist() for k in keep["channels"]], "fc": keep["fc"].tolist()}
    return new_params, changed, kept
  keep = prune.keep_transformer(scores, module.config, targets)
  new_params, changed = prune.prune_transformer(params, module.config, keep)
  kept = {
    "layers": list(keep["layers"]),
    "heads": [k.tolist() for k in keep["heads"]],
    "mlp": [k.tolist() for k in keep["mlp"]],
    "embed": keep["embed"].tolist(),
  }
  return new_params, changed, kept


def _check_dst(dst_workdir: str) -> None:
  if paths.exists(dst_workdir) and (not paths.isdir(dst_workdir) or paths.listdir(dst_workdir)):
    raise JaxdistillError(f"dst_workdir {dst_workdir!r} exists and is not empty; pass a new one")


def _new_config(cfg: Any, changed: dict) -> Any:
  """The source config with the new student shape. Losses the new shape cannot pair with the
  run's teacher are adjusted so the workdir's config stays valid (``jaxdistill eval`` rebuilds
  the run from it): MiniLM attention transfer pairs heads one to one, so it is turned off when
  the head counts now differ; hidden-state losses get a learned projection when widths do."""
  new = copy.deepcopy(cfg)
  for key, value in changed.items():
    new.student[key] = value
  new.student.init_from = ""
  new.student.init_layers = ""
  if "num_heads" in new.teacher and new.student.get("num_heads") != new.teacher.num_heads:
    new.distill.attention.update(weight=0.0, value_weight=0.0, schedule="constant")
  if "d_model" in new.teacher and new.student.get("d_model") != new.teacher.d_model:
    new.distill.hidden.project = True
  return new


def prune_workdir(
  src_workdir: str,
  dst_workdir: str,
  targets: dict,
  calibration_batches: int = 8,
  method: str = "activation",
  batches: Iterable[dict] | None = None,
) -> dict:
  """Prunes the student of a finished run into a new workdir (see the module docstring).

  Args:
    src_workdir: a finished ``jaxdistill train`` run (config.json, final_params/); local or
      remote (``gs://``), as is ``dst_workdir``.
    dst_workdir: a new or empty directory.
    targets: what to keep, each an int count or a float fraction of the model's: transformers
      "num_heads" (query heads per layer; with GQA a multiple of the group size), "d_ff",
      "d_model", "num_layers" with "layers" (a ``student.init_layers`` spec, default
      "uniform"); SimpleCNN "cnn_channels" (one target or one per stage) and "cnn_fc".
    calibration_batches: how many batches of the run's training data to score on.
    method: "activation" or "gradient" (``models.prune_scores``).
    batches: the calibration batches themselves instead of the run's data (tests, other data).
  Returns:
    The record written to ``dst_workdir/prune.json``.
  Raises:
    JaxdistillError / ConfigError: not a finished run, ``dst_workdir`` in use, an impossible
      target, an unsupported model or method (one line each).
  """
  if jax.process_count() != 1:
    raise JaxdistillError("prune_workdir runs in one process; start it without jax.distributed")
  _check_dst(dst_workdir)
  cfg, module, variables = load_student(src_workdir)
  if batches is None:
    if calibration_batches < 1:
      raise JaxdistillError(f"calibration_batches must be >= 1, got {calibration_batches}")
    batches = itertools.islice(data_lib.make_iterator(cfg, "train"), calibration_batches)
  try:
    scores = prune_scores.score(module, variables, batches, method)
  except ValueError as e:
    raise JaxdistillError(f"pruning {src_workdir!r}: {e}") from None
  params, changed, kept = _surgery(module, variables["params"], scores, dict(targets))
  new_cfg = _new_config(cfg, changed)
  new_module = run_lib.model_of(new_cfg, "student")
  abstract = models.abstract_variables(new_module, _one_device_mesh(), cfg.data.seq_len)
  want_shapes = jax.tree.map(lambda a: a.shape, abstract["params"])
  if jax.tree.map(np.shape, params) != want_shapes:  # a bug here, never a user's error
    raise AssertionError(f"pruned params do not fit the new config's {want_shapes}")
  paths.makedirs(dst_workdir)
  paths.write_text(
    paths.join(dst_workdir, "config.json"), new_cfg.to_json_best_effort(indent=2, sort_keys=True)
  )
  # Only BatchNorm-free models are pruned (SimpleCNN, transformers): params alone.
  workdir_lib.save_final_params(dst_workdir, jax.tree.map(np.asarray, params))
  tokenizer = paths.join(src_workdir, "tokenizer.json")
  if paths.isfile(tokenizer):
    paths.copy(tokenizer, paths.join(dst_workdir, "tokenizer.json"))
  record = {
    "source": paths.abspath(src_workdir),
    "method": method,
    "targets": {k: list(v) if isinstance(v, tuple) else v for k, v in dict(targets).items()},
    "changed": changed,
    "kept": kept,
    "params_before": models.count_params(variables["params"]),
    "params_after": models.count_params(params),
  }
  paths.write_text(
    paths.join(dst_workdir, "prune.json"), json.dumps(record, indent=2, sort_keys=True)
  )
  return record
