"""Models: the decoder LM (transformer.py); HF import/export and encoders later."""

from typing import Any

from jaxdistill.errors import ConfigError
from jaxdistill.precision import Policy

MODEL_KEYS = (
  "vocab_size",
  "d_model",
  "num_layers",
  "num_heads",
  "d_ff",
  "max_len",
  "norm",
  "pos",
  "tie_embeddings",
  "activation",
)


def transformer_config(section: Any, policy: Policy, key: str):
  """TransformerConfig from a ``student`` / ``teacher`` config section.

  Args:
    section: the config section holding MODEL_KEYS.
    policy: the model's dtype policy.
    key: the section's name, used in errors.
  """
  from jaxdistill.models.transformer import TransformerConfig

  try:
    return TransformerConfig(
      **{k: section[k] for k in MODEL_KEYS},
      dtype=policy.compute_dtype,
      param_dtype=policy.param_dtype,
      output_dtype=policy.output_dtype,
      fp8=policy.fp8,
    )
  except (ValueError, TypeError) as e:
    raise ConfigError(key, str(e)) from None
