"""A finished run's workdir as a model: read its student back, export it to Hugging Face.

A ``jaxdistill train`` workdir holds ``config.json`` (the run's resolved config),
``final_params/`` (the student's params) and usually ``tokenizer.json``. ``load_workdir`` reads
the student back onto one device, for ``jaxdistill embed`` and ``jaxdistill export`` (which
writes it with ``models.hf_export.export``). This sits above ``models/`` because it needs the
config defaults (keys added since the run was made) and the checkpoint reader.
"""

import json
import os
from typing import Any

import flax.linen as nn
import jax

from jaxdistill import checkpoint, config, models, precision
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import hf, hf_export


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
  cfg_path = os.path.join(workdir, "config.json")
  params_dir = os.path.join(workdir, checkpoint.FINAL_PARAMS)
  if not os.path.isfile(cfg_path) or not os.path.isdir(params_dir):
    raise JaxdistillError(
      f"{workdir!r} is not a finished jaxdistill run (config.json and {checkpoint.FINAL_PARAMS}/)"
    )
  with open(cfg_path) as f:
    # Keys added since that run was made take their defaults.
    section = dict(config.default_config().student.to_dict(), **json.load(f)["student"])
  policy = precision.parse_policy("p=f32,c=f32,o=f32", "student.policy")
  hfm = hf_export.hf_model_for(models.config_from_section(section, policy, "student"))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
    nn.unbox(hf.abstract_params(hfm.module(), hfm.config.max_len)),
  )
  return hfm, checkpoint.load_params(params_dir, target)
