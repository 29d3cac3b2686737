"""Hugging Face checkpoints -> jaxdistill models (export: hf_export.py; tensor table: hf_maps.py).

A Hugging Face model directory holds ``config.json``, the weights as ``model.safetensors`` or
as shards listed in ``model.safetensors.index.json`` (only safetensors: pickles are never
loaded), and usually ``tokenizer.json``. Supported ``model_type`` values:

  llama, mistral, qwen2   decoder: RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU
                          (Qwen2: biases on q/k/v)
  gpt2                    decoder: LayerNorm, learned positions, tanh GELU, biases, tied head
  bert                    encoder (``models/bert.py``), pooled by mean + L2 normalise

Not supported (an error naming the config.json key): RoPE scaling, Llama's attention/MLP
biases, head_dim != hidden_size / heads, other activations. Mistral's (and Qwen2's optional)
sliding-window attention is not applied: exact for sequences up to ``sliding_window`` tokens.

``load`` reads tensor by tensor straight into the target shardings: for every device's shard
``jax.make_array_from_callback`` asks for a slice, and only that slice of the tensor is read
from disk (safetensors slicing) and converted to the param dtype; no host ever holds a whole
sharded tensor, let alone the whole model. ``export`` writes the reverse mapping (student
params only: projection heads used for distillation are not params of the model).

Each jaxdistill param comes from one HF tensor through one of these ops (shapes are
jaxdistill's; HF Linear weights are [out, in], GPT-2 Conv1D weights [in, out]):

  copy         same shape
  t            [A, B] = hf[B, A].T
  heads_in     [D, H, K] from Linear [H*K (+offset), D]
  heads_in_c   [D, H, K] from Conv1D [D, (offset +) H*K] (GPT-2's fused c_attn)
  heads_out    [H, K, D] from Linear [D, H*K]
  heads_out_c  [H, K, D] from Conv1D [H*K, D]
  bias_heads   [H, K] from [(offset +) H*K]
"""

import contextlib
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for bf16 checkpoints)
import numpy as np
from safetensors import safe_open

from jaxdistill import paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import api, bert, hf_maps
from jaxdistill.models import scan as scan_lib
from jaxdistill.models.hf_maps import Source
from jaxdistill.models.transformer_config import EXECUTION_KEYS, MODEL_KEYS, TransformerConfig
from jaxdistill.parallel import sharding as sharding_lib

DECODERS = ("llama", "mistral", "qwen2", "gpt2")
ENCODERS = ("bert",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "vocab.txt",
)
# Where the base model's tensors may sit in a checkpoint (e.g. "bert." in BertForMaskedLM).
_PREFIXES = ("", "model.", "transformer.", "bert.")


@dataclasses.dataclass(frozen=True)
class HFModel:
  """A supported HF architecture as a jaxdistill model.

  Attributes:
    model_type: config.json's ``model_type``.
    config: the equivalent ``TransformerConfig`` (``encoder=True`` for BERT).
  """

  model_type: str
  config: TransformerConfig

  @property
  def is_encoder(self) -> bool:
    return self.config.encoder

  def module(self) -> nn.Module:
    """The Flax module: a ``transformer.Transformer``, or a ``bert.Encoder`` for BERT."""
    return api.module_for(self.config)


def _read_json(path: str) -> dict:
  """A JSON file of a model directory, local or remote (``gs://``: read through epath)."""
  if not paths.isfile(path):
    where = paths.path(path)
    raise JaxdistillError(f"no {where.name} in {str(where.parent)!r}")
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise JaxdistillError(f"{path!r} is not valid JSON: {e}") from None


def _need(hf: dict, key: str, where: str):
  if key not in hf:
    raise JaxdistillError(f"{where} lacks {key!r}")
  return hf[key]


