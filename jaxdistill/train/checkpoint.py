"""Orbax checkpoints: exact resume, preemption, failure safety. The teacher is never saved.

A checkpoint of step s (``WORKDIR/checkpoints/s/``) holds three items:

  state  the TrainState (student params with projection heads, optimizer state, step, rng;
         an EMA teacher's params), saved sharded: each process writes its shards
  data   the data iterator's state, one JSON file per process
  meta   the resolved config, jaxdistill version, mesh, dtype policies and
         the teacher's identity (source, path, content hash)

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a kill
during a save leaves the previous checkpoint intact and the partial one is skipped (with a
warning). Restores go straight into the target shardings: saved on one mesh, restored on any.

Resume order (``resolve_resume``): ``--resume_from STEP`` (a step of this workdir, e.g. to skip
a corrupted latest one) -> the latest checkpoint in the workdir -> ``--resume_from DIR``
(another run's checkpoint step directory) -> ``student.init_from`` (weights only) -> scratch.
"""

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

import jaxdistill
from jaxdistill import config as config_lib
from jaxdistill import paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import MODEL_KEYS, scan, shape_keys  # noqa: F401 (MODEL_KEYS: re-exported)

FINAL_PARAMS = "final_params"
CHECKPOINTS = "checkpoints"

# The model-shape keys (models.MODEL_KEYS, or an image classifier's: models.shape_keys): a
# change makes a checkpoint unusable; any other difference is harmless and only warned about.


# --- the data iterator's state: one JSON file per process --------------------


class DataStateHandler(ocp.CheckpointHandler):
  """Saves ``iterator.get_state()`` (a JSON-able dict) as process_i-of-n.json: any jaxdistill
  iterator, synthetic or grain-backed (grain's own handler takes only grain iterators)."""

  def save(self, directory: epath.Path, args: "DataSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(args.iterator.get_state()))

  def restore(self, directory: epath.Path, args: "DataRestore"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    path = directory / name
    if path.exists():
      args.iterator.set_state(json.loads(path.read_text()))
      return args.iterator
    # Saved by another number of processes: fine only if every process saved the same state
    # (a position in the GLOBAL stream); per-process positions (grain shards) cannot re-split.
    states = {p.read_text() for p in directory.iterdir() if p.name.startswith("process_")}
    if len(states) != 1:
      found = sorted(p.name for p in directory.iterdir())
      raise JaxdistillError(
        f"{directory} has no data state {name} (it holds {found}); this data iterator "
        "resumes only with the number of processes that saved it"
      )
    args.iterator.set_state(json.loads(states.pop()))
    return args.iterator

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  iterator: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  iterator: Any


# --- the manager ---------------------------------------------------------------


def make_manager(workdir: str, ckpt_cfg: Any) -> ocp.CheckpointManager:
  """The CheckpointManager of ``WORKDIR/checkpoints`` per the ``ckpt`` config section."""
  directory = paths.abspath(paths.join(workdir, CHECKPOINTS))
  options = ocp.CheckpointManagerOptions(
    max_to_keep=ckpt_cfg.max_to_keep or None,
    enable_async_checkpointing=bool(ckpt_cfg.async_save),
    create=True,
  )
  _warn_partial(directory)
  return ocp.CheckpointManager(directory, options=options)


# On an object store Orbax writes a step in place and marks it complete with this file last
# (no atomic directory rename there); a local step is complete once renamed from its tmp name.
COMMITTED = "commit_success.txt"


def _partial(directory: str, name: str) -> bool:
  if ".orbax-checkpoint-tmp" in name:
    return True
  remote = paths.is_remote(directory) and name.isdigit()
  return remote and not paths.exists(paths.join(directory, name, COMMITTED))


def _warn_partial(directory: str) -> None:
  """Names leftovers of interrupted saves (Orbax never restores them)."""
  if paths.isdir(directory):
    for name in paths.listdir(directory):
      if _partial(directory, name):
        warnings.warn(
          f"skipping partial checkpoint {paths.join(directory, name)} "
          "(a save was interrupted); the previous complete one is used"
        )


def complete_steps(directory: str) -> list[int]:
  """Steps with a complete checkpoint under ``directory`` (no manager needed)."""
  if not paths.isdir(directory):
    return []
  names = paths.listdir(directory)
  return sorted(int(n) for n in names if n.isdigit() and not _partial(directory, n))


def make_best_manager(workdir: str, ckpt_cfg: Any) -> ocp.CheckpointManager | None:
  """Keeps the student params of the best step by ``ckpt.best_metric`` in WORKDIR/best."""
  if not ckpt_cfg.best_metric:
    return None
  key = ckpt_cfg.best_metric
  options = ocp.CheckpointManagerOptions(
    max_to_keep=1,
    best_fn=lambda metrics: metrics[key],
    best_mode=ckpt_cfg.best_mode,
    keep_checkpoints_without_metrics=False,
    enable_async_checkpointing=bool(ckpt_cfg.async_save),
  )
  return ocp.CheckpointManager(paths.abspath(paths.join(workdir, "best")), options=options)


def params_args(params: Any) -> ocp.args.CheckpointArgs:
  return ocp.args.StandardSave(params)


def resolve_resume(manager: ocp.CheckpointManager, resume_from: str | None):
  """Which checkpoint to start from: (manager, step) or None for a fresh start. Order:
  ``resume_from`` as a STEP of this workdir -> this workdir's latest -> ``resume_from`` as a
  DIRECTORY (a step dir, a checkpoints dir or a workdir of another run) -> None."""
  steps = list(manager.all_steps())
  if resume_from and resume_from.isdigit():
    if int(resume_from) not in steps:
      raise JaxdistillError(
        f"--resume_from {resume_from}: no such checkpoint in "
        f"{manager.directory}; available steps: {sorted(steps)}"
      )
    return manager, int(resume_from)
  if steps:
    return manager, max(steps)
  if not resume_from:
    return None
  path = paths.abspath(resume_from).rstrip("/")
  if paths.isdir(paths.join(path, CHECKPOINTS)):
    path = paths.join(path, CHECKPOINTS)
  if paths.path(path).name.isdigit() and paths.isdir(path):
    directory, step = str(paths.path(path).parent), int(paths.path(path).name)
  else:
    found = complete_steps(path)
    if not found:
      raise JaxdistillError(
        f"--resume_from {resume_from!r}: no checkpoint there; pass a "
        "checkpoint step directory, a checkpoints directory or a workdir"
      )
    directory, step = path, found[-1]
  other = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  return other, step


def set_aside_newer(manager: ocp.CheckpointManager, step: int) -> list[str]:
  """Renames checkpoints newer than ``step`` to STEP.superseded (never deletes them):
  resuming from an older step would save those steps again; the old ones are kept aside."""
  moved = []
  for newer in (s for s in manager.all_steps() if s > step):
    old = paths.join(str(manager.directory), str(newer))
    new = f"{old}.superseded"
    if jax.process_index() == 0:
      paths.replace(old, new if not paths.exists(new) else f"{new}-{os.getpid()}")
    moved.append(old)
  if moved:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("jaxdistill_set_aside_newer")
    manager.reload()
    warnings.warn(f"resuming from step {step}: set aside newer checkpoints {moved} (*.superseded)")
  return moved


def save(
  manager: ocp.CheckpointManager,
  step: int,
  state: Any,
  data_iter: Any,
  meta: dict,
  force: bool = False,
) -> bool:
  """Saves step ``step``; every process must call this in the same order."""
  return manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=DataSave(data_iter), meta=ocp.args.JsonSave(meta)
    ),
    force=force,
  )


