"""Structured pruning: a smaller model whose params are a teacher's with rows and columns removed.

Pure surgery on param pytrees and configs (the scores come from ``prune_scores``):

  resolve_count(target, total, key)   a target (int count or float fraction) -> a count
  top_units(scores_U, count)          the ``count`` highest-scoring unit indices, sorted
  keep_transformer(scores, cfg, targets) / keep_cnn(...)   which units survive
  prune_transformer(params, cfg, keep) / prune_cnn(params, cfg, keep)
                                      (new params, the config keys that changed)

Transformers (decoder and BERT encoder): attention heads (per layer; the same count in every
layer, as ``num_heads`` is one key), MLP neurons (``d_ff``), residual channels (``d_model``) and
whole layers (``surgery.select_layers``, the ``student.init_layers`` specs). Every tensor that
touches a removed unit loses that row / column; which axis of a param is which unit comes from the
model's own logical axis names ("heads", "mlp", "embed"), so a param this module does not know is
an error, never silently left wide. Choices:

- Grouped-query attention prunes whole key/value groups with their query heads: heads per group
  stays constant, a group's score is the sum of its query heads'; the head target must be a
  multiple of the group size.
- The head width K (and with it RoPE) never changes: when H * K no longer equals d_model the new
  config sets ``head_size`` = K.
- Tied embeddings: the table [V, D] loses the pruned columns and so does the head it doubles as.
- RMSNorm over fewer channels: scales are multiplied by sqrt(D / D') and ``norm_eps`` by D / D',
  which makes the pruned model exactly the original with the removed residual channels held at
  zero. LayerNorm (BERT, GPT-2) subtracts a mean over all D channels, which no rescaling
  reproduces: its ``d_model`` pruning is approximate (as Minitron's); heads and neurons are exact.

``SimpleCNN`` (arch "cnn"): the output channels of each conv stage (``cnn_channels``; the conv's
kernel and bias, the next conv's input rows or the fc's flattened rows) and the fc width
(``cnn_fc``). ResNet / WRN blocks have no config key for a narrower inner conv and their shortcuts
tie the stage widths together: they are refused (``prune_cnn`` raises).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxdistill.errors import ConfigError
from jaxdistill.models import api, surgery
from jaxdistill.models.transformer_config import TransformerConfig
from jaxdistill.models.vision_config import VisionConfig

# The target keys per model kind (also the config keys they change).
TRANSFORMER_TARGETS = ("num_heads", "d_ff", "d_model", "num_layers", "layers")
CNN_TARGETS = ("cnn_channels", "cnn_fc")
_NORMS = ("attn_norm", "mlp_norm", "final_norm", "embed_norm")


def resolve_count(target: Any, total: int, key: str, multiple: int = 1) -> int:
  """The number of units to keep.

  Args:
    target: an int count in [1, total], or a float fraction in (0, 1] of ``total`` (rounded to
      the nearest multiple of ``multiple``, at least one).
    total: the units there are.
    key: the target's name, for errors ("prune.num_heads").
    multiple: the count must be a multiple of this (GQA: the group size).
  Raises:
    ConfigError: a count of 0 or above ``total``, a fraction outside (0, 1], a count that is no
      multiple of ``multiple``.
  """
  if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)):
    raise ConfigError(key, f"must be an int count or a float fraction, got {target!r}")
  if isinstance(target, (float, np.floating)):
    if not 0 < target <= 1:
      raise ConfigError(key, f"fraction {target!r} must be in (0, 1]")
    count = max(multiple, int(round(target * total / multiple)) * multiple)
  else:
    count = int(target)
  if not 1 <= count <= total:
    raise ConfigError(key, f"count {count} must be in [1, {total}] (the model has {total})")
  if count % multiple:
    raise ConfigError(
      key, f"count {count} must be a multiple of {multiple} (query heads per key/value group)"
    )
  return count


def top_units(scores_U: np.ndarray, count: int) -> np.ndarray:
  """Indices of the ``count`` highest scores, increasing (ties: the lower index is kept)."""
  order = np.argsort(-np.asarray(scores_U, np.float64), kind="stable")
  return np.sort(order[:count])


def keep_transformer(scores: dict, cfg: TransformerConfig, targets: dict) -> dict:
  """Which units of a transformer survive.

  Args:
    scores: "heads" [L, H], "mlp" [L, F], "embed" [D] (``prune_scores``; higher = keep).
    cfg: the model's config.
    targets: subset of ``TRANSFORMER_TARGETS``; "layers" is a ``surgery.select_layers`` spec
      (default "uniform") used when "num_layers" is given.
  Returns:
    {"layers": source layer indices, "heads": [kept query heads] per kept layer, "mlp": [kept
    neurons] per kept layer, "embed": kept channels}; a unit kind without a target keeps all.
  Raises:
    ConfigError: an unknown target key or an impossible count (``resolve_count``).
  """
  unknown = sorted(set(targets) - set(TRANSFORMER_TARGETS))
  if unknown:
    raise ConfigError(f"prune.{unknown[0]}", f"is no transformer target; use {TRANSFORMER_TARGETS}")
  n_layers = cfg.num_layers
  if "num_layers" in targets:
    n_layers = resolve_count(targets["num_layers"], cfg.num_layers, "prune.num_layers")
  try:
    layers = surgery.select_layers(targets.get("layers", "uniform"), cfg.num_layers, n_layers)
  except ValueError as e:
    raise ConfigError("prune.layers", str(e)) from None
  group = cfg.num_heads // cfg.kv_heads
  h = cfg.num_heads
  if "num_heads" in targets:
    h = resolve_count(targets["num_heads"], cfg.num_heads, "prune.num_heads", group)
  f = resolve_count(targets.get("d_ff", cfg.d_ff), cfg.d_ff, "prune.d_ff")
  d = resolve_count(targets.get("d_model", cfg.d_model), cfg.d_model, "prune.d_model")
  heads = []
  for i in layers:  # whole key/value groups: a group's score is its query heads' sum
    groups = top_units(np.asarray(scores["heads"][i]).reshape(-1, group).sum(-1), h // group)
    heads.append((groups[:, None] * group + np.arange(group)).reshape(-1))
  mlp = [top_units(scores["mlp"][i], f) for i in layers]
  return {"layers": layers, "heads": heads, "mlp": mlp, "embed": top_units(scores["embed"], d)}


def _unit_axes(module: Any) -> dict:
  """{param path: logical axis names} of ``module``'s params (from an abstract init)."""
  abstract = jax.eval_shape(lambda r: api.init_variables(module, r, 1), jax.random.key(0))
  specs = nn.get_partition_spec(abstract["params"])
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {tuple(k.key for k in path): tuple(spec) for path, spec in flat}


