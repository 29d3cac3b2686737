"""The model ``jaxdistill generate`` runs: a run's student or teacher, a Hugging Face
directory, or a config's random init (``load_model``), as ``Loaded``.

  --workdir W            the student's final params (an int8 run: its ``int8/`` model), or with
                         ``which="teacher"`` the teacher the run distilled from, loaded as
                         ``jaxdistill eval`` loads it (``train.teacher.load``)
  --model DIR            a Hugging Face directory (``models.hf.load``) and its tokenizer.json
  --model NAME|FILE      a config's student, randomly initialised from its seed (a note says so)

On one device unless ``sharded``: then the config's mesh (``parallel.sharding.make_mesh``) over
all devices. Encoders and image classifiers are refused (generation needs a decoder). A job
module (layer 6): it reads runs as ``evaluation.job`` does.
"""

import dataclasses
from typing import Any

import jax

from jaxdistill import models, paths
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import precision
from jaxdistill.parallel import sharding as sharding_lib


@dataclasses.dataclass
class Loaded:
  """A model to generate from: module, variables (placed), tokenizer (or None: token ids), the
  config it came from (None for a Hugging Face directory), its mesh and rules when sharded,
  and notes for the user."""

  module: Any
  variables: dict
  tokenizer: Any
  cfg: Any = None
  mesh: Any = None
  rules: Any = None
  notes: tuple[str, ...] = ()


def load_model(
  workdir: str, model: str, which: str = "student", sharded: bool = False, flag: str = ""
) -> Loaded:
  """The model of ``--workdir`` (its ``which``) or ``--model`` (see the module docstring).

  Raises:
    JaxdistillError: no such run / directory / config, an unfinished run, a run without a
      teacher model, or an encoder or image classifier (generation needs a decoder).
  """
  if workdir:
    return _from_workdir(workdir, which, sharded, flag or "--workdir")
  if paths.isfile(paths.join(model, "config.json")):
    return _from_hf(model, sharded)
  return _from_config(model, sharded)


def _mesh(mesh_cfg: Any, sharded: bool) -> jax.sharding.Mesh:
  if sharded:
    return sharding_lib.make_mesh(mesh_cfg)
  return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def _check_decoder(section: Any, where: str) -> None:
  if models.is_vision(section):
    raise JaxdistillError(
      f"{where} is an image classifier ({section['arch']}); generate needs a decoder-only "
      "language model"
    )
  if section["encoder"]:
    raise JaxdistillError(
      f"{where} is an encoder (BERT-style); generate needs a decoder-only language model "
      "(`jaxdistill embed` runs encoders)"
    )


def _tokenizer(path: str) -> Any:
  if not paths.isfile(path):
    return None
  from jaxdistill.data import tokenizer as tok_lib

  return tok_lib.load(path)


def _fp8_note(policy: precision.Policy, side: str) -> tuple[str, ...]:
  if not policy.fp8:
    return ()
  return (f"the {side} is c=fp8: its saved params carry no FP8 scales, so it runs in bf16 here",)


def _from_workdir(workdir: str, which: str, sharded: bool, flag: str) -> Loaded:
  from jaxdistill.evaluation import job as eval_job
  from jaxdistill.train import workdir as workdir_lib

  if not workdir_lib.is_run_config(paths.join(workdir, "config.json")):
    raise JaxdistillError(
      f"{flag} {workdir!r} is not a jaxdistill run (no config.json written by `jaxdistill train`)"
    )
  cfg = eval_job.run_config(workdir)
  _check_decoder(cfg[which], f"{flag} {workdir!r}'s {which}")
  mesh = _mesh(cfg.mesh, sharded)
  policy = precision.parse_policy(cfg[which].policy, f"{which}.policy")
  tokenizer = _tokenizer(paths.join(workdir, "tokenizer.json"))
  if paths.isfile(paths.join(workdir, "tokenizer.json")):
    cfg.data.tokenizer = paths.join(workdir, "tokenizer.json")  # --from_data tokenises with it
  notes = _fp8_note(policy, which)
  if tokenizer is None:
    notes += (f"{workdir} has no tokenizer.json: prompts and completions are token ids",)
  if which == "teacher":
    module, variables, rules, more = _teacher(cfg, workdir, mesh)
    notes += more
  else:
    module, variables = _student(cfg, workdir, mesh, policy, flag)
    rules = None
  mesh_used = mesh if sharded else None
  return Loaded(module, variables, tokenizer, cfg, mesh_used, rules, notes)


