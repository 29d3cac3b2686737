"""Models: the Transformer (transformer.py; a BERT-style encoder mode in bert.py) and Hugging
Face import / export (hf.py, hf_export.py)."""

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
  "num_kv_heads",
  "bias",
  "norm_eps",
  "encoder",
  "type_vocab_size",
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