def read_config(path: str, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32) -> HFModel:
  """The ``HFModel`` of the HF directory ``path`` (reads only config.json).

  Args:
    path: an HF model directory.
    dtype, param_dtype: compute and param dtypes of the jaxdistill model.
  Raises:
    JaxdistillError: missing/bad config.json or an unsupported architecture or feature.
  """
  where = paths.join(path, "config.json")
  hf = _read_json(where)
  kind = hf.get("model_type")
  need = lambda key: _need(hf, key, where)  # noqa: E731
  common = dict(dtype=dtype, param_dtype=param_dtype, output_dtype=jnp.float32)
  family = {"llama": _llama, "mistral": _llama, "qwen2": _llama, "gpt2": _gpt2, "bert": _bert}
  if kind not in family:
    raise JaxdistillError(
      f"{where}: model_type {kind!r} is not supported; supported: {', '.join(DECODERS + ENCODERS)}"
    )
  return HFModel(kind, family[kind](hf, kind, where, need, common))


def _llama(hf: dict, kind: str, where: str, need, common: dict) -> TransformerConfig:
  """Llama, Mistral and Qwen2: RMSNorm, RoPE, SwiGLU, grouped-query attention."""
  if hf.get("hidden_act", "silu") != "silu":
    raise JaxdistillError(f"{where}: hidden_act {hf['hidden_act']!r} unsupported (silu only)")
  # transformers 4 writes rope_theta / rope_scaling, 5 writes rope_parameters.
  rope = dict(hf.get("rope_scaling") or {}, **(hf.get("rope_parameters") or {}))
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise JaxdistillError(f"{where}: RoPE scaling {rope!r} is not supported")
  if hf.get("mlp_bias") or (kind != "qwen2" and hf.get("attention_bias")):
    raise JaxdistillError(f"{where}: attention_bias / mlp_bias are not supported")
  heads = need("num_attention_heads")
  if hf.get("head_dim") not in (None, need("hidden_size") // heads):
    raise JaxdistillError(f"{where}: head_dim != hidden_size / num_attention_heads unsupported")
  return TransformerConfig(
    vocab_size=need("vocab_size"),
    d_model=need("hidden_size"),
    num_layers=need("num_hidden_layers"),
    num_heads=heads,
    d_ff=need("intermediate_size"),
    max_len=need("max_position_embeddings"),
    tie_embeddings=bool(hf.get("tie_word_embeddings", kind == "qwen2")),
    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
    num_kv_heads=hf.get("num_key_value_heads") or heads,
    bias="qkv" if kind == "qwen2" else "none",
    **common,
  )


def _gpt2(hf: dict, kind: str, where: str, need, common: dict) -> TransformerConfig:
  """GPT-2: LayerNorm, learned positions, tanh GELU, biases everywhere."""
  if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
    raise JaxdistillError(f"{where}: activation_function must be gelu_new")
  d = need("n_embd")
  return TransformerConfig(
    vocab_size=need("vocab_size"),
    d_model=d,
    num_layers=need("n_layer"),
    num_heads=need("n_head"),
    d_ff=hf.get("n_inner") or 4 * d,
    max_len=need("n_positions"),
    norm="layernorm",
    pos="learned",
    activation="gelu",
    tie_embeddings=True,
    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    bias="all",
    **common,
  )


def _bert(hf: dict, kind: str, where: str, need, common: dict) -> TransformerConfig:
  """BERT: the post-norm encoder (``bert.encoder_config``)."""
  if hf.get("hidden_act", "gelu") != "gelu":
    raise JaxdistillError(f"{where}: hidden_act {hf['hidden_act']!r} unsupported (gelu only)")
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise JaxdistillError(f"{where}: only absolute position embeddings are supported")
  return bert.encoder_config(
    vocab_size=need("vocab_size"),
    d_model=need("hidden_size"),
    num_layers=need("num_hidden_layers"),
    num_heads=need("num_attention_heads"),
    d_ff=need("intermediate_size"),
    max_len=need("max_position_embeddings"),
    norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
    type_vocab_size=int(hf.get("type_vocab_size", 2)),
    **common,
  )


def param_map(hfm: HFModel) -> dict[tuple[str, ...], Source]:
  """jaxdistill param path (tuple of names under "params") -> its HF ``Source`` (hf_maps.py)."""
  return hf_maps.tensor_map(hfm.model_type, hfm.config)


def _bounds(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """A device's index (tuple of slices) as ((start, stop), ...) per dim."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _read(src: Any, s: Source, bounds: tuple, shape: tuple[int, ...]) -> np.ndarray:
  """The block ``bounds`` of the jaxdistill param, reading only what it needs of ``src``.

  Args:
    src: a safetensors slice (or numpy array) of the HF tensor.
    s: the param's Source.
    bounds: ((start, stop), ...) in the jaxdistill param's coordinates.
    shape: the jaxdistill param's full shape.
  """
  sl = [slice(a, b) for a, b in bounds]
  if s.op == "copy":
    return src[tuple(sl)]
  if s.op == "t":
    return src[sl[1], sl[0]].T
  if s.op in ("heads_in", "heads_in_c"):
    k = shape[2]
    (d0, d1), (h0, h1), _ = bounds
    rows = slice(s.offset + h0 * k, s.offset + h1 * k)
    x = src[rows, sl[0]].T if s.op == "heads_in" else src[sl[0], rows]
    return x.reshape(d1 - d0, h1 - h0, k)[:, :, sl[2]]
  if s.op in ("heads_out", "heads_out_c"):
    k = shape[1]
    (h0, h1), _, (d0, d1) = bounds
    rows = slice(h0 * k, h1 * k)
    x = src[sl[2], rows].T if s.op == "heads_out" else src[rows, sl[2]]
    return x.reshape(h1 - h0, k, d1 - d0)[:, sl[1], :]
  if s.op == "bias_heads":
    k = shape[1]
    (h0, h1), _ = bounds
    return src[s.offset + h0 * k : s.offset + h1 * k].reshape(h1 - h0, k)[:, sl[1]]
  raise AssertionError(f"unknown op {s.op}")


class _Tensors(contextlib.ExitStack):
  """Lazily opened safetensors files of an HF directory: ``get(name)`` -> (slice, file)."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
      self.where = dict(_need(_read_json(index), "weight_map", index))
    elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
      self.where = None
    else:
      raise JaxdistillError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r} (only safetensors checkpoints load)"
      )
    self._open: dict[str, Any] = {}

  def _file(self, fname: str):
    if fname not in self._open:
      full = os.path.join(self.path, fname)
      if not os.path.isfile(full):
        raise JaxdistillError(f"{INDEX_FILE} in {self.path!r} lists {fname!r}, which is missing")
      self._open[fname] = self.enter_context(safe_open(full, framework="np"))
    return self._open[fname]

  def names(self) -> set[str]:
    return set(self.where) if self.where is not None else set(self._file(SINGLE_FILE).keys())

  def get(self, name: str):
    if self.where is not None and name not in self.where:
      raise JaxdistillError(
        f"tensor {name!r} is missing from {os.path.join(self.path, INDEX_FILE)!r}"
      )
    fname = SINGLE_FILE if self.where is None else self.where[name]
    handle = self._file(fname)
    if name not in handle.keys():
      raise JaxdistillError(f"tensor {name!r} is missing from {os.path.join(self.path, fname)!r}")
    return handle.get_slice(name), fname


