"""Where the teacher's params live: logical-axis rules of its own (``teacher.rules``).

The student's rules (``sharding.LOGICAL_RULES``) suit a model that trains: its params, grads
and optimizer state split the same way. A teacher runs forward only, holds no gradients or
optimizer state and is often several times the student, so another layout may suit it better.
``teacher.rules`` names a preset, optionally followed by overrides of single param names:

  student     the student's table (the default): a teacher's layer is sharded like a
              student's of the same shape
  tensor      tensor parallelism: attention heads and MLP width (and image channels) over
              ``tensor``; the embedding table and every ``embed`` dimension replicated, so
              the forward gathers no weights, only activations
  fsdp        ZeRO-3-like: every ``embed`` dimension (image: input channels) over
              ``data`` x ``fsdp`` (all batch axes: with no optimizer state to keep in step,
              even pure data-parallel replicas can share the teacher's weights, gathered
              layer by layer in the forward); heads, MLP and vocabulary over ``tensor`` as
              the student's
  replicated  every param whole on every device (the baseline the others are measured by)

  e.g. "fsdp", "tensor,embed=fsdp", "vocab=none,embed=data+fsdp" (overrides on "student")

Only params' logical names are placed: the teacher's activations keep the student's rules, so
its outputs (logits, hidden states, attention maps) arrive laid out as the loss expects, and
the compiler inserts the gathers the params need inside the one jitted step.
"""

import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from jaxdistill.errors import ConfigError
from jaxdistill.parallel import sharding as sharding_lib

KEY = "teacher.rules"
BATCH = sharding_lib.BATCH_AXES
# The logical names params carry (models/layers.py, cnn.py, resnet.py); the act_* names
# belong to activations and stay the student's.
PARAM_NAMES = ("vocab", "embed", "heads", "kv", "mlp", "conv_in", "conv_out", "fc_in", "fc_out")
PARAM_NAMES += ("classes", "layers")

# preset -> {param name: mesh axes}, applied over the student's table.
PRESETS = {
  "student": {},
  "tensor": {"vocab": None, "embed": None},
  "fsdp": {"embed": BATCH, "conv_in": BATCH, "fc_in": BATCH},
  "replicated": dict.fromkeys(PARAM_NAMES),
}


def _axes(name: str, value: str, key: str) -> str | tuple[str, ...] | None:
  """``"none"`` / ``""`` -> None, ``"tensor"`` -> "tensor", ``"data+fsdp"`` -> a tuple."""
  if value.strip().lower() in ("", "none"):
    return None
  axes = tuple(a.strip() for a in value.split("+"))
  for a in axes:
    if a not in sharding_lib.MESH_AXES:
      raise ConfigError(
        key, f"{name}={value!r}: {a!r} is not a mesh axis; use {sharding_lib.MESH_AXES} or none"
      )
  if len(set(axes)) != len(axes):
    raise ConfigError(key, f"{name}={value!r} names a mesh axis twice")
  return axes[0] if len(axes) == 1 else axes


def parse_rules(spec: str, key: str = KEY) -> sharding_lib.Rules | None:
  """The rules table ``spec`` describes (see the module docstring).

  Args:
    spec: "<preset>[,name=axes...]" or "name=axes,..." (on "student"); axes: a mesh axis,
      several joined by "+", or "none".
    key: the config key, for messages.

  Returns:
    None for the student's own table unchanged ("student", ""), so a default run builds
    exactly the program it always did; else a full table (``sharding.Rules``): the student's
    with the preset's and the overrides' param names replaced.

  Raises:
    ConfigError: an unknown preset, logical name or mesh axis, or an activation name.
  """
  if not isinstance(spec, str):
    raise ConfigError(
      key, f"must be a string (a preset {tuple(PRESETS)} [+ overrides]), got {spec!r}"
    )
  items = [item.strip() for item in spec.split(",") if item.strip()]
  preset = "student"
  if items and "=" not in items[0]:
    preset = items.pop(0)
  if preset not in PRESETS:
    raise ConfigError(key, f"unknown preset {preset!r}; choose from {tuple(PRESETS)}")
  table = dict(PRESETS[preset])
  for item in items:
    name, sep, value = (part.strip() for part in item.partition("="))
    if not sep:
      raise ConfigError(key, f"{item!r}: only the first item may be a preset; write name=axes")
    if name not in PARAM_NAMES:
      act = name.startswith("act_")
      why = "an activation name (activations keep the student's rules)" if act else "unknown"
      raise ConfigError(key, f"{name!r} is {why}; param names: {PARAM_NAMES}")
    table[name] = _axes(name, value, key)
  if not table:
    return None
  return tuple((name, table.get(name, axes)) for name, axes in sharding_lib.LOGICAL_RULES)


def check_divisible(
  rules: sharding_lib.Rules, abstract_boxed: Any, mesh_shape: dict, key: str = KEY
) -> None:
  """Every param dimension the rules split must divide by the devices it is split over.

  Args:
    rules: a rules table (``parse_rules``).
    abstract_boxed: the model's variables, boxed with logical names (``jax.eval_shape`` of
      ``models.init_variables``).
    mesh_shape: mesh axis -> size.
    key: the config key, for messages.

  Raises:
    ConfigError: naming the first param and dimension that does not split.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shapes = nn.unbox(abstract_boxed)
  is_spec = lambda x: isinstance(x, P)  # noqa: E731
  flat_specs = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)[0]
  flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, leaf), spec in zip(flat_shapes, flat_specs):
    mesh_axes = nn.logical_to_mesh_axes(tuple(spec), rules)
    for dim, (size, name, axes) in enumerate(zip(leaf.shape, spec, mesh_axes)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      n = math.prod(mesh_shape[a] for a in axes)
      if size % n:
        raise ConfigError(
          key,
          f"splits {jax.tree_util.keystr(path)} dim {dim} ({name}={size}) over "
          f"{'*'.join(axes)}={n} devices, which does not divide it; choose another preset "
          f"or override {name}=none",
        )
