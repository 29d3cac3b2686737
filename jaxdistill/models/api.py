"""The one way callers make and run a model: build it, apply it to a batch, create its variables.

  build(section, policy, key)          a config section -> the Linen module (decoder, encoder or,
                                       when ``arch`` is not "transformer", an image classifier)
  apply(model, variables, batch, ...)  one forward pass on a batch -> the requested outputs
  init_variables(model, rng, seq_len)  random variables, boxed with logical axis names (traceable)
  variable_shardings / abstract_variables / create_variables
                                       the same on a mesh: shardings, restore targets, arrays
  is_vision / shape_keys              image classifiers: which models are, the config keys that
                                       describe a section's model (FLOPs: ``flops.py``)

``variables`` is Flax's dict of collections: {"params": ..., plus any other collection the model
keeps, e.g. an FP8 model's scales and amax histories under "_overwrite_with_gradient"}. The
shardings come from the params' logical axis names through ``sharding``'s one rules table, so a
model never names a mesh axis.

Batch: a dict of [B, T] arrays; a model reads ``inputs`` (token ids) and, when present,
``segment_ids`` (document ids of packed rows, 0 = padding) and ``positions``. An image classifier
reads only ``inputs`` [B, H, W, C] (normalised float images) and keeps its BatchNorm statistics
in the "batch_stats" collection.
"""

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.errors import ConfigError
from jaxdistill.models import bert, cnn, resnet, transformer
from jaxdistill.models.transformer_config import MODEL_KEYS, TransformerConfig, config_from_section
from jaxdistill.models.vision_config import (
  ARCHS,
  VISION_KEYS,
  VisionConfig,
  vision_config_from_section,
)
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.parallel.precision import Policy

_VISION_MODULES = {"cnn": cnn.SimpleCNN, "resnet": resnet.ResNet, "wrn": resnet.WideResNet}
# Transformer request keywords and the values a vision model accepts for them (the defaults).
_TRANSFORMER_REQUEST = {
  "hidden_layers": (),
  "attn_layers": (),
  "qkv_layers": (),
  "return_logits": True,
}


def module_for(config: TransformerConfig | VisionConfig) -> nn.Module:
  """The Linen module of ``config``.

  A ``TransformerConfig`` gives ``bert.Encoder`` if ``config.encoder``, else the decoder; a
  ``VisionConfig`` gives ``cnn.SimpleCNN``, ``resnet.ResNet`` or ``resnet.WideResNet`` by arch.
  """
  if isinstance(config, VisionConfig):
    return _VISION_MODULES[config.arch](config)
  return bert.Encoder(config) if config.encoder else transformer.Transformer(config)


def _arch(section: Any) -> str:
  """``section``'s arch; a section without the key (older configs, plain dicts) is a transformer."""
  return section["arch"] if "arch" in section else "transformer"


def is_vision(model_or_config: Any) -> bool:
  """Whether a module, config or config section is an image classifier."""
  if isinstance(model_or_config, nn.Module):
    return isinstance(getattr(model_or_config, "config", None), VisionConfig)
  if isinstance(model_or_config, (VisionConfig, TransformerConfig)):
    return isinstance(model_or_config, VisionConfig)
  return _arch(model_or_config) != "transformer"


def shape_keys(section: Any) -> tuple[str, ...]:
  """The keys of ``section`` that describe its model: VISION_KEYS or the transformer MODEL_KEYS."""
  return VISION_KEYS if is_vision(section) else MODEL_KEYS


def build(section: Any, policy: Policy, key: str) -> nn.Module:
  """The model of a ``student`` / ``teacher`` config section (no variables are created).

  Args:
    section: the config section holding ``MODEL_KEYS`` (arch "transformer" or absent) or
      ``VISION_KEYS`` (arch "cnn", "resnet" or "wrn").
    policy: the model's dtype policy (``precision.parse_policy`` of ``section.policy``).
    key: the section's name ("student" / "teacher"), used in errors.
  Returns:
    The Linen module (``transformer.Transformer``, ``bert.Encoder``, ``cnn.SimpleCNN``,
    ``resnet.ResNet`` or ``resnet.WideResNet``).
  Raises:
    ConfigError: an invalid model key, named "{key}.<field>" for an image classifier;
      "{key}.policy" for c=fp8 with an image classifier, or c=int8 for a teacher.
  """
  if policy.int8:  # the float module, rewritten by qwix (models.quant)
    from jaxdistill.models import quant

    if key == "teacher":
      raise ConfigError(
        "teacher.policy",
        "c=int8 trains a student quantisation-aware; a frozen teacher runs in float (or c=fp8)",
      )
    return quant.qat_model(build(section, dataclasses.replace(policy, int8=""), key), policy.int8)
  arch = _arch(section)
  if arch == "transformer":
    return module_for(config_from_section(section, policy, key))
  if arch not in ARCHS:
    raise ConfigError(f"{key}.arch", f"unknown {arch!r}; choose from {('transformer',) + ARCHS}")
  return module_for(vision_config_from_section(section, policy, key))