def restore(
  manager: ocp.CheckpointManager, step: int, abstract_state: Any, data_iter: Any
) -> tuple[Any, dict]:
  """Restores step ``step`` into ``abstract_state``'s shardings; sets ``data_iter`` (None:
  the state alone, e.g. to evaluate that step's params).

  Raises:
    JaxdistillError: the checkpoint is unreadable (names its step and path).
  """
  path = paths.join(str(manager.directory), str(step))
  target, rebuild = _restore_target(path, abstract_state)
  try:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target),
        meta=ocp.args.JsonRestore(),
        **({} if data_iter is None else {"data": DataRestore(data_iter)}),
      ),
    )
  except JaxdistillError:
    raise
  except Exception as e:  # Orbax/TensorStore raise many kinds on a damaged file.
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise JaxdistillError(
      f"checkpoint step {step} at {path} cannot be restored ({type(e).__name__}: {first}); "
      "it may be corrupted: pass --resume_from STEP to use an older one"
    ) from e
  return rebuild(restored["state"]), restored["meta"]


def _restore_target(path: str, abstract_state: Any) -> tuple[Any, Any]:
  """(restore target, rebuild) for a checkpoint written before a TrainState field existed:
  fields that are None in ``abstract_state`` and absent from the saved tree (e.g. ``ema_params``)
  are left out of the restore and come back None; otherwise the state itself."""
  fields = getattr(abstract_state, "__dataclass_fields__", {})
  try:
    saved = json.loads(paths.read_text(paths.join(path, "state", "_METADATA")))["tree_metadata"]
  except Exception:  # unreadable here: the restore itself reports it
    return abstract_state, lambda state: state
  new = [f for f in fields if getattr(abstract_state, f) is None and f"('{f}',)" not in saved]
  if not new:
    return abstract_state, lambda state: state
  target = {f: getattr(abstract_state, f) for f in fields if f not in new}
  return target, lambda state: type(abstract_state)(**state, **dict.fromkeys(new))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """Only the ``meta`` item of a checkpoint (cheap: no arrays are read)."""
  path = paths.join(str(manager.directory), str(step), "meta", "metadata")
  if not paths.exists(path):
    raise JaxdistillError(f"checkpoint step {step} has no metadata at {path}")
  return json.loads(paths.read_text(path))


