"""The model config: ``TransformerConfig``, the sizes and dtypes of a decoder or an encoder.

It holds no Flax module, so every model module (``transformer``, ``bert``, ``layers``), the Hugging
Face mapping and the callers above ``models/`` import it without importing each other.
``MODEL_KEYS`` are the keys of a ``student`` / ``teacher`` config section that describe the
model's shape; ``config_from_section`` turns such a section and a dtype policy into a config.
"""

import dataclasses
import numbers
from typing import Any, Sequence

import jax.numpy as jnp

from jaxdistill.errors import ConfigError
from jaxdistill.parallel.precision import Policy

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
  "head_size",
  "scan_layers",
)
# Keys that choose how the model runs, not what it computes: the same params (up to the blocks'
# layout, converted on load: ``models.scan``) give the same outputs whatever they hold. remat
# is no MODEL_KEY (it changes no param or checkpoint: any value resumes); scan_layers is (a
# checkpoint's optimizer state has its layout).
EXECUTION_KEYS = ("scan_layers", "remat")

# Keys newer than hand-written sections (plain dicts, older runs' config.json): their default.
_OPTIONAL_KEYS = ("head_size", "scan_layers")
_NORMS = ("rmsnorm", "layernorm")
_POSITIONS = ("rope", "learned")
_ACTIVATIONS = ("swiglu", "gelu", "gelu_erf")  # gelu: tanh approximation (GPT-2); gelu_erf: BERT
_BIASES = ("none", "qkv", "all")  # which projections carry a bias (qkv: Qwen2; all: GPT-2, BERT)
# Rematerialisation of each block in the backward pass: none (keep every activation), full
# (keep only the block's input, recompute the rest), dots (keep the outputs of the weight
# matmuls, recompute the rest: ``scan.remat_policy``).
REMATS = ("none", "full", "dots")


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters and precision policy of a ``Transformer``.

  ``dtype`` is the compute dtype (activations, matmuls), ``param_dtype`` the storage dtype of
  params, ``output_dtype`` the dtype of returned logits. ``fp8``: the ``EinsumDense`` projections
  run through Flax's ``Fp8Einsum`` (e4m3 forward, e5m2 gradients, delayed scaling from
  ``fp8_history``-long amax histories in the ``_overwrite_with_gradient`` collection); the
  vocabulary head stays in ``dtype``. ``head_dim`` (K) = ``head_size``, or d_model // num_heads
  when it is 0 (the usual); an explicit ``head_size`` lets H * K differ from D (a head-pruned
  model keeps its K and its RoPE frequencies). ``num_kv_heads``
  (0 = num_heads) < num_heads is grouped-query attention (key/value heads shared by
  num_heads // num_kv_heads query heads). ``bias``: "none", "qkv" (query/key/value) or "all"
  (every projection but the vocabulary head). ``encoder``: the model is the post-norm,
  bidirectional, mean-pooling ``bert.Encoder`` instead of the causal ``transformer.Transformer``
  (``models.module_for`` picks; same call and outputs, plus "embedding"). ``scan_layers``: the
  decoder's L blocks run under ``nn.scan``, their params stacked in one ``blocks`` subtree
  (leading axis L, logical name "layers"; ``models.scan`` converts to and from the unrolled
  ``block_{i}`` layout): one block is traced and compiled instead of L. ``remat``: none | full |
  dots, the per-block rematerialisation policy (``REMATS``). Neither changes the outputs.
  Invalid values raise ValueError naming the field.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  max_len: int
  norm: str = "rmsnorm"
  pos: str = "rope"
  tie_embeddings: bool = True
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  fp8: bool = False
  fp8_history: int = 1024
  norm_eps: float = 1e-6
  rope_base: float = 10000.0
  num_kv_heads: int = 0
  bias: str = "none"
  # A bidirectional BERT-style encoder (bert.Encoder) instead of a causal LM.
  encoder: bool = False
  type_vocab_size: int = 0  # encoder only: token-type embedding rows (0 = none)
  head_size: int = 0  # per-head width K; 0 = d_model // num_heads
  scan_layers: bool = False  # decoder blocks under nn.scan, params stacked in "blocks"
  remat: str = "none"  # per-block rematerialisation: none | full | dots

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not _is_int(self.head_size) or self.head_size < 0:
      raise ValueError(
        f"head_size must be an int >= 0 (0 = d_model // num_heads), got {self.head_size!r}"
      )
    if not self.head_size and self.d_model % self.num_heads:
      raise ValueError(
        f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}) "
        "unless head_size is set"
      )
    if not _is_int(self.num_kv_heads) or self.num_kv_heads < 0 or (self.num_heads % self.kv_heads):
      raise ValueError(
        f"num_kv_heads must be 0 or divide num_heads ({self.num_heads}), got {self.num_kv_heads!r}"
      )
    choices = (("norm", _NORMS), ("pos", _POSITIONS), ("activation", _ACTIVATIONS))
    for name, allowed in choices + (("bias", _BIASES), ("remat", REMATS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.pos == "rope" and self.head_dim % 2:
      raise ValueError(
        f"pos='rope' needs an even head_dim (head_size or d_model // num_heads), "
        f"got {self.head_dim}"
      )
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
    if not self.rope_base > 0:
      raise ValueError(f"rope_base must be > 0, got {self.rope_base!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers must be a bool, got {self.scan_layers!r}")
    if self.scan_layers and self.encoder:
      raise ValueError("scan_layers is supported by the decoder only, not encoder=True (BERT)")
    if not _is_int(self.type_vocab_size) or self.type_vocab_size < 0:
      raise ValueError(f"type_vocab_size must be an int >= 0, got {self.type_vocab_size!r}")

  @property
  def head_dim(self) -> int:
    """K: ``head_size``, or d_model // num_heads when it is 0."""
    return self.head_size or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (num_kv_heads, or num_heads when it is 0)."""
    return self.num_kv_heads or self.num_heads


def check_layers(name: str, layers: Sequence[int], upper: int) -> tuple[int, ...]:
  """``layers`` as a tuple, each an int in [0, upper].

  Args:
    name: the argument's name, for the error.
    layers: requested layer indices (hidden states, attention, q/k/v).
    upper: the largest valid index.
  Raises:
    ValueError: an index out of range or not an int.
  """
  layers = tuple(layers)
  for i in layers:
    if not _is_int(i) or not 0 <= i <= upper:
      raise ValueError(f"{name} index {i!r} out of range [0, {upper}]")
  return layers


def config_from_section(section: Any, policy: Policy, key: str) -> TransformerConfig:
  """TransformerConfig from a ``student`` / ``teacher`` config section.

  Args:
    section: the config section holding MODEL_KEYS.
    policy: the model's dtype policy.
    key: the section's name, used in errors.
  Raises:
    ConfigError: an invalid model key (named by ``key``).
  """
  try:
    return TransformerConfig(
      **{k: section[k] for k in MODEL_KEYS if k in section or k not in _OPTIONAL_KEYS},
      remat=section["remat"] if "remat" in section else "none",
      dtype=policy.compute_dtype,
      param_dtype=policy.param_dtype,
      output_dtype=policy.output_dtype,
      fp8=policy.fp8,
    )
  except (ValueError, TypeError) as e:
    field = str(e).split(" ", 1)[0]
    raise ConfigError(f"{key}.{field}" if field in EXECUTION_KEYS else key, str(e)) from None