def _prefix(specs: dict, names: set[str], path: str) -> str:
  anchor = specs[("token_embed", "embedding")].name
  for prefix in _PREFIXES:
    if prefix + anchor in names:
      return prefix
  raise JaxdistillError(f"tensor {anchor!r} (under any of {_PREFIXES}) is missing from {path!r}")


def abstract_params(module: nn.Module, max_len: int) -> Any:
  """``module``'s params as ShapeDtypeStructs, boxed with their logical axis names."""
  init = lambda r: api.init_variables(module, r, min(8, max_len))["params"]
  return jax.eval_shape(init, jax.random.key(0))


def load(
  path: str, hfm: HFModel | None = None, mesh: Any = None, rules: Any = None
) -> tuple[HFModel, Any]:
  """Loads an HF directory's weights, tensor by tensor, into their shardings.

  Args:
    path: the HF model directory.
    hfm: the model to load into (default ``read_config(path)``, float32).
    mesh: a jaxdistill mesh; params are sharded by its logical rules. None: one device.
    rules: the rules table (None: ``sharding.LOGICAL_RULES``; a teacher's own: ``placement``).
  Returns:
    (hfm, params): params is a pytree of jax.Arrays in ``hfm.config.param_dtype``; in the
    scanned layout (``models.scan``) when ``hfm.config.scan_layers``: the blocks are read
    unrolled, as Hugging Face stores them, then stacked.
  Raises:
    JaxdistillError: missing files or tensors (named with their file), wrong shapes.
  """
  hfm = hfm or read_config(path)
  boxed = abstract_params(hfm.module(), hfm.config.max_len)
  abstract = nn.unbox(boxed)
  if mesh is not None:
    shardings = sharding_lib.shardings_of(boxed, mesh, rules)
  else:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, abstract)
  if hfm.config.scan_layers:
    unrolled = dataclasses.replace(hfm, config=dataclasses.replace(hfm.config, scan_layers=False))
    _, params = load(path, unrolled, mesh, rules)
    return hfm, jax.jit(scan_lib.stack_blocks, out_shardings=shardings)(params)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  flat_shardings = treedef.flatten_up_to(shardings)
  with _Tensors(path) as tensors:
    sources = _checked_sources(path, hfm, tensors, flat)
    leaves = [
      _make_array(src, s, leaf, sharding)
      for (src, s), (_, leaf), sharding in zip(sources, flat, flat_shardings)
    ]
  return hfm, jax.tree_util.tree_unflatten(treedef, leaves)


