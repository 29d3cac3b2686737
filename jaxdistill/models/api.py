"""The one way callers make and run a model: build it, apply it to a batch, create its variables.

  build(section, policy, key)          a config section -> the Linen module (decoder or encoder)
  apply(model, variables, batch, ...)  one forward pass on a batch -> the requested outputs
  init_variables(model, rng, seq_len)  random variables, boxed with logical axis names (traceable)
  variable_shardings / abstract_variables / create_variables
                                       the same on a mesh: shardings, restore targets, arrays

``variables`` is Flax's dict of collections: {"params": ..., plus any other collection the model
keeps, e.g. an FP8 model's scales and amax histories under "_overwrite_with_gradient"}. The
shardings come from the params' logical axis names through ``sharding``'s one rules table, so a
model never names a mesh axis.

Batch: a dict of [B, T] arrays; a model reads ``inputs`` (token ids) and, when present,
``segment_ids`` (document ids of packed rows, 0 = padding) and ``positions``.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill import sharding as sharding_lib
from jaxdistill.models import bert, transformer
from jaxdistill.models.config import TransformerConfig, config_from_section
from jaxdistill.precision import Policy


def module_for(config: TransformerConfig) -> nn.Module:
  """The Linen module of ``config``: ``bert.Encoder`` if ``config.encoder``, else the decoder."""
  return bert.Encoder(config) if config.encoder else transformer.Transformer(config)


def build(section: Any, policy: Policy, key: str) -> nn.Module:
  """The model of a ``student`` / ``teacher`` config section (no variables are created).

  Args:
    section: the config section holding ``MODEL_KEYS``.
    policy: the model's dtype policy (``precision.parse_policy`` of ``section.policy``).
    key: the section's name ("student" / "teacher"), used in errors.
  Returns:
    The Linen module (``transformer.Transformer`` or ``bert.Encoder``).
  Raises:
    ConfigError: an invalid model key.
  """
  return module_for(config_from_section(section, policy, key))


def apply(model: nn.Module, variables: dict, batch: dict, **request: Any) -> dict:
  """One forward pass of ``model`` on ``batch``.

  Args:
    model: a module from ``build`` / ``module_for``.
    variables: {"params": ..., other collections}, unboxed (sharded or not).
    batch: "inputs" [B, T] int token ids; optional "segment_ids" [B, T] and "positions" [B, T].
    **request: what to return besides the output: hidden_layers, attn_layers, qkv_layers,
      return_logits (see ``transformer.Transformer.__call__``).
  Returns:
    The model's output dict: "logits" [B, T, V] (or "final_hidden" [B, T, D] and "head"
    [D, V]), an encoder's "embedding" [B, D], and the requested intermediates.
  """
  return model.apply(
    variables,
    batch["inputs"],
    segment_ids_BxT=batch.get("segment_ids"),
    positions_BxT=batch.get("positions"),
    **request,
  )


def init_variables(model: nn.Module, rng: jax.Array, seq_len: int) -> dict:
  """Random variables of ``model``, boxed with their logical axis names; pure and traceable.

  Args:
    model: the module.
    rng: PRNG key.
    seq_len: T of the dummy [1, T] input the shapes are traced with (<= max_len).
  Returns:
    {"params": ..., other collections}; ``nn.unbox`` gives the arrays.
  """
  return model.init(rng, jnp.zeros((1, seq_len), jnp.int32))


def variable_shardings(model: nn.Module, mesh: jax.sharding.Mesh, seq_len: int) -> dict:
  """The NamedShardings of all of ``model``'s variables on ``mesh``, without creating them.

  Args:
    model: the module.
    mesh: the device mesh.
    seq_len: T of the dummy input (shapes do not depend on it).
  Returns:
    {"params": ..., other collections}, unboxed: the logical names mapped by the rules table.
  """
  abstract = jax.eval_shape(lambda r: init_variables(model, r, seq_len), jax.random.key(0))
  return sharding_lib.shardings_of(abstract, mesh)


def abstract_variables(model: nn.Module, mesh: jax.sharding.Mesh, seq_len: int) -> dict:
  """``model``'s variables as ShapeDtypeStructs in their shardings: a restore target.

  Nothing is allocated; ``checkpoint.load_params(path, abstract_variables(...)["params"])``
  reads each array straight into its shards.

  Args:
    model, mesh, seq_len: as ``variable_shardings``.
  Returns:
    {"params": ..., other collections} of unboxed ``jax.ShapeDtypeStruct`` with ``sharding``.
  """
  abstract = jax.eval_shape(lambda r: init_variables(model, r, seq_len), jax.random.key(0))
  shardings = sharding_lib.shardings_of(abstract, mesh)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), shardings
  )


def create_variables(
  model: nn.Module,
  rng: jax.Array,
  mesh: jax.sharding.Mesh,
  seq_len: int,
  collections: Sequence[str] | None = None,
) -> tuple[dict, dict]:
  """Random variables of ``model`` created directly in their shardings (no host copy).

  Args:
    model: the module.
    rng: PRNG key.
    mesh: the device mesh.
    seq_len: T of the dummy input.
    collections: only these collections (e.g. ("params",)); None: all.
  Returns:
    (variables, shardings): unboxed arrays and their NamedShardings, both {collection: tree}.
  """

  def init_fn(r):
    variables = init_variables(model, r, seq_len)
    return {c: variables[c] for c in collections} if collections is not None else variables

  shardings = sharding_lib.shardings_of(jax.eval_shape(init_fn, rng), mesh)
  with sharding_lib.rules_context(mesh):
    variables = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
  return variables, shardings
