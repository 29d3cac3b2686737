"""The two layouts of a decoder's blocks, and the conversion between them.

Unrolled (``scan_layers=False``): one subtree per block, ``block_{i}``. Scanned
(``scan_layers=True``, ``transformer.Transformer._scanned``): one subtree ``blocks`` whose
leaves are the blocks' leaves stacked on a leading axis of L (logical name ``layers``).

``stack_blocks`` / ``unstack_blocks`` convert a tree either way, exactly (stacking and slicing
only). They work on any tree holding such params: plain arrays (jax or numpy), logically boxed
leaves (``nn.Partitioned``: the ``layers`` name is added / removed), abstract leaves
(``jax.ShapeDtypeStruct``, whose ``NamedSharding`` gains / loses a leading unsplit axis: restore
targets) and trees holding several params-shaped trees (``{"params": ...}``, optimizer states:
every dict holding block subtrees is converted). ``checkpoint.load_params`` and ``hf.load`` use
them so a model reads params saved in the other layout.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = "blocks"
LAYERS_AXIS = "layers"  # the logical name of the stacked axis (maps to no mesh axis)
_PREFIX = "block_"


def _block_index(key: Any) -> int | None:
  if isinstance(key, str) and key.startswith(_PREFIX) and key[len(_PREFIX) :].isdigit():
    return int(key[len(_PREFIX) :])
  return None


def is_unrolled(tree: Any) -> bool:
  """Whether ``tree`` is a dict holding ``block_{i}`` subtrees."""
  return isinstance(tree, Mapping) and any(_block_index(k) is not None for k in tree)


def is_scanned(tree: Any) -> bool:
  """Whether ``tree`` is a dict holding the stacked ``blocks`` subtree."""
  return isinstance(tree, Mapping) and BLOCKS in tree


def layout(tree: Any) -> str | None:
  """The layout ("scanned", "unrolled"; None: no blocks) of the first dict in ``tree`` holding
  blocks, searched top-down (a params tree, or ``{"params": ...}``)."""
  if is_scanned(tree):
    return "scanned"
  if is_unrolled(tree):
    return "unrolled"
  if isinstance(tree, Mapping):
    for value in tree.values():
      found = layout(value)
      if found:
        return found
  return None


def layout_of_paths(key_paths: Any) -> str | None:
  """``layout`` of a tree given only its leaves' key paths (e.g. a checkpoint's metadata)."""
  names = {getattr(k, "key", None) for key_path in key_paths for k in key_path}
  if BLOCKS in names:
    return "scanned"
  if any(_block_index(name) is not None for name in names):
    return "unrolled"
  return None


def _is_box(x: Any) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack(*leaves: Any) -> Any:
  first = leaves[0]
  if _is_box(first):
    value = _stack(*(leaf.value for leaf in leaves))
    return first.replace(value=value, names=(LAYERS_AXIS, *first.names))
  if isinstance(first, jax.ShapeDtypeStruct):
    sharding = first.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = jax.sharding.PartitionSpec(None, *sharding.spec)
      sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=sharding)
  if isinstance(first, np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _unstack(leaf: Any, n: int) -> list:
  if _is_box(leaf):
    names = leaf.names[1:] if leaf.names and leaf.names[0] == LAYERS_AXIS else leaf.names
    return [leaf.replace(value=v, names=names) for v in _unstack(leaf.value, n)]
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
      sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    return [jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)] * n
  return [leaf[i] for i in range(n)]


def _stack_one(params: Mapping, num_layers: int | None) -> dict:
  found = sorted(i for i in map(_block_index, params) if i is not None)
  n = len(found) if num_layers is None else num_layers
  if found != list(range(n)):
    raise ValueError(f"expected blocks block_0..block_{n - 1}, found {found}")
  blocks = [params[f"{_PREFIX}{i}"] for i in range(n)]
  out = {k: v for k, v in params.items() if _block_index(k) is None}
  out[BLOCKS] = jax.tree.map(_stack, *blocks, is_leaf=_is_box)
  return out


def _unstack_one(params: Mapping) -> dict:
  stacked = params[BLOCKS]
  leaves, treedef = jax.tree.flatten(stacked, is_leaf=_is_box)
  n = {(leaf.value if _is_box(leaf) else leaf).shape[0] for leaf in leaves}
  if len(n) != 1:
    raise ValueError(f"the stacked blocks' leading axes differ: {sorted(n)}")
  n = n.pop()
  per_leaf = [_unstack(leaf, n) for leaf in leaves]
  out = {k: v for k, v in params.items() if k != BLOCKS}
  for i in range(n):
    out[f"{_PREFIX}{i}"] = jax.tree.unflatten(treedef, [slices[i] for slices in per_leaf])
  return out


def _convert(tree: Any, test, fn) -> Any:
  if test(tree):
    return fn(tree)
  if isinstance(tree, Mapping):
    return {k: _convert(v, test, fn) for k, v in tree.items()}
  # Optimizer states: tuples / namedtuples of params-shaped trees.
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_convert(v, test, fn) for v in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_convert(v, test, fn) for v in tree)
  return tree


def stack_blocks(params: Any, num_layers: int | None = None) -> Any:
  """``params`` with every dict of ``block_{i}`` subtrees turned into one ``blocks`` subtree.

  Args:
    params: an unrolled params tree (or a tree holding such trees: variables, an optimizer
      state); leaves arrays, ``nn.Partitioned`` boxes or ``jax.ShapeDtypeStruct``.
    num_layers: L, checked against the blocks found (None: however many there are).
  Raises:
    ValueError: the blocks are not exactly block_0 .. block_{L-1}.
  """
  return _convert(params, is_unrolled, lambda p: _stack_one(p, num_layers))


def unstack_blocks(params: Any) -> Any:
  """``params`` with every ``blocks`` subtree split back into ``block_{i}`` subtrees (the
  inverse of ``stack_blocks``)."""
  return _convert(params, is_scanned, _unstack_one)


def to_layout(params: Any, scanned: bool) -> Any:
  """``params`` in the scanned (``scanned``) or unrolled layout, converted if needed."""
  found = layout(params)
  if found is None or (found == "scanned") == scanned:
    return params
  return stack_blocks(params) if scanned else unstack_blocks(params)