def apply(
  model: nn.Module, variables: dict, batch: dict, train: bool = False, **request: Any
) -> dict:
  """One forward pass of ``model`` on ``batch``.

  Args:
    model: a module from ``build`` / ``module_for``.
    variables: {"params": ..., other collections (an image classifier's "batch_stats")},
      unboxed (sharded or not).
    batch: "inputs" [B, T] int token ids, optional "segment_ids" [B, T] and "positions" [B, T];
      for an image classifier "inputs" [B, H, W, C] float images (nothing else is read).
    train: image classifiers: BatchNorm by the batch's statistics, returning the updated ones
      (when ``variables`` holds "batch_stats"); False: by the stored ones. Transformers have no
      train mode: the flag is ignored.
    **request: what to return besides the output. Transformers: hidden_layers, attn_layers,
      qkv_layers, return_logits (see ``transformer.Transformer.__call__``). Image classifiers:
      feature_stages, return_pre_logits (see ``resnet.ResNet.__call__``); the transformer
      keywords are accepted only empty / at their defaults.
  Returns:
    The model's output dict: "logits" [B, T, V] (or "final_hidden" [B, T, D] and "head"
    [D, V]), an encoder's "embedding" [B, D], and the requested intermediates. An image
    classifier's: "logits" [B, N], "features" {stage: [B, H_s, W_s, C_s]} and "pre_logits"
    [B, D] when requested, and with ``train`` and BatchNorm "batch_stats": the updated statistics.
  """
  if is_vision(model):
    return _apply_vision(model, variables, batch, train, request)
  return model.apply(
    variables,
    batch["inputs"],
    segment_ids_BxT=batch.get("segment_ids"),
    positions_BxT=batch.get("positions"),
    **request,
  )


def _apply_vision(model: nn.Module, variables: dict, batch: dict, train: bool, request: dict):
  """``apply`` of an image classifier (see there)."""
  request = dict(request)
  for name, default in _TRANSFORMER_REQUEST.items():
    value = request.pop(name, default)
    if (tuple(value) if name != "return_logits" else value) != default:
      raise ValueError(f"{name}={value!r} is a transformer request; an image classifier has none")
  if train and "batch_stats" in variables:
    out, updates = model.apply(
      variables, batch["inputs"], train=True, mutable=["batch_stats"], **request
    )
    return dict(out, batch_stats=updates["batch_stats"])
  return model.apply(variables, batch["inputs"], train=train, **request)


def init_variables(model: nn.Module, rng: jax.Array, seq_len: int) -> dict:
  """Random variables of ``model``, boxed with their logical axis names; pure and traceable.

  Args:
    model: the module.
    rng: PRNG key.
    seq_len: T of the dummy [1, T] input the shapes are traced with (<= max_len); an image
      classifier ignores it (its dummy input is [1, image_size, image_size, image_channels]).
  Returns:
    {"params": ..., other collections}; ``nn.unbox`` gives the arrays.
  """
  if is_vision(model):
    cfg = model.config
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.image_channels), cfg.dtype)
    return model.init(rng, images)
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))


def variable_shardings(
  model: nn.Module, mesh: jax.sharding.Mesh, seq_len: int, rules: Any = None
) -> dict:
  """The NamedShardings of all of ``model``'s variables on ``mesh``, without creating them.

  Args:
    model: the module.
    mesh: the device mesh.
    seq_len: T of the dummy input (shapes do not depend on it).
    rules: the rules table (None: ``sharding.LOGICAL_RULES``; a teacher's own: ``placement``).
  Returns:
    {"params": ..., other collections}, unboxed: the logical names mapped by the rules table.
  """
  abstract = jax.eval_shape(lambda r: init_variables(model, r, seq_len), jax.random.key(0))
  return sharding_lib.shardings_of(abstract, mesh, rules)


def abstract_variables(
  model: nn.Module, mesh: jax.sharding.Mesh, seq_len: int, rules: Any = None
) -> dict:
  """``model``'s variables as ShapeDtypeStructs in their shardings: a restore target.

  Nothing is allocated; ``checkpoint.load_params(path, abstract_variables(...)["params"])``
  reads each array straight into its shards.

  Args:
    model, mesh, seq_len, rules: as ``variable_shardings``.
  Returns:
    {"params": ..., other collections} of unboxed ``jax.ShapeDtypeStruct`` with ``sharding``.
  """
  abstract = jax.eval_shape(lambda r: init_variables(model, r, seq_len), jax.random.key(0))
  shardings = sharding_lib.shardings_of(abstract, mesh, rules)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
  )


def create_variables(
  model: nn.Module,
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
  seq_len: int,
  collections: Sequence[str] | None = None,
  rules: Any = None,
) -> tuple[dict, dict]:
  """Random variables of ``model`` created directly in their shardings (no host copy).

  Args:
    model: the module.
    rng: PRNG key.
    mesh: the device mesh.
    seq_len: T of the dummy input.
    collections: only these collections (e.g. ("params",)); None: all.
    rules: the rules table (None: ``sharding.LOGICAL_RULES``; a teacher's own: ``placement``).
  Returns:
    (variables, shardings): unboxed arrays and their NamedShardings, both {collection: tree}.
  """

  def init_fn(r):
    variables = init_variables(model, r, seq_len)
    return {c: variables[c] for c in collections} if collections is not None else variables

  shardings = sharding_lib.shardings_of(jax.eval_shape(init_fn, rng), mesh, rules)
  with sharding_lib.rules_context(mesh, rules):
    variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return variables, shardings
