"""Config checks of the ``codistill`` section (models that teach each other,
``train/codistill.py``): the peers' keys and models, one vocabulary, what runs beside them."""

from collections.abc import Mapping
from typing import Any

from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import precision


def _number(c: Any, key: str, low: float, what: str) -> None:
  value = c[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
    raise ConfigError(f"codistill.{key}", f"must be a number {what}, got {value!r}")


def check_codistill(cfg: Any) -> None:
  """Raises ConfigError for a bad ``codistill`` setting (nothing to check when off)."""
  c = cfg.codistill
  n = c.exchange_every
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ConfigError(
      "codistill.exchange_every",
      f"must be an int >= 1 (1 = mutual learning, N = copies refreshed every N steps), got {n!r}",
    )
  if not isinstance(c.split_data, bool):
    raise ConfigError("codistill.split_data", f"must be true or false, got {c.split_data!r}")
  _number(c, "weight", -1e-300, ">= 0")
  _number(c, "temperature", 0, "> 0")
  if not isinstance(c.peers, (tuple, list)):
    raise ConfigError("codistill.peers", "must be a tuple of dicts of student keys (and lr)")
  if not c.peers:
    return
  known = set(config_lib.defaults.model_fields()) | {"lr"}
  for k, peer in enumerate(c.peers):
    if not isinstance(peer, Mapping):
      raise ConfigError(f"codistill.peers[{k}]", f"must be a dict of student keys, got {peer!r}")
    for key in peer:
      if key not in known:
        raise ConfigError(f"codistill.peers[{k}].{key}", f"unknown key; known: {sorted(known)}")
    lr = peer.get("lr", 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
      raise ConfigError(f"codistill.peers[{k}].lr", f"must be >= 0 (0 = optim.lr), got {lr!r}")
    vocab = peer.get("vocab_size", cfg.student.vocab_size)
    if vocab != cfg.student.vocab_size:
      raise ConfigError(
        f"codistill.peers[{k}].vocab_size",
        f"is {vocab} but student.vocab_size is {cfg.student.vocab_size}: models that "
        "codistil compare their next-token distributions and need one vocabulary",
      )
    if peer.get("init_from") or peer.get("init_layers"):
      raise ConfigError(f"codistill.peers[{k}]", "peers start from a random init")
  _check_beside(cfg)


def _check_beside(cfg: Any) -> None:
  """What codistillation replaces or cannot run with."""
  c, s = cfg.codistill, cfg.student
  if cfg.teacher.source != "none" or cfg.teachers:
    raise ConfigError(
      "teacher.source",
      f"is {cfg.teacher.source!r}: codistilled models teach each other; set "
      "teacher.source='none' (and no teachers)",
    )
  if models.is_vision(s) or s.encoder:
    raise ConfigError("student.arch", "codistillation trains decoder language models")
  policy = precision.parse_policy(s.policy, "student.policy")
  if policy.fp8 or policy.int8:
    raise ConfigError("student.policy", "c=fp8 / c=int8 students do not codistil (float only)")
  if cfg.continual.domains:
    raise ConfigError("continual.domains", "must be 0 with codistill.peers (not combined)")
  if cfg.distill.on_policy.lmbda:
    raise ConfigError("distill.on_policy.lmbda", "must be 0 with codistill.peers")
  models_n = 1 + len(c.peers)
  rows = cfg.optim.grad_accum * (models_n if c.split_data else 1)
  if cfg.data.batch_size % rows:
    raise ConfigError(
      "data.batch_size",
      f"{cfg.data.batch_size} does not split into {rows} blocks "
      f"(codistill.split_data over {models_n} models x optim.grad_accum)",
    )
  for k in range(len(c.peers)):
    section = config_lib.peer_section(cfg, k + 1)
    models.build(section, policy, f"codistill.peers[{k}]")  # a bad model key fails here
    if cfg.data.seq_len > section.max_len:
      raise ConfigError(
        f"codistill.peers[{k}].max_len", f"{section.max_len} < data.seq_len={cfg.data.seq_len}"
      )