def check_shapes(path: str, config: Any) -> None:
  """Checks an HF directory against a model config from its headers alone (nothing is read
  but config.json and the safetensors headers: how a 70B teacher is described abstractly).

  Args:
    path: the HF model directory.
    config: the ``TransformerConfig`` the run builds for it (its shape keys must be the ones
      config.json implies).
  Raises:
    JaxdistillError: missing files or tensors, or a tensor whose shape differs.
  """
  config = dataclasses.replace(config, scan_layers=False)  # Hugging Face stores blocks unrolled
  hfm = HFModel(read_config(path).model_type, config)
  abstract = nn.unbox(abstract_params(hfm.module(), config.max_len))
  with _Tensors(path) as tensors:
    _checked_sources(path, hfm, tensors, jax.tree_util.tree_flatten_with_path(abstract)[0])


def _checked_sources(path: str, hfm: HFModel, tensors: "_Tensors", flat: list) -> list:
  """(safetensors slice, Source) of each (key path, leaf) of the model's params, each tensor's
  header shape checked against what config.json implies."""
  specs = param_map(hfm)
  prefix = _prefix(specs, tensors.names(), path)
  out = []
  for key_path, _ in flat:
    s = specs[tuple(k.key for k in key_path)]
    name = s.name if s.absolute else prefix + s.name
    src, fname = tensors.get(name)
    if tuple(src.get_shape()) != s.shape:
      raise JaxdistillError(
        f"tensor {name!r} in {os.path.join(path, fname)!r} has shape {tuple(src.get_shape())}, "
        f"config.json implies {s.shape}"
      )
    out.append((src, s))
  return out


def _make_array(src: Any, s: Source, leaf: Any, sharding: Any) -> jax.Array:
  """One param built from per-device slices of ``src`` (each distinct slice read once)."""
  cache: dict = {}

  def block(index):
    key = _bounds(index, leaf.shape)
    if key not in cache:
      cache[key] = np.ascontiguousarray(_read(src, s, key, leaf.shape)).astype(leaf.dtype)
    return cache[key]

  return jax.make_array_from_callback(leaf.shape, sharding, block)


def model_keys(path: str) -> dict[str, Any]:
  """The ``student`` / ``teacher`` config model keys describing the HF model at ``path``.

  E.g. ``cfg.teacher.update(source="hf", path=path, **hf.model_keys(path))``.
  """
  config = read_config(path).config
  # scan_layers / remat say how a model runs, not what it is: the section keeps its own.
  return {key: getattr(config, key) for key in MODEL_KEYS if key not in EXECUTION_KEYS}
