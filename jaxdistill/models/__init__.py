"""Models: the bottom layer that makes and runs every model (it imports nothing above it).

  transformer_config.py  TransformerConfig (sizes, dtypes) and MODEL_KEYS, its config keys
  layers.py       norms, RoPE, attention, MLP, blocks, the FP8-capable EinsumDense
  transformer.py  the decoder-only causal LM (Transformer) and its parameter count
  bert.py         the BERT-style encoder (Encoder) with mean pooling
  vision_config.py  VisionConfig (image classifiers' shape, dtypes) and VISION_KEYS
  cnn.py          the classic CIFAR CNN (SimpleCNN) and the conv / dense / BatchNorm layers
  resnet.py       CIFAR ResNet-depth (ResNet) and WRN-depth-k (WideResNet), with BatchNorm
  api.py          build / apply / init_variables / abstract_variables: how callers use a model
  flops.py        model FLOPs per token / image / distillation step (StepFlops, step_flops)
  fp8.py          static FP8 scales of a frozen model (calibrate)
  quant.py        int8 through qwix: QAT modules, static activation scales, PTQ, int8 files
  scan.py         the blocks' two layouts (unrolled block_{i} / scanned "blocks"), converted
  surgery.py      students made from a teacher's params (select_layers, init_from_teacher)
  hf.py           Hugging Face checkpoints -> models (load, read_config, param_map)
  hf_maps.py      which Hugging Face tensor each param comes from, per architecture
  hf_export.py    models -> Hugging Face directories (export)

The names callers need are re-exported here: ``models.build(section, policy, key)``,
``models.apply(model, variables, batch, train=False, **request)``,
``models.abstract_variables(...)``. ``count_params`` counts any param tree (transformer or image
classifier).
"""

from jaxdistill.models.api import (
  abstract_variables,
  apply,
  build,
  create_variables,
  init_variables,
  is_vision,
  module_for,
  shape_keys,
  variable_shardings,
)
from jaxdistill.models.flops import StepFlops, flops_per_example, flops_per_token, step_flops
from jaxdistill.models.transformer import count_params
from jaxdistill.models.transformer_config import (
  EXECUTION_KEYS,
  MODEL_KEYS,
  REMATS,
  TransformerConfig,
  config_from_section,
)
from jaxdistill.models.vision_config import (
  VISION_KEYS,
  VisionConfig,
  vision_config_from_section,
)

__all__ = [
  "EXECUTION_KEYS",
  "MODEL_KEYS",
  "REMATS",
  "StepFlops",
  "TransformerConfig",
  "VISION_KEYS",
  "VisionConfig",
  "abstract_variables",
  "apply",
  "build",
  "config_from_section",
  "count_params",
  "create_variables",
  "flops_per_example",
  "flops_per_token",
  "init_variables",
  "is_vision",
  "module_for",
  "shape_keys",
  "step_flops",
  "variable_shardings",
  "vision_config_from_section",
]
