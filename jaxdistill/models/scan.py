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

How a block runs: ``ScanBody`` is the scan's body; ``block_class`` wraps a block in
``nn.remat`` per ``config.remat`` (``remat_policy``), scanned or not.
"""

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.models import layers
from jaxdistill.models.transformer_config import TransformerConfig

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


def read_layout(stored_paths: Any, target: Any) -> tuple[Any, Any]:
  """How to restore ``target`` (abstract leaves with shardings) from a checkpoint whose leaves
  have the key paths ``stored_paths``: (what to restore, a function of the restored tree giving
  ``target``'s layout). Blocks saved in the other layout are read in theirs, then converted
  (jitted into ``target``'s shardings; for a moment both copies exist); else (target, identity).
  """
  saved, wanted = layout_of_paths(stored_paths), layout(target)
  if not saved or not wanted or saved == wanted:
    return target, lambda tree: tree
  shardings = jax.tree.map(lambda a: a.sharding, target)
  convert = jax.jit(lambda tree: to_layout(tree, wanted == "scanned"), out_shardings=shardings)
  return to_layout(target, saved == "scanned"), convert


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


def remat_policy(remat: str):
  """The ``jax.checkpoint`` policy of ``config.remat`` "full" (None: save nothing) or "dots".

  "dots" is ``checkpoint_dots_with_no_batch_dims``: it saves the outputs of the matmuls
  against weights (q/k/v/out projections and the MLP, dot_generals without batch dims: the
  FLOPs worth keeping) and recomputes everything else, including attention's scores and
  probabilities (batched over B and H, [B, H, T, S]: the quadratic memory), which
  ``dots_saveable`` would keep.
  """
  return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if remat == "dots" else None


class ScanBody(layers.Block):
  """``layers.Block`` as an ``nn.scan`` body: returns (x_BxTxD, {name: output for name in
  emit}), names from "hidden" (x_BxTxD), "attn", "qkv", "cache", so the scan stacks only the
  per-layer outputs a caller asked for. Its params are the Block's."""

  emit: tuple[str, ...] = ()

  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache=None, cache_index_B=None):
    x_BxTxD, probs, qkv, cache = super().__call__(
      x_BxTxD, positions_BxT, mask_Bx1xTxS, cache, cache_index_B
    )
    outputs = {"hidden": x_BxTxD, "attn": probs, "qkv": qkv, "cache": cache}
    return x_BxTxD, {name: outputs[name] for name in self.emit}


def block_class(config: TransformerConfig, scanned: bool, cls: type = None) -> type:
  """``cls`` (default ``ScanBody`` if ``scanned``, else ``layers.Block``) wrapped in
  ``nn.remat`` per ``config.remat`` (unchanged for "none"). Inside ``nn.scan`` CSE cannot
  merge the recomputation into the forward pass (the loop body is a boundary), so
  ``prevent_cse`` is off there (cheaper); on elsewhere."""
  cls = cls or (ScanBody if scanned else layers.Block)
  if config.remat == "none":
    return cls
  return nn.remat(cls, policy=remat_policy(config.remat), prevent_cse=not scanned)
