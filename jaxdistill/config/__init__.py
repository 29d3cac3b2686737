"""Configs: Python files returning an ``ml_collections.ConfigDict``.

A config file defines ``get_config()`` which starts from ``default_config()``
and changes what it needs. The sections are fixed; every key exists in
``default_config()`` so a typo is an error, not a silently ignored setting:

  seed      top-level int: init and data seed
  cache_dir top-level str: built corpora, tokenizers, cached teachers
  student   the trained model (shape, ``policy``)
  teacher   the teacher: ``source`` none | random | pretrain | workdir | hf | cache | ema
  teachers  further teachers (a tuple of ``teacher_fields`` dicts): an ensemble
  distill   the losses (logit, ce, attention, hidden, ...), each with a weight and a
            schedule; the fused head, on-policy, per-token strength (``adaptive``)
  optim     AdamW, warmup + cosine, clipping, ``steps``, ``grad_accum``
  data      source (synthetic, built-in stdlib corpus, tfds, files), tokenizer, packing, shape
  mesh      ``data`` / ``fsdp`` / ``tensor`` sizes, -1 = the rest
  ckpt      checkpointing
  eval      evaluation
  log       ``every`` (steps between metric lines), ``progress`` bar, ``tensorboard``
  precompute  sparse teacher targets written by ``jaxdistill precompute``
  codistill  models trained together, each teaching the others (mutual learning, codistillation)
  continual  continual distillation over a drifting stream

A config is named on the command line by its file (``--config configs/smoke.py``), or by the
name of one the package ships from ``configs/`` (``--config smoke``; ``--config
quickstart:distill,test`` calls ``get_config("distill,test")``): ``files.resolve``.

Overrides come from the command line as ``--config.distill.temperature=2.0`` (``overrides``).
The further teachers are a tuple of dicts, so one key of one of them is named by its index:
``--config.teachers[0].weight=2.0`` sets ``weight`` of ``teachers[0]`` (teacher 1; ``teacher``
is teacher 0), any ``teacher_fields`` key likewise. An index past the last teacher, or a key
no teacher has, is a one-line error. (Quote the argument in shells that expand brackets.)
"""

from typing import Sequence

import ml_collections

from jaxdistill.config.defaults import default_config, peer_section, teacher_fields, teachers_of
from jaxdistill.config.files import config_module, configs_dir, names, resolve
from jaxdistill.config.overrides import apply_override, parse_value
from jaxdistill.errors import ConfigError

__all__ = ["apply_override", "config_module", "configs_dir", "names", "parse_value", "resolve"]
__all__ += ["default_config", "load_config", "teacher_fields", "teachers_of", "SECTIONS"]
__all__ += ["peer_section"]

SECTIONS = ("student", "teacher", "distill", "optim", "data", "mesh", "ckpt", "eval", "log")
SECTIONS += ("precompute", "codistill", "continual")


def _check_known(cfg, default, prefix="") -> None:
  """Every key of ``cfg`` exists in ``default`` and vice versa."""
  for key in default.keys():
    if key not in cfg:
      raise ConfigError(
        f"{prefix}{key}", "missing; start config files from jaxdistill.config.default_config()"
      )
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if key not in default:
      raise ConfigError(name, f"unknown key; known keys here: {sorted(default.keys())}")
    if isinstance(default[key], ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(name, "must be a section (ConfigDict)")
      _check_known(value, default[key], name + ".")


def load_config(path: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """Loads a config file and applies overrides; it does not validate (``validate.validate``).

  Args:
    path: a Python file defining ``get_config()``; ``FILE:ARG`` calls ``get_config(ARG)``
      (a variant, as big_vision's configs take one: ``configs/quickstart.py:distill,test``);
      or a shipped config's name, ``NAME`` / ``NAME:ARG`` (``smoke``, ``quickstart:distill``;
      ``files.resolve``).
    overrides: (dotted key, raw string value) pairs applied in order (``apply_override``).

  Returns:
    The ConfigDict (every key known; values not yet checked against each other).

  Raises:
    ConfigError: missing file or unknown name, no get_config, unknown key, an override of the
      wrong type or a bad teacher index.
  """
  path, args = resolve(path)
  try:
    module = config_module(path)
    if not hasattr(module, "get_config"):
      raise ConfigError("--config", f"{path} defines no get_config() function")
    cfg = module.get_config(*args)
  except ConfigError:
    raise
  except Exception as e:  # a config file is user code: report, don't trace back
    raise ConfigError("--config", f"{path} failed: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError("--config", f"{path}: get_config() must return a ConfigDict")
  _check_known(cfg, default_config())
  for key, raw in overrides:
    apply_override(cfg, key, raw)
  return cfg
