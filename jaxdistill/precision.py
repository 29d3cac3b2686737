"""Dtype policies: which dtype params are stored in, compute runs in, outputs leave in.

A policy is written compactly in the config, in the style of DeepMind's jmp:
``"p=f32,c=bf16,o=f32"`` (params / compute / output). Missing parts default to
``p=f32``, ``c=p`` and ``o=c``. Whatever the policy, softmaxes, logsumexps and
losses are computed in float32 (the losses cast their inputs).

The teacher and the student each have their own policy (``teacher.policy``,
``student.policy``): a frozen teacher only runs forward, so it is the cheapest
place for low precision.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxdistill.errors import ConfigError

DTYPES = {
  "f32": jnp.float32,
  "float32": jnp.float32,
  "bf16": jnp.bfloat16,
  "bfloat16": jnp.bfloat16,
  "f16": jnp.float16,
  "float16": jnp.float16,
}


@dataclasses.dataclass(frozen=True)
class Policy:
  """Param, compute and output dtypes of one model."""

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32

  def __str__(self) -> str:
    name = lambda d: jnp.dtype(d).name
    return f"p={name(self.param_dtype)},c={name(self.compute_dtype)},o={name(self.output_dtype)}"


def parse_policy(spec: str, key: str = "policy") -> Policy:
  """Parses ``"p=f32,c=bf16,o=f32"`` into a Policy.

  Args:
    spec: comma-separated ``p=``, ``c=``, ``o=`` parts with dtypes from
      ``f32``, ``bf16``, ``f16`` (long names accepted).
    key: the config key the spec came from, named in errors.

  Returns:
    The Policy.

  Raises:
    ConfigError: unknown part or dtype.
  """
  parts = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in ("p", "c", "o"):
      raise ConfigError(
        key,
        f"bad part {item!r} in {spec!r}; write e.g. "
        "'p=f32,c=bf16,o=f32' (p=params, c=compute, o=output)",
      )
    if value not in DTYPES:
      raise ConfigError(
        key, f"unknown dtype {value!r} in {spec!r}; choose from {sorted(set(DTYPES))}"
      )
    parts[name] = DTYPES[value]
  param = parts.get("p", jnp.float32)
  compute = parts.get("c", param)
  return Policy(param, compute, parts.get("o", compute))


def check_trainable(policy: Policy, key: str) -> None:
  """Rejects policies a trained model cannot use yet.

  float16 gradients underflow without dynamic loss scaling, which jaxdistill
  does not implement yet; bf16 has float32's exponent range and needs none.
  """
  if jnp.float16 in (policy.param_dtype, policy.compute_dtype):
    raise ConfigError(
      key,
      "float16 training needs dynamic loss scaling, which "
      "is not implemented yet; use bf16 (e.g. 'p=f32,c=bf16,o=f32')",
    )