def _take(a: np.ndarray, axis: int, idx: np.ndarray | None) -> np.ndarray:
  return a if idx is None else np.take(a, idx, axis=axis)


def _prune_leaf(path: tuple, a: np.ndarray, names: tuple, keep: dict, block: dict) -> np.ndarray:
  """One param with the removed units' rows / columns dropped (by its logical axis names)."""
  for axis, name in enumerate(names):
    if name == "embed":
      a = _take(a, axis, keep["embed"])
    elif name == "mlp":
      a = _take(a, axis, block.get("mlp"))
    elif name == "heads":  # key / value kernels' head axis counts key/value heads
      a = _take(a, axis, block.get("kv" if path[-2] in ("key", "value") else "heads"))
    elif name not in (None, "vocab", "kv"):
      raise ValueError(f"pruning: param {'/'.join(path)} has an unknown axis {name!r}")
  return a


def prune_transformer(params: Any, cfg: TransformerConfig, keep: dict) -> tuple[dict, dict]:
  """A transformer's params with the units ``keep`` drops removed.

  Args:
    params: the model's params (unboxed arrays; any device), decoder or encoder.
    cfg: its config.
    keep: from ``keep_transformer``.
  Returns:
    (new params as host NumPy arrays, {config key: new value} for the keys that changed among
    num_layers, num_heads, num_kv_heads, d_ff, d_model, head_size, norm_eps).
  """
  group = cfg.num_heads // cfg.kv_heads
  layers = tuple(keep["layers"])
  d_new = len(keep["embed"])
  axes = _unit_axes(api.module_for(cfg))
  params = surgery.init_from_teacher(jax.device_get(params), layers)
  rescale = math.sqrt(cfg.d_model / d_new) if cfg.norm == "rmsnorm" else 1.0
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for path, leaf in flat:
    path = tuple(k.key for k in path)
    j = int(path[0].removeprefix("block_")) if path[0].startswith("block_") else None
    block = {}
    if j is not None:
      heads = np.asarray(keep["heads"][j])
      block = {"heads": heads, "kv": heads[::group] // group, "mlp": keep["mlp"][j]}
    src = ("block_0",) + path[1:] if j is not None else path
    a = _prune_leaf(path, np.asarray(leaf), axes[src], keep, block)
    if path[-2] in _NORMS and path[-1] == "scale" and rescale != 1.0:
      a = (a.astype(np.float64) * rescale).astype(a.dtype)
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = a
  h_new = len(keep["heads"][0]) if layers else cfg.num_heads
  new = dict(num_layers=len(layers), num_heads=h_new, d_ff=len(keep["mlp"][0]), d_model=d_new)
  new["num_kv_heads"] = h_new // group if cfg.num_kv_heads else 0
  k = cfg.head_dim
  new["head_size"] = cfg.head_size if (d_new % h_new == 0 and d_new // h_new == k) else k
  if cfg.norm == "rmsnorm" and d_new != cfg.d_model:
    new["norm_eps"] = cfg.norm_eps * cfg.d_model / d_new
  return out, {key: v for key, v in new.items() if getattr(cfg, key) != v}


def keep_cnn(scores: dict, cfg: VisionConfig, targets: dict) -> dict:
  """Which channels of a ``SimpleCNN`` survive.

  Args:
    scores: "channels" {stage s (1-based): [C_s]}, "fc" [cnn_fc] (higher = keep).
    cfg: the model's config (arch "cnn").
    targets: "cnn_channels": one count / fraction for every stage or a sequence (one per stage);
      "cnn_fc": a count / fraction.
  Returns:
    {"channels": [kept channels] per stage, "fc": kept fc units}.
  Raises:
    ConfigError: an arch other than cnn, an unknown key, a wrong number of stage targets or an
      impossible count.
  """
  if cfg.arch != "cnn":
    raise ConfigError(
      "student.arch",
      f"pruning supports arch 'cnn' (SimpleCNN), not {cfg.arch!r}: ResNet / WRN blocks have no "
      "config key for a narrower inner conv and their shortcuts tie the stage widths",
    )
  unknown = sorted(set(targets) - set(CNN_TARGETS))
  if unknown:
    raise ConfigError(f"prune.{unknown[0]}", f"is no CNN target; use {CNN_TARGETS}")
  n = len(cfg.cnn_channels)
  per_stage = targets.get("cnn_channels", 1.0)
  if not isinstance(per_stage, (list, tuple)):
    per_stage = (per_stage,) * n
  if len(per_stage) != n:
    raise ConfigError("prune.cnn_channels", f"needs {n} stage targets, got {len(per_stage)}")
  channels = [
    top_units(scores["channels"][s], resolve_count(t, c, "prune.cnn_channels"))
    for s, (t, c) in enumerate(zip(per_stage, cfg.cnn_channels), 1)
  ]
  fc = top_units(
    scores["fc"], resolve_count(targets.get("cnn_fc", 1.0), cfg.cnn_fc, "prune.cnn_fc")
  )
  return {"channels": channels, "fc": fc}


def prune_cnn(params: Any, cfg: VisionConfig, keep: dict) -> tuple[dict, dict]:
  """A ``SimpleCNN``'s params with the channels ``keep`` drops removed.

  Args:
    params: the model's params (conv_{s}, fc, head).
    cfg: its config (arch "cnn").
    keep: from ``keep_cnn``.
  Returns:
    (new params as host NumPy arrays, {"cnn_channels": "c1,c2,..", "cnn_fc": n} if changed).
  """
  p = jax.tree.map(np.asarray, jax.device_get(params))
  out = {}
  prev = None  # the kept input channels of this stage
  for s, kept in enumerate(keep["channels"], 1):
    kernel = p[f"conv_{s}"]["kernel"]
    kernel = _take(kernel, 2, prev)[..., kept]
    out[f"conv_{s}"] = {"kernel": kernel, "bias": p[f"conv_{s}"]["bias"][kept]}
    prev = kept
  # The fc reads the last maps flattened as (h, w, c), channels fastest.
  c_last = cfg.cnn_channels[-1]
  fc_kernel = p["fc"]["kernel"]
  rows = fc_kernel.shape[0] // c_last
  fc_kernel = fc_kernel.reshape(rows, c_last, -1)[:, prev].reshape(rows * len(prev), -1)
  out["fc"] = {"kernel": fc_kernel[:, keep["fc"]], "bias": p["fc"]["bias"][keep["fc"]]}
  out["head"] = {"kernel": p["head"]["kernel"][keep["fc"]], "bias": p["head"]["bias"]}
  new = {"cnn_channels": ",".join(str(len(k)) for k in keep["channels"])}
  new["cnn_fc"] = len(keep["fc"])
  changed = {}
  if tuple(len(k) for k in keep["channels"]) != tuple(cfg.cnn_channels):
    changed["cnn_channels"] = new["cnn_channels"]
  if new["cnn_fc"] != cfg.cnn_fc:
    changed["cnn_fc"] = new["cnn_fc"]
  return out, changed