def _student(cfg: Any, workdir: str, mesh: Any, policy: Any, flag: str) -> tuple[Any, dict]:
  from jaxdistill.evaluation import evaluate
  from jaxdistill.models import quant
  from jaxdistill.train import checkpoint
  from jaxdistill.train import workdir as workdir_lib

  module = models.build(cfg.student, policy, "student")
  if quant.is_int8(module):
    path = paths.join(workdir, workdir_lib.INT8_DIR)
    if not paths.isfile(paths.join(path, quant.CONFIG_FILE)):
      raise JaxdistillError(
        f"{flag} {workdir!r} is an int8 (c=int8) run without {workdir_lib.INT8_DIR}/ (written "
        "when it finishes); finish the run first"
      )
    module, variables, _ = workdir_lib.load_int8(path, mesh)
    return module, variables
  path = paths.join(workdir, checkpoint.FINAL_PARAMS)
  if not paths.isdir(path):
    raise JaxdistillError(
      f"{flag} {workdir!r} has no {checkpoint.FINAL_PARAMS}/ (the run has not finished); "
      "train it to the end first"
    )
  variables, _ = evaluate.load_variables(module, path, mesh, cfg.data.seq_len)
  return module, variables


def _teacher(cfg: Any, workdir: str, mesh: Any) -> tuple[Any, dict, Any, tuple[str, ...]]:
  from jaxdistill.train import teacher as teacher_lib

  source = cfg.teacher.source
  if source in ("none", "cache"):
    raise JaxdistillError(
      f"--which teacher: {workdir!r} has no teacher model to load (teacher.source={source!r}); "
      "generate from its student, or from the teacher's own --workdir / --model"
    )
  policy = precision.parse_policy(cfg.teacher.policy, "teacher.policy")
  module = models.build(cfg.teacher, policy, "teacher")
  variables, _, _ = teacher_lib.load(cfg, module, mesh, workdir)
  notes = _fp8_note(policy, "teacher")
  if source == "random":
    notes += ("the run's teacher is a seeded random init (teacher.source='random')",)
  return module, variables, teacher_lib.rules(cfg, module, mesh), notes


def _from_hf(path: str, sharded: bool) -> Loaded:
  from jaxdistill import config as config_lib
  from jaxdistill.models import hf

  hfm = hf.read_config(path)
  if hfm.is_encoder:
    raise JaxdistillError(
      f"--model {path!r} is an encoder ({hfm.model_type}); generate needs a decoder-only "
      "language model (`jaxdistill embed` runs encoders)"
    )
  mesh = _mesh(config_lib.default_config().mesh, True) if sharded else None
  _, params = hf.load(path, hfm, mesh)
  tokenizer = _tokenizer(paths.join(path, "tokenizer.json"))
  notes = () if tokenizer else (f"{path} has no tokenizer.json: prompts are token ids",)
  return Loaded(hfm.module(), {"params": params}, tokenizer, None, mesh, None, notes)


def _from_config(name: str, sharded: bool) -> Loaded:
  from jaxdistill import config as config_lib
  from jaxdistill.config import validate

  try:
    cfg = config_lib.load_config(name)
    validate.validate(cfg)
  except ConfigError as e:
    raise JaxdistillError(
      f"--model {name!r} is neither a Hugging Face model directory (with config.json) nor a "
      f"usable config ({e})"
    ) from None
  _check_decoder(cfg.student, f"--model {name!r}'s student")
  policy = precision.parse_policy(cfg.student.policy, "student.policy")
  module = models.build(cfg.student, policy, "student")
  mesh = _mesh(cfg.mesh, sharded)
  key = jax.random.key(cfg.seed)
  variables, _ = models.create_variables(module, key, mesh, cfg.data.seq_len)
  tokenizer = _tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
  notes = (
    f"--model {name} is a config, not trained weights: its student is a random init (seed "
    f"{cfg.seed}), so the completions are noise",
  ) + _fp8_note(policy, "student")
  if tokenizer is None:
    notes += ("the config names no tokenizer (data.tokenizer): prompts are token ids",)
  return Loaded(module, variables, tokenizer, cfg, mesh if sharded else None, None, notes)


def check_same_tokenizer(target: Loaded, draft: Loaded, where: str) -> None:
  """A draft must tokenise as its target does (same vocabulary size, same tokenizer)."""
  if draft.module.config.vocab_size != target.module.config.vocab_size:
    raise JaxdistillError(
      f"--draft {where!r} has a vocabulary of {draft.module.config.vocab_size} tokens, the "
      f"target {target.module.config.vocab_size}: a draft must share the target's tokenizer"
    )
  if target.tokenizer is not None and draft.tokenizer is not None:
    if target.tokenizer.to_str() != draft.tokenizer.to_str():
      raise JaxdistillError(
        f"--draft {where!r} was trained with another tokenizer than the target; pick a draft "
        "that shares it"
      )
