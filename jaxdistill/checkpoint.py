"""Saving and loading params with Orbax.

For now this holds the final-params path that lets a finished run serve as a
teacher (``teacher.source='workdir'``). Full training-state checkpoints and
exact resume build on it.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdistill.errors import JaxdistillError

FINAL_PARAMS = "final_params"


def save_params(path: str, params: Any) -> None:
  """Writes ``params`` (a sharded pytree) to directory ``path`` (must not exist)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), params)
    ckptr.wait_until_finished()


def load_params(path: str, target: Any) -> Any:
  """Restores params straight into the target shardings and dtypes.

  Args:
    path: a directory written by ``save_params``.
    target: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set: the
      model's expected shapes, the dtypes to cast to and the layout to load into
      (each host reads only its shards).

  Returns:
    The params pytree.

  Raises:
    JaxdistillError: missing checkpoint, or one whose names or shapes differ
      from the model's (the message names the first differing param).
  """
  if not os.path.isdir(path):
    raise JaxdistillError(
      f"no params at {path!r}: expected a directory written at the "
      "end of `jaxdistill train` (WORKDIR/final_params)"
    )
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    stored = dict(jax.tree_util.tree_flatten_with_path(getattr(meta, "item_metadata", meta))[0])
    for key_path, want in jax.tree_util.tree_flatten_with_path(target)[0]:
      name = jax.tree_util.keystr(key_path)
      have = stored.get(key_path)
      if have is None or tuple(have.shape) != tuple(want.shape):
        got = "missing" if have is None else f"shape {tuple(have.shape)}"
        raise JaxdistillError(
          f"params at {path!r} do not fit the configured model: "
          f"{name} is {got}, the model needs {tuple(want.shape)}"
        )
    return ckptr.restore(path, target)
