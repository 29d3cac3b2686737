"""Post-training quantisation (PTQ) of a finished student, and int8 files read back.

``ptq(W)`` is the baseline every int8 QAT student (``student.policy=...,c=int8``) is compared
with: the float student of workdir ``W`` (its ``final_params``), its static activation scales
calibrated on the first batches of a fresh training iterator (``models.quant.calibrate``), its
projections converted to int8 weights + scales (``models.quant.quantize``), written like a QAT
run's ``W/int8``: ``model.safetensors`` + ``int8.json`` (``models.quant.save``).

``load_int8(dir, mesh)`` reads either back as a module + variables that ``models.apply`` and
``evaluate.evaluate`` run with ``int8 x int8 -> int32`` matmuls.
"""

import dataclasses
import itertools
import json
import os

import flax.linen as nn
import jax

from jaxdistill import checkpoint, data as data_lib, eval_run, evaluate, models, precision
from jaxdistill import sharding as sharding_lib
from jaxdistill.models import quant

PTQ_DIR = "int8_ptq"


def ptq(
  workdir: str,
  out: str | None = None,
  calibration_batches: int = 8,
  act: str = "symmetric",
  devices=None,
) -> str:
  """Post-training int8 quantisation of workdir ``W``'s student.

  Args:
    workdir: a finished ``jaxdistill train`` run (config.json, final_params/).
    out: the output directory (default ``W/int8_ptq``).
    calibration_batches: training batches that set the static activation scales.
    act: "symmetric" or "asymmetric" activations.
    devices: the devices of the run's mesh (default: all).
  Returns:
    The output directory (``model.safetensors`` + ``int8.json``).
  """
  cfg = eval_run.run_config(workdir)
  act = precision.INT8_ACTS.get(act, act)
  if act not in quant.ACTS:
    raise ValueError(f"act={act!r}: choose symmetric or asymmetric")
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  policy = precision.parse_policy(cfg.student.policy, "student.policy")
  policy = dataclasses.replace(policy, int8="", fp8=False)  # the float student
  student = models.build(cfg.student, policy, "student")
  path = os.path.join(workdir, checkpoint.FINAL_PARAMS)
  variables, _ = evaluate.load_variables(student, path, mesh, cfg.data.seq_len)
  qat = quant.qat_model(student, act)
  abstract = models.abstract_variables(qat, mesh, cfg.data.seq_len)[quant.COLLECTION]
  zeros = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding), abstract)
  batches = itertools.islice(data_lib.make_iterator(cfg, "train"), calibration_batches)
  stats = quant.calibrate(qat, {**variables, quant.COLLECTION: zeros}, batches, mesh)
  _, int8_vars = quant.quantize(qat, {**variables, quant.COLLECTION: stats}, act, cfg.data.seq_len)
  out = out or os.path.join(workdir, PTQ_DIR)
  section = {k: cfg.student[k] for k in models.shape_keys(cfg.student)}
  quant.save(out, int8_vars, section, act)
  return out


def load_int8(directory: str, mesh: jax.sharding.Mesh) -> tuple[nn.Module, dict, dict]:
  """An int8 directory (a c=int8 run's ``W/int8`` or ``ptq``'s) as (module, variables
  replicated on ``mesh``, its int8.json): ``evaluate.evaluate({name: (module,
  variables["params"], rest)}, ...)`` measures it like any model."""
  from safetensors.numpy import load_file

  with open(os.path.join(directory, quant.CONFIG_FILE)) as f:
    meta = json.load(f)
  module = quant.int8_model(
    models.build(meta["section"], precision.Policy(), "student"), meta["act"]
  )
  init = lambda r: quant.init_variables(module, r, 1)  # noqa: E731 (shapes only)
  abstract = {k: v for k, v in nn.unbox(jax.eval_shape(init, jax.random.key(0))).items()}
  tensors = load_file(os.path.join(directory, quant.TENSORS_FILE))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  variables = jax.tree_util.tree_unflatten(
    treedef, [tensors[quant.tensor_name(p)] for p, _ in leaves]
  )
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return module, jax.device_put(variables, replicated), meta