# --- compatibility of a checkpoint with the current config ----------------------
def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_compatible(saved_config: dict, config: dict, where: str) -> list[str]:
  """Raises on differences that matter, returns the harmless ones.

  Args:
    saved_config: the config stored in the checkpoint (``to_dict`` form).
    config: the current config (``to_dict`` form).
    where: the checkpoint's path, for messages.

  Returns:
    Keys that differ harmlessly (e.g. log.every), for a warning; keys the checkpoint's
    config predates are not differences while they hold their default (e.g. optim.eps).
  """
  old, new = _flat(json.loads(json.dumps(saved_config))), _flat(json.loads(json.dumps(config)))
  # The keys of the student's kind of model (transformer or image classifier), and its arch.
  matters = [f"student.{k}" for k in dict.fromkeys(("arch", *shape_keys(config["student"])))]
  if new.get("teacher.source") != "none":
    matters += ["teacher.d_model", "distill.hidden.layer_map", "distill.hidden.teacher"]
    # An image model's projections: the teacher's stage channels and the stage pairs.
    matters += [f"teacher.{k}" for k in ("arch", "cnn_channels", "depth", "widen")]
    matters += ["distill.feature_map.stage_map"]
  matters += [k for k in new if k.startswith("data.") and ("tokenizer" in k or "vocab" in k)]
  for key in matters:
    if key in old and old.get(key) != new.get(key):
      raise JaxdistillError(
        f"the checkpoint at {where} was trained with {key}={old.get(key)!r} but the config has "
        f"{new.get(key)!r}; use a new --workdir or restore the old setting"
      )
  # A key added since the checkpoint was written, holding its default, changes nothing.
  defaults = _flat(json.loads(json.dumps(config_lib.default_config().to_dict())))
  added = {k for k in set(new) - set(old) if k in defaults and new[k] == defaults[k]}
  return sorted(k for k in (set(old) | set(new)) - added if old.get(k) != new.get(k))


# --- teacher identity and weights-only params -----------------------------------


content_hash = paths.content_hash  # sha256 over a directory's file names and bytes


def metadata(cfg: Any, mesh: jax.sharding.Mesh, teacher_path: str | None) -> dict:
  """What a checkpoint records besides the state."""
  teacher = {"source": cfg.teacher.source}
  if teacher_path:
    teacher.update(path=paths.abspath(teacher_path), sha256=content_hash(teacher_path))
  elif cfg.teacher.source == "random":
    teacher["seed"] = cfg.seed + 1
  elif cfg.teacher.source == "cache":
    # The manifest holds every shard's sha256: its hash names the content without a re-read.
    manifest = paths.read_bytes(paths.join(cfg.teacher.path, "manifest.json"))
    teacher.update(
      path=paths.abspath(cfg.teacher.path), sha256=hashlib.sha256(manifest).hexdigest()
    )
  return {
    "jaxdistill_version": jaxdistill.__version__,
    "config": cfg.to_dict(),
    "mesh": dict(mesh.shape),
    "processes": jax.process_count(),
    "policies": {"student": cfg.student.policy, "teacher": cfg.teacher.policy},
    "teacher": teacher,
  }


def save_params(path: str, params: Any) -> None:
  """Writes ``params`` (a sharded pytree) to directory ``path`` (must not exist)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(paths.abspath(path), params)
    ckptr.wait_until_finished()


def load_params(path: str, target: Any) -> Any:
  """Restores params straight into the target shardings and dtypes.

  Args:
    path: a directory written by ``save_params``.
    target: pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set: the model's expected
      shapes, the dtypes to cast to and the layout to load into (each host reads its shards).
  Returns:
    The params pytree (blocks saved in the other layout converted: ``scan.read_layout``).
  Raises:
    JaxdistillError: missing checkpoint, or one whose names or shapes differ from the
      model's (the message names the first differing param).
  """
  # Orbax writes one of these metadata files: without them it is no params directory.
  if not any(paths.isfile(paths.join(path, m)) for m in ("_CHECKPOINT_METADATA", "_METADATA")):
    raise JaxdistillError(
      f"no params at {path!r}: expected a directory written at the "
      "end of `jaxdistill train` (WORKDIR/final_params)"
    )
  path = paths.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    stored = dict(jax.tree_util.tree_flatten_with_path(getattr(meta, "item_metadata", meta))[0])
    read, convert = scan.read_layout(stored, target)  # the saved blocks' layout
    for key_path, want in jax.tree_util.tree_flatten_with_path(read)[0]:
      name = jax.tree_util.keystr(key_path)
      have = stored.get(key_path)
      if have is None or tuple(have.shape) != tuple(want.shape):
        got = "missing" if have is None else f"shape {tuple(have.shape)}"
        raise JaxdistillError(
          f"params at {path!r} do not fit the configured model: "
          f"{name} is {got}, the model needs {tuple(want.shape)}"
        )
    return convert(ckptr.restore(path, read))
