"""Post-training quantisation (PTQ) of a finished student, and int8 files read back.

``ptq(W)`` is the baseline every int8 QAT student (``student.policy=...,c=int8``) is compared
with: the float student of workdir ``W`` (its ``final_params``), its static activation scales
calibrated on the first batches of a fresh training iterator (``models.quant.calibrate``), its
projections converted to int8 weights + scales (``models.quant.quantize``), written like a QAT
run's ``W/int8``: ``model.safetensors`` + ``int8.json`` (``models.quant.save``).

``ptq_workdir(src, dst)`` makes that a workdir of its own (``jaxdistill quantize``): ``dst`` holds
the source's config with ``c=int8`` in the student's policy, its tokenizer, ``int8/`` and
``quantize.json``, so ``jaxdistill eval`` / ``report`` treat it like a QAT run (both are
evaluated through their ``int8/`` directory).

``load_int8(dir, mesh)`` reads either back as a module + variables that ``models.apply`` and
``evaluate.evaluate`` run with ``int8 x int8 -> int32`` matmuls.
"""

import dataclasses
import itertools
import json

import jax

from jaxdistill import data as data_lib
from jaxdistill import models, paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.evaluation import evaluate
from jaxdistill.evaluation import job as eval_run
from jaxdistill.models import quant
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import checkpoint
from jaxdistill.train import workdir as workdir_lib

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
    out: the output directory (default ``W/int8_ptq``); it and ``workdir`` may be ``gs://``.
    calibration_batches: training batches that set the static activation scales.
    act: "symmetric" or "asymmetric" activations.
    devices: the devices of the run's mesh (default: all).
  Returns:
    The output directory (``model.safetensors`` + ``int8.json``).
  """
  cfg = eval_run.run_config(workdir)
  # qwix quantises the unrolled blocks: a scan_layers run's params load unrolled (models.scan).
  cfg.student.scan_layers = False
  act = precision.INT8_ACTS.get(act, act)
  if act not in quant.ACTS:
    raise ValueError(f"act={act!r}: choose symmetric or asymmetric")
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  policy = precision.parse_policy(cfg.student.policy, "student.policy")
  policy = dataclasses.replace(policy, int8="", fp8=False)  # the float student
  student = models.build(cfg.student, policy, "student")
  path = paths.join(workdir, checkpoint.FINAL_PARAMS)
  variables, _ = evaluate.load_variables(student, path, mesh, cfg.data.seq_len)
  qat = quant.qat_model(student, act)
  abstract = models.abstract_variables(qat, mesh, cfg.data.seq_len)[quant.COLLECTION]
  zeros = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding), abstract)
  batches = itertools.islice(data_lib.make_iterator(cfg, "train"), calibration_batches)
  stats = quant.calibrate(qat, {**variables, quant.COLLECTION: zeros}, batches, mesh)
  _, int8_vars = quant.quantize(qat, {**variables, quant.COLLECTION: stats}, act, cfg.data.seq_len)
  out = out or paths.join(workdir, PTQ_DIR)
  section = {k: cfg.student[k] for k in models.shape_keys(cfg.student)}
  quant.save(out, int8_vars, section, act)
  return out


# Reading int8 files back lives with the workdir code, which ``eval_run`` (below this job) uses.
load_int8 = workdir_lib.load_int8


def ptq_workdir(
  src_workdir: str,
  dst_workdir: str,
  calibration_batches: int = 8,
  act: str = "symmetric",
  devices=None,
) -> dict:
  """PTQ of ``src_workdir``'s student as a new workdir (see the module docstring).

  Written into ``dst_workdir + ".partial"`` and moved into place when complete
  (``paths.move_tree``: a rename, or in an object store a copy that ends by deleting the
  ``.partial``), so a killed call leaves no half workdir behind (a rerun starts over).

  Args:
    src_workdir: a finished float run (config.json, final_params/).
    dst_workdir: a new directory (an existing non-empty one is an error); it and
      ``src_workdir`` may be remote (``gs://``).
    calibration_batches: training batches that set the static activation scales.
    act: "symmetric" or "asymmetric" activations.
    devices: the devices of the run's mesh (default: all).
  Returns:
    The record written to ``dst_workdir/quantize.json``.
  """
  if paths.exists(dst_workdir) and (not paths.isdir(dst_workdir) or paths.listdir(dst_workdir)):
    raise JaxdistillError(f"{dst_workdir!r} exists and is not empty; pass a new directory")
  if calibration_batches < 1:
    raise JaxdistillError(f"calibration_batches must be >= 1, got {calibration_batches}")
  cfg = eval_run.run_config(src_workdir)
  policy = precision.parse_policy(cfg.student.policy, "student.policy")
  if policy.int8:
    raise JaxdistillError(
      f"{src_workdir!r} is already an int8 (c=int8) run: its int8 model is in its int8/"
    )
  if policy.fp8:
    raise JaxdistillError(f"{src_workdir!r} trains with c=fp8; quantise a float student")
  tmp = dst_workdir.rstrip("/") + ".partial"
  paths.rmtree(tmp, missing_ok=True)
  paths.makedirs(tmp)
  ptq(src_workdir, paths.join(tmp, workdir_lib.INT8_DIR), calibration_batches, act, devices)
  cfg.student.policy = str(dataclasses.replace(policy, int8=precision.INT8_ACTS.get(act, act)))
  cfg.student.init_from, cfg.student.init_layers = "", ""
  cfg.student.scan_layers = False  # an int8 model runs its blocks unrolled (see ptq)
  paths.write_text(
    paths.join(tmp, "config.json"), cfg.to_json_best_effort(indent=2, sort_keys=True)
  )
  tokenizer = paths.join(src_workdir, "tokenizer.json")
  if paths.isfile(tokenizer):
    paths.copy(tokenizer, paths.join(tmp, "tokenizer.json"))
  record = {
    "source": paths.abspath(src_workdir),
    "method": "ptq",
    "act": precision.INT8_ACTS.get(act, act),
    "calibration_batches": calibration_batches,
  }
  paths.write_text(paths.join(tmp, "quantize.json"), json.dumps(record, indent=2, sort_keys=True))
  paths.move_tree(tmp, dst_workdir)  # onto a new or empty dst_workdir (checked above)
  return record
