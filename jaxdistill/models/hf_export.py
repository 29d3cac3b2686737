"""jaxdistill models -> Hugging Face layout.

``export`` writes config.json + model.safetensors (+ the tokenizer files, + the
sentence-transformers pooling files for an encoder) that ``transformers`` loads as
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``GPT2LMHeadModel`` / ``BertModel``. It inverts
``hf.param_map``: the same table drives import and export, so they cannot drift apart. Only
the model's params are written; a distillation run's projection heads (``TrainState.params
["proj"]``) are not model params and are never passed here.
"""

import json
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import save, save_file

from jaxdistill import paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.models import hf
from jaxdistill.models.transformer_config import TransformerConfig


def hf_model_for(config: TransformerConfig):
  """The HF architecture a jaxdistill model exports as (an ``hf.HFModel``).

  Args:
    config: the model's config (``encoder``: BERT).
  Raises:
    JaxdistillError: no supported HF architecture computes what this config computes.
  """
  c = config
  if c.encoder:
    return hf.HFModel("bert", c)
  if (c.norm, c.pos, c.activation) == ("rmsnorm", "rope", "swiglu") and c.bias != "all":
    return hf.HFModel("qwen2" if c.bias == "qkv" else "llama", c)
  if (c.norm, c.pos, c.activation, c.bias, c.tie_embeddings) == (
    "layernorm",
    "learned",
    "gelu",
    "all",
    True,
  ) and (c.kv_heads == c.num_heads):
    return hf.HFModel("gpt2", c)
  raise JaxdistillError(
    f"no Hugging Face architecture matches norm={c.norm}, pos={c.pos}, activation="
    f"{c.activation}, bias={c.bias}, tie_embeddings={c.tie_embeddings}: export supports "
    "Llama/Qwen2 (rmsnorm, rope, swiglu) and GPT-2 (layernorm, learned, gelu, bias=all, tied)"
  )


def hf_config(hfm: hf.HFModel) -> dict:
  """The config.json dict of ``hfm`` (float32 weights)."""
  c = hfm.config
  if hfm.model_type in ("gpt2", "bert") and c.num_heads * c.head_dim != c.d_model:
    # Their HF configs derive the head width from hidden_size: a head-pruned model has none.
    raise JaxdistillError(
      f"{hfm.model_type} export needs num_heads * head_dim == d_model, got {c.num_heads} * "
      f"{c.head_dim} != {c.d_model} (a head-pruned model); only Llama / Qwen2 store head_dim"
    )
  if hfm.model_type == "gpt2":
    return dict(
      architectures=["GPT2LMHeadModel"],
      model_type="gpt2",
      vocab_size=c.vocab_size,
      n_embd=c.d_model,
      n_layer=c.num_layers,
      n_head=c.num_heads,
      n_inner=c.d_ff,
      n_positions=c.max_len,
      activation_function="gelu_new",
      layer_norm_epsilon=c.norm_eps,
      tie_word_embeddings=True,
      bos_token_id=0,  # jaxdistill's tokenizers end documents with id 0
      eos_token_id=0,
      torch_dtype="float32",
    )
  sizes = dict(
    vocab_size=c.vocab_size,
    hidden_size=c.d_model,
    num_hidden_layers=c.num_layers,
    num_attention_heads=c.num_heads,
    intermediate_size=c.d_ff,
    max_position_embeddings=c.max_len,
    torch_dtype="float32",
  )
  if hfm.model_type == "bert":
    return dict(
      architectures=["BertModel"],
      model_type="bert",
      **sizes,
      hidden_act="gelu",
      layer_norm_eps=c.norm_eps,
      type_vocab_size=max(c.type_vocab_size, 1),
      position_embedding_type="absolute",
      pad_token_id=0,
    )
  arch = "Qwen2ForCausalLM" if hfm.model_type == "qwen2" else "LlamaForCausalLM"
  return dict(
    architectures=[arch],
    model_type=hfm.model_type,
    **sizes,
    num_key_value_heads=c.kv_heads,
    head_dim=c.head_dim,
    hidden_act="silu",
    rms_norm_eps=c.norm_eps,
    rope_theta=c.rope_base,  # transformers 4; 5 reads rope_parameters
    rope_parameters=dict(rope_theta=c.rope_base, rope_type="default"),
    tie_word_embeddings=c.tie_embeddings,
    attention_bias=False,
    mlp_bias=False,
  )


