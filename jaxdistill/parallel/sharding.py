"""The device mesh and the ONE table that maps logical axis names onto it.

Models speak only logical names (``embed``, ``vocab``, ``act_batch``...); this
module decides where they live. Mesh axes:

  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params, grads and optimizer state sharded
  tensor  tensor parallelism (heads, MLP width and vocabulary split)

Batches are split over ``data`` x ``fsdp``. By default teacher and student use the same
rules, so a teacher's layers are sharded like a student's of the same shape; ``teacher.rules``
gives the teacher's params a table of their own (``placement``), passed as ``rules`` below.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistill.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# A rules table: (logical name, mesh axis | tuple of mesh axes | None) pairs.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None for replicated).
LOGICAL_RULES = (
  # params
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  # the stacked axis of scanned blocks (models/scan.py): every device holds all L layers
  ("layers", None),
  # activations
  ("act_batch", BATCH_AXES),
  ("act_length", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv", None),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
  # image classifiers (models/cnn.py, resnet.py): channels split like MLP width, classes whole
  ("conv_in", None),
  ("conv_out", "tensor"),
  ("fc_in", None),
  ("fc_out", "tensor"),
  ("classes", None),
  ("act_height", None),
  ("act_width", None),
  ("act_channels", "tensor"),
  ("act_features", "tensor"),
  ("act_classes", None),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves the ``mesh`` config section into concrete axis sizes.

  Args:
    mesh_cfg: has int fields ``data``, ``fsdp``, ``tensor``; at most one may
      be -1, meaning "all remaining devices".
    num_devices: devices to fill.

  Returns:
    (data, fsdp, tensor) whose product is num_devices.

  Raises:
    ConfigError: the sizes cannot fill the devices exactly.
  """
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(
      "mesh",
      f"sizes {dict(zip(MESH_AXES, sizes))} are invalid: "
      "use positive sizes and at most one -1 ('the rest')",
    )
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
        f"mesh.{free[0]}",
        f"-1 cannot fill {num_devices} devices when the other axes multiply to {fixed}",
      )
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      "mesh",
      f"data*fsdp*tensor = {'*'.join(map(str, sizes))} = "
      f"{math.prod(sizes)} but there are {num_devices} devices; "
      "set one axis to -1 or make the product match",
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh from the config over ``devices``."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_sharding(specs: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """Maps a tree of logical PartitionSpecs onto NamedShardings of ``mesh`` by ``rules``
  (None: ``LOGICAL_RULES``)."""
  return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_RULES if rules is None else rules)


def shardings_of(abstract_boxed_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
  """NamedShardings for a tree whose leaves may be ``nn.Partitioned`` boxes.

  Args:
    abstract_boxed_tree: e.g. ``jax.eval_shape(model.init, ...)``; unboxed
      leaves are replicated.
    mesh: the mesh.
    rules: a rules table like ``LOGICAL_RULES`` (None: that one), e.g. a teacher's own
      (``placement.parse_rules``).

  Returns:
    The tree of NamedSharding, with the boxes removed (matches ``nn.unbox``).
  """
  return logical_to_sharding(nn.get_partition_spec(abstract_boxed_tree), mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [B, ...] batch arrays: rows split over data x fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def axis_size(mesh: Mesh, *axes: str) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def shard_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's rows into global arrays sharded over data x fsdp.

  Works unchanged with one or many processes: each process passes only its own
  rows (``jax.make_array_from_process_local_data``).
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def logical_shards(logical_name: str, size: int) -> int:
  """How many shards the active rules split a logical axis into, for an axis of ``size``.

  Reads the mesh and rules in effect while tracing (``rules_context``).

  Args:
    logical_name: a logical axis name of ``LOGICAL_RULES`` (e.g. ``act_batch``, ``vocab``).
    size: the length of the axis to split.

  Returns:
    The product of the mesh axes it maps to; 1 without a mesh or rules, or when ``size`` does
    not divide evenly (the array then stays unsplit along it).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not nn.get_logical_axis_rules():
    return 1
  axes = nn.logical_to_mesh_axes((logical_name,))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  shards = math.prod(mesh.shape[a] for a in axes)
  return shards if size % shards == 0 else 1


def rules_context(mesh: Mesh, rules: Rules | None = None):
  """Context under which models' logical constraints shard on ``mesh`` by ``rules`` (None:
  ``LOGICAL_RULES``).

  Must be active while a jitted function is traced (its first call).
  """
  import contextlib

  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES if rules is None else rules))
  return stack
