"""Command-line overrides of a loaded config: ``--config.KEY=VALUE``.

``KEY`` is dotted (``distill.temperature``, ``seed``) and names one existing key; the value is
parsed into the type of the value it replaces (``parse_value``). The further teachers are a
tuple of plain dicts (``config.teacher_fields``), not sections, so one of their keys is named
by index: ``teachers[I].KEY`` sets KEY of ``teachers[I]``, teacher I + 1 (``teacher`` is
teacher 0), e.g. ``--config.teachers[0].weight=2``. Every mistake (an unknown section or key,
an index out of range, a value of the wrong type) is a one-line ``ConfigError`` naming it.

Kept apart from the schema (``config/__init__.py``) and imported by it, so this module imports
nothing of the config package itself.
"""

import ast
import re

import ml_collections

from jaxdistill.errors import ConfigError

# teachers[I].KEY: I a decimal index, KEY one teacher key (no further dots: a teacher's keys
# are flat).
_TEACHER_KEY = re.compile(r"teachers\[(?P<index>[^\]]*)\]\.(?P<key>[^.]+)")


def parse_value(raw: str, current):
  """Parses an override string into the type of the value it replaces.

  Args:
    raw: the command line's text.
    current: the value it replaces (its type decides the parsing).
  Returns:
    The parsed value.
  Raises:
    ValueError / SyntaxError: ``raw`` is no value of that type.
  """
  if isinstance(current, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError("expected true or false")
  if isinstance(current, int):
    return int(raw)
  if isinstance(current, float):
    return float(raw)
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    value = ast.literal_eval(raw)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
  raise ValueError(f"cannot override a value of type {type(current).__name__}")


def _parsed(key: str, raw: str, current):
  try:
    return parse_value(raw, current)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(
      key, f"cannot use {raw!r} for a value of type {type(current).__name__} ({e})"
    ) from None


def apply_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets ``key`` (``distill.temperature``, or ``teachers[I].KEY``) from string ``raw``.

  Args:
    cfg: the config, changed in place.
    key: the dotted key, as after ``--config.``.
    raw: the value's text.
  Raises:
    ConfigError: an unknown section or key, a bad teacher index, a value of the wrong type.
  """
  if key.startswith("teachers["):
    _apply_teacher_override(cfg, key, raw)
    return
  if key.startswith("codistill.peers["):
    _apply_peer_override(cfg, key, raw)
    return
  *path, leaf = key.split(".")
  node = cfg
  for i, part in enumerate(path):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      hint = "; one of the further teachers is teachers[I].KEY" if part == "teachers" else ""
      raise ConfigError(".".join(path[: i + 1]), "no such section" + hint)
    node = node[part]
  if leaf not in node:
    raise ConfigError(key, f"unknown key; known keys here: {sorted(node.keys())}")
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(key, "is a section; override one of its keys")
  value = _parsed(key, raw, node[leaf])
  with node.ignore_type():
    node[leaf] = value


def _apply_teacher_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """``teachers[I].KEY=VALUE``: one key of one further teacher (a plain dict in a tuple)."""
  match = _TEACHER_KEY.fullmatch(key)
  if not match or not match["index"].isdigit():
    raise ConfigError(
      key, "name one key of one further teacher as teachers[I].KEY, e.g. teachers[0].weight"
    )
  index, leaf = int(match["index"]), match["key"]
  teachers = tuple(cfg.teachers)
  if index >= len(teachers):
    have = ["none", "teachers[0]"][len(teachers)] if len(teachers) < 2 else None
    have = have or f"teachers[0] to teachers[{len(teachers) - 1}]"
    raise ConfigError(
      f"teachers[{index}]",
      f"out of range: this config has {len(teachers)} further teacher(s) ({have}); "
      "add teachers in the config file",
    )
  # Every teacher has the keys of the ``teacher`` section (``teacher_fields``); an entry a
  # config file wrote short takes the type of the default it leaves out.
  known = cfg.teacher
  if leaf not in known:
    raise ConfigError(key, f"unknown key; known keys here: {sorted(known.keys())}")
  entry = dict(teachers[index])
  entry[leaf] = _parsed(key, raw, entry.get(leaf, known[leaf]))
  cfg.teachers = teachers[:index] + (entry,) + teachers[index + 1 :]


_PEER_KEY = re.compile(r"codistill\.peers\[(?P<index>\d+)\]\.(?P<key>[^.]+)")


def _apply_peer_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """``codistill.peers[I].KEY=VALUE``: one key (a student key, or ``lr``) of one peer."""
  match = _PEER_KEY.fullmatch(key)
  if not match:
    raise ConfigError(key, "name one key of one peer as codistill.peers[I].KEY, e.g. .lr")
  index, leaf = int(match["index"]), match["key"]
  peers = tuple(cfg.codistill.peers)
  if index >= len(peers):
    raise ConfigError(
      f"codistill.peers[{index}]",
      f"out of range: this config has {len(peers)} peer(s); add peers in the config file",
    )
  known = dict(cfg.student.items(), lr=0.0)
  if leaf not in known:
    raise ConfigError(key, f"unknown key; known keys here: {sorted(known)}")
  entry = dict(peers[index])
  entry[leaf] = _parsed(key, raw, entry.get(leaf, known[leaf]))
  cfg.codistill.peers = peers[:index] + (entry,) + peers[index + 1 :]