def _inverse(s: hf.Source, x: np.ndarray) -> tuple[tuple, np.ndarray]:
  """(region of the HF tensor, its value) for the jaxdistill param ``x`` (inverse of hf._read)."""
  full = (slice(None),) * len(s.shape)
  if s.op == "copy":
    return full, x
  if s.op == "t":
    return full, x.T
  if s.op in ("heads_in", "heads_in_c"):
    flat = x.reshape(x.shape[0], -1)  # [D, H*K]
    span = slice(s.offset, s.offset + flat.shape[1])  # rows of a Linear, columns of a Conv1D
    return ((span, slice(None)), flat.T) if s.op == "heads_in" else ((slice(None), span), flat)
  if s.op in ("heads_out", "heads_out_c"):
    flat = x.reshape(-1, x.shape[-1])  # [H*K, D]
    return full, (flat.T if s.op == "heads_out" else flat)
  if s.op == "bias_heads":
    return (slice(s.offset, s.offset + x.size),), x.reshape(-1)
  raise AssertionError(f"unknown op {s.op}")


def hf_tensors(hfm: hf.HFModel, params: Any) -> dict[str, np.ndarray]:
  """The HF state dict (float32 numpy) of jaxdistill ``params``."""
  specs = hf.param_map(hfm)
  flat = {
    tuple(k.key for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  }
  missing = sorted(set(specs) - set(flat))
  if missing:
    raise JaxdistillError(f"the params lack {'/'.join(missing[0])} for a {hfm.model_type} export")
  # The base model's prefix as transformers' *ForCausalLM / GPT2LMHeadModel / BertModel save it.
  prefix = {"llama": "model.", "qwen2": "model.", "gpt2": "transformer."}.get(hfm.model_type, "")
  out: dict[str, np.ndarray] = {}
  for key, s in specs.items():
    name = s.name if s.absolute else prefix + s.name
    buf = out.setdefault(name, np.zeros(s.shape, np.float32))
    region, value = _inverse(s, np.asarray(jax.device_get(flat[key]), np.float32))
    buf[region] = value
  if hfm.is_encoder and not hfm.config.type_vocab_size:  # BertModel always has one type row
    out["embeddings.token_type_embeddings.weight"] = np.zeros((1, hfm.config.d_model), np.float32)
  return out


def export(
  params: Any, hfm: hf.HFModel, out_dir: str, tokenizer_dir: str | None = None, seq_len: int = 0
) -> None:
  """Writes ``params`` as an HF model directory ``out_dir`` (created; must be empty or new).

  Args:
    params: the model's params (no projection heads), sharded or not.
    hfm: the architecture (``hf.read_config`` of the teacher, or ``hf_model_for``).
    out_dir: the directory to write, local or remote (``gs://``).
    tokenizer_dir: a directory whose tokenizer files are copied along (optional).
    seq_len: an encoder's max_seq_length for sentence-transformers (0: config.max_len).
  """
  if paths.isdir(out_dir) and paths.listdir(out_dir):
    raise JaxdistillError(f"{out_dir!r} is not empty; export into a new directory")
  paths.makedirs(out_dir)
  tensors, weights = hf_tensors(hfm, params), paths.join(out_dir, hf.SINGLE_FILE)
  if paths.is_remote(weights):  # safetensors writes local files: a remote one as bytes
    paths.write_bytes(weights, save(tensors, {"format": "pt"}))
  else:  # written by the library, without a second copy of the weights in memory
    save_file(tensors, weights, {"format": "pt"})
  _write_json(paths.join(out_dir, "config.json"), hf_config(hfm))
  for name in hf.TOKENIZER_FILES if tokenizer_dir else ():
    if paths.isfile(paths.join(tokenizer_dir, name)):
      paths.copy(paths.join(tokenizer_dir, name), paths.join(out_dir, name))
  if hfm.is_encoder:
    # sentence-transformers: Transformer -> mean Pooling -> Normalize (what Encoder computes).
    modules = [
      dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
      dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling"),
      dict(idx=2, name="2", path="2_Normalize", type="sentence_transformers.models.Normalize"),
    ]
    _write_json(paths.join(out_dir, "modules.json"), modules)
    pooling = dict(word_embedding_dimension=hfm.config.d_model, pooling_mode_mean_tokens=True)
    _write_json(paths.join(out_dir, "1_Pooling", "config.json"), pooling)
    bert_cfg = dict(max_seq_length=seq_len or hfm.config.max_len, do_lower_case=False)
    _write_json(paths.join(out_dir, "sentence_bert_config.json"), bert_cfg)


def _write_json(path: str, obj: Any) -> None:
  paths.makedirs(paths.path(path).parent)
  paths.write_text(path, json.dumps(obj, indent=2) + "\n")
