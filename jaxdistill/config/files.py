"""Config files by path or by name: ``--config configs/smoke.py`` or ``--config smoke``.

The configs of the repository's top-level ``configs/`` directory ship with the package: a
wheel (a non-editable ``pip install .``) holds them as ``jaxdistill/configs/`` (pyproject.toml
maps the directory there), while a source checkout (an editable install, or ``PYTHONPATH``)
has them beside the package. ``configs_dir`` finds them either way, so a config is addressable
by its name from any directory, and the quickstart finds its recipe in an installed package.

``--config SPEC`` (``resolve``) is, in this order:

  FILE       an existing file: that config file (a path always works)
  FILE:ARG   an existing file, ``get_config(ARG)``
  NAME       a shipped config's file name without ``.py`` (``smoke``)
  NAME:ARG   the same with ``get_config(ARG)`` (``quickstart:distill,test``)

An unknown name is a one-line ``ConfigError`` listing the known names.

Imports nothing of the config package itself (whose ``__init__`` imports this module).
"""

import importlib.util
import os
import re

from jaxdistill.errors import ConfigError

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../jaxdistill
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def configs_dir() -> str:
  """The shipped configs: ``jaxdistill/configs`` of an installed wheel, else the source
  checkout's ``configs/`` beside the package."""
  installed = os.path.join(_PACKAGE, "configs")
  if os.path.isdir(installed):
    return installed
  return os.path.join(os.path.dirname(_PACKAGE), "configs")


def names() -> list[str]:
  """The names of the shipped configs (their file names without ``.py``), sorted."""
  directory = configs_dir()
  if not os.path.isdir(directory):
    return []
  files = os.listdir(directory)
  return sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_"))


def shipped(name: str) -> str:
  """The file of shipped config ``name`` (``smoke`` -> ``.../configs/smoke.py``).

  Raises:
    ConfigError: no shipped config has that name (the message lists the known ones).
  """
  path = os.path.join(configs_dir(), name + ".py")
  if not _NAME.fullmatch(name) or not os.path.isfile(path):
    raise ConfigError(
      "--config", f"no config named {name!r}; known names: {', '.join(names()) or 'none'}"
    )
  return path


def resolve(spec: str) -> tuple[str, tuple[str, ...]]:
  """The file and ``get_config`` arguments of ``--config SPEC`` (see the module docstring).

  Args:
    spec: FILE, FILE:ARG, NAME or NAME:ARG.
  Returns:
    (path of the config file, () or (ARG,)).
  Raises:
    ConfigError: no such file, or no shipped config of that name.
  """
  if os.path.isfile(spec):
    return spec, ()
  if ":" in spec:
    path, arg = spec.rsplit(":", 1)
    if os.path.isfile(path):
      return path, (arg,)
  name, sep, arg = spec.partition(":")
  if _NAME.fullmatch(name):  # a bare name: not a path, so a shipped config
    return shipped(name), ((arg,) if sep else ())
  raise ConfigError(
    "--config",
    f"no such file {name!r}; pass a config file, or a name: {', '.join(names()) or 'none'}",
  )


def config_module(path: str):
  """Imports a config file as a module: its ``get_config`` and whatever else it defines.

  Config files are leaves (they import only ``jaxdistill.config`` and ``errors``), so
  one config may build on another by path, e.g. ``configs/lm_teacher.py`` on the
  quickstart's recipe ``configs/quickstart.py``.
  """
  spec = importlib.util.spec_from_file_location("_jaxdistill_config", path)
  if spec is None:  # no loader for the file name: not a .py file
    raise ConfigError("--config", f"{path!r} is not a Python file (.py) defining get_config()")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
