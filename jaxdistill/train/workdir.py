"""A run's workdir: prepared for a run (or its resumption), and read back as a model.

``prepare`` checks a training workdir before anything is written (new, empty, or an earlier
run's to resume; never a user's own files) and writes its config.json; ``truncate_metrics``
and ``save_final_params`` keep metrics.jsonl and final_params/ right on resume.

A ``jaxdistill train`` workdir holds ``config.json`` (the run's resolved config),
``final_params/`` (the student's params) and usually ``tokenizer.json``. ``load_workdir`` reads
the student back onto one device, for ``jaxdistill embed`` and ``jaxdistill export`` (which
writes it with ``models.hf_export.export``). This sits above ``models/`` because it needs the
config defaults (keys added since the run was made) and the checkpoint reader.
"""

import json
from typing import Any

import flax.linen as nn
import jax

from jaxdistill import config, models, paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import hf, hf_export, quant
from jaxdistill.parallel import distributed, precision
from jaxdistill.train import checkpoint
from jaxdistill.train import metrics as metrics_lib


def load_workdir(workdir: str) -> tuple[hf.HFModel, Any]:
  """The student of a finished ``jaxdistill train`` run: (its HF architecture, params).

  Args:
    workdir: the run's directory.
  Returns:
    (hfm, params): the architecture it exports as, and its params (float32, one device).
  Raises:
    JaxdistillError: ``workdir`` lacks config.json or final_params/, or no HF architecture
      matches the student.
  """
  cfg_path = paths.join(workdir, "config.json")
  params_dir = paths.join(workdir, checkpoint.FINAL_PARAMS)
  if not paths.isfile(cfg_path) or not paths.isdir(params_dir):
    raise JaxdistillError(
      f"{workdir!r} is not a finished jaxdistill run (config.json and {checkpoint.FINAL_PARAMS}/)"
    )
  # Keys added since that run was made take their defaults.
  saved = json.loads(paths.read_text(cfg_path))["student"]
  section = dict(config.default_config().student.to_dict(), **saved)
  section["scan_layers"] = False  # exported unrolled, as HF stores it (models.scan converts)
  policy = precision.parse_policy("p=f32,c=f32,o=f32", "student.policy")
  hfm = hf_export.hf_model_for(models.config_from_section(section, policy, "student"))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
    nn.unbox(hf.abstract_params(hfm.module(), hfm.config.max_len)),
  )
  return hfm, checkpoint.load_params(params_dir, target)


# --- a training run's workdir: new, empty or an earlier run's ----------------------------


def is_run_config(path: str) -> bool:
  """Whether ``path`` is a config.json that ``prepare`` wrote (a run's, not a user's)."""
  try:
    saved = json.loads(paths.read_text(path))
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and {"student", "optim", "distill"} <= set(saved)


def prepare(cfg: Any, workdir: str) -> None:
  """Checks ``workdir`` is new, empty or an earlier run's (to resume), then writes config.json.

  Never writes into a directory a user filled: only one holding checkpoints/ or the
  config.json of a run (an earlier run stopped before its first checkpoint) is resumed.

  Raises:
    JaxdistillError: a file in the way, a foreign non-empty directory, or a finished-looking
      run (metrics.jsonl) with no checkpoint to resume.
  """
  existing = paths.nearest_existing(workdir)  # the workdir, or the ancestor it would be made in
  if paths.exists(existing) and not paths.isdir(existing):
    raise JaxdistillError(f"--workdir {workdir!r} is no directory ({existing!r} is a file)")
  ckpt_dir = paths.join(workdir, checkpoint.CHECKPOINTS)
  if (
    paths.isdir(workdir)
    and paths.listdir(workdir)
    and not paths.isdir(ckpt_dir)
    and not is_run_config(paths.join(workdir, "config.json"))
  ):
    raise JaxdistillError(
      f"workdir {workdir!r} is not empty and holds no jaxdistill run (checkpoints/ or its "
      "config.json); pass a new or empty --workdir"
    )
  has_checkpoints = bool(checkpoint.complete_steps(ckpt_dir))
  if paths.exists(paths.join(workdir, "metrics.jsonl")) and not has_checkpoints:
    raise JaxdistillError(
      f"workdir {workdir!r} already holds a run (metrics.jsonl) with no checkpoint to resume; "
      "pass a new --workdir or delete that one"
    )
  # Every process judges the workdir as it was, before process 0 writes to it.
  distributed.barrier("jaxdistill:workdir-checked")
  paths.makedirs(workdir)
  if jax.process_index() == 0:
    paths.path(paths.join(workdir, "config.json")).write_text(
      cfg.to_json_best_effort(indent=2, sort_keys=True), encoding="utf-8"
    )


def truncate_metrics(path: str, step: int) -> None:
  """Drops metrics.jsonl rows after ``step``: a resumed run rewrites them identically."""
  if jax.process_index() == 0 and paths.exists(path):
    rows = [r for r in metrics_lib.read_jsonl(path) if r["step"] <= step]
    paths.write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def save_final_params(workdir: str, params: Any, model_state: Any = None) -> None:
  """WORKDIR/final_params: the student's params alone, or a BatchNorm student's variables
  ``{"params", "batch_stats"}`` (its running averages are part of the model; ``model_state``
  is ``TrainState.model_state``). A finished run resumed replaces it."""
  if model_state and "batch_stats" in model_state:
    params = {"params": params, "batch_stats": model_state["batch_stats"]}
  final = paths.join(workdir, checkpoint.FINAL_PARAMS)
  if paths.isdir(final) and jax.process_index() == 0:
    paths.rmtree(final)
  distributed.barrier("jaxdistill:final-params-removed")  # all save into a clean dir
  checkpoint.save_params(final, params)


INT8_DIR = "int8"


def save_int8(workdir: str, cfg: Any, student: nn.Module, state: Any) -> str | None:
  """WORKDIR/int8: a c=int8 student's int8 weights + scales (``models.quant.save``); None
  (nothing written) for any other student."""
  if not state.model_state or quant.COLLECTION not in state.model_state:
    return None
  variables = {"params": state.params["student"], **state.model_state}
  _, int8_vars = quant.quantize(student, variables, quant.act_of(student), cfg.data.seq_len)
  section = {k: cfg.student[k] for k in models.shape_keys(cfg.student)}
  path = paths.join(workdir, INT8_DIR)
  if jax.process_index() == 0:  # quant.save writes local or remote (gs://) directories
    quant.save(path, int8_vars, section, quant.act_of(student))
  return path


def load_int8(directory: str, mesh: jax.sharding.Mesh) -> tuple[nn.Module, dict, dict]:
  """An int8 directory (a c=int8 run's ``W/int8``, or ``quantize.ptq``'s) as (module, variables
  replicated on ``mesh``, its int8.json): ``evaluate.evaluate({name: (module,
  variables["params"], rest)}, ...)`` measures it like any model."""
  from safetensors.numpy import load as load_safetensors

  meta = json.loads(paths.read_text(paths.join(directory, quant.CONFIG_FILE)))
  module = quant.int8_model(
    models.build(meta["section"], precision.Policy(), "student"), meta["act"]
  )
  init = lambda r: quant.init_variables(module, r, 1)  # noqa: E731 (shapes only)
  abstract = {k: v for k, v in nn.unbox(jax.eval_shape(init, jax.random.key(0))).items()}
  tensors = load_safetensors(paths.read_bytes(paths.join(directory, quant.TENSORS_FILE)))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  variables = jax.tree_util.tree_unflatten(
    treedef, [tensors[quant.tensor_name(p)] for p, _ in leaves]
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return module, jax.device_put(variables, replicated), meta
