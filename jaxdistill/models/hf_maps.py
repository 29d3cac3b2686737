"""Which Hugging Face tensor each jaxdistill param comes from, per architecture.

``tensor_map(model_type, config)`` maps every param path of the model (a tuple of names under
"params", e.g. ("block_0", "attn", "query", "kernel")) to a ``Source``: the HF tensor's name
(under the base model's prefix unless ``absolute``), its shape, and the op that turns it into the
param (see ``hf.py`` for the ops). ``hf.load`` reads through this table and ``hf_export`` inverts
it, so import and export cannot drift apart.
"""

import dataclasses

from jaxdistill.models.transformer_config import TransformerConfig


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one param comes from: HF tensor ``name`` of shape ``shape`` through ``op``."""

  name: str
  op: str
  shape: tuple[int, ...]
  offset: int = 0
  absolute: bool = False  # the name is not under the base model's prefix (lm_head)


def _llama_map(c: TransformerConfig, bias: bool) -> dict:
  d, f, hk, kvk = c.d_model, c.d_ff, c.num_heads * c.head_dim, c.kv_heads * c.head_dim
  m = {("token_embed", "embedding"): Source("embed_tokens.weight", "copy", (c.vocab_size, d))}
  for i in range(c.num_layers):
    p, b = f"layers.{i}.", f"block_{i}"
    m[(b, "attn_norm", "scale")] = Source(p + "input_layernorm.weight", "copy", (d,))
    m[(b, "mlp_norm", "scale")] = Source(p + "post_attention_layernorm.weight", "copy", (d,))
    for mine, theirs, rows in (("query", "q", hk), ("key", "k", kvk), ("value", "v", kvk)):
      m[(b, "attn", mine, "kernel")] = Source(
        f"{p}self_attn.{theirs}_proj.weight", "heads_in", (rows, d)
      )
      if bias:
        m[(b, "attn", mine, "bias")] = Source(
          f"{p}self_attn.{theirs}_proj.bias", "bias_heads", (rows,)
        )
    m[(b, "attn", "out", "kernel")] = Source(p + "self_attn.o_proj.weight", "heads_out", (d, hk))
    for mine, theirs, shape in (
      ("wi_gate", "gate", (f, d)),
      ("wi_up", "up", (f, d)),
      ("wo", "down", (d, f)),
    ):
      m[(b, "mlp", mine, "kernel")] = Source(f"{p}mlp.{theirs}_proj.weight", "t", shape)
  m[("final_norm", "scale")] = Source("norm.weight", "copy", (d,))
  if not c.tie_embeddings:
    m[("lm_head", "kernel")] = Source("lm_head.weight", "t", (c.vocab_size, d), absolute=True)
  return m


def _gpt2_map(c: TransformerConfig) -> dict:
  d, f = c.d_model, c.d_ff
  m = {
    ("token_embed", "embedding"): Source("wte.weight", "copy", (c.vocab_size, d)),
    ("pos_embed", "embedding"): Source("wpe.weight", "copy", (c.max_len, d)),
  }
  for i in range(c.num_layers):
    p, b = f"h.{i}.", f"block_{i}"
    for mine, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      m[(b, mine, "scale")] = Source(f"{p}{theirs}.weight", "copy", (d,))
      m[(b, mine, "bias")] = Source(f"{p}{theirs}.bias", "copy", (d,))
    for j, mine in enumerate(("query", "key", "value")):
      m[(b, "attn", mine, "kernel")] = Source(
        p + "attn.c_attn.weight", "heads_in_c", (d, 3 * d), j * d
      )
      m[(b, "attn", mine, "bias")] = Source(p + "attn.c_attn.bias", "bias_heads", (3 * d,), j * d)
    m[(b, "attn", "out", "kernel")] = Source(p + "attn.c_proj.weight", "heads_out_c", (d, d))
    m[(b, "attn", "out", "bias")] = Source(p + "attn.c_proj.bias", "copy", (d,))
    m[(b, "mlp", "wi", "kernel")] = Source(p + "mlp.c_fc.weight", "copy", (d, f))
    m[(b, "mlp", "wi", "bias")] = Source(p + "mlp.c_fc.bias", "copy", (f,))
    m[(b, "mlp", "wo", "kernel")] = Source(p + "mlp.c_proj.weight", "copy", (f, d))
    m[(b, "mlp", "wo", "bias")] = Source(p + "mlp.c_proj.bias", "copy", (d,))
  m[("final_norm", "scale")] = Source("ln_f.weight", "copy", (d,))
  m[("final_norm", "bias")] = Source("ln_f.bias", "copy", (d,))
  return m


def _bert_map(c: TransformerConfig) -> dict:
  d, f, e = c.d_model, c.d_ff, "embeddings."
  m = {
    ("token_embed", "embedding"): Source(e + "word_embeddings.weight", "copy", (c.vocab_size, d)),
    ("pos_embed", "embedding"): Source(e + "position_embeddings.weight", "copy", (c.max_len, d)),
    ("embed_norm", "scale"): Source(e + "LayerNorm.weight", "copy", (d,)),
    ("embed_norm", "bias"): Source(e + "LayerNorm.bias", "copy", (d,)),
  }
  if c.type_vocab_size:
    m[("type_embed", "embedding")] = Source(
      e + "token_type_embeddings.weight", "copy", (c.type_vocab_size, d)
    )
  for i in range(c.num_layers):
    p, b = f"encoder.layer.{i}.", f"block_{i}"
    for mine in ("query", "key", "value"):
      m[(b, "attn", mine, "kernel")] = Source(
        f"{p}attention.self.{mine}.weight", "heads_in", (d, d)
      )
      m[(b, "attn", mine, "bias")] = Source(f"{p}attention.self.{mine}.bias", "bias_heads", (d,))
    m[(b, "attn", "out", "kernel")] = Source(
      p + "attention.output.dense.weight", "heads_out", (d, d)
    )
    m[(b, "attn", "out", "bias")] = Source(p + "attention.output.dense.bias", "copy", (d,))
    m[(b, "mlp", "wi", "kernel")] = Source(p + "intermediate.dense.weight", "t", (f, d))
    m[(b, "mlp", "wi", "bias")] = Source(p + "intermediate.dense.bias", "copy", (f,))
    m[(b, "mlp", "wo", "kernel")] = Source(p + "output.dense.weight", "t", (d, f))
    m[(b, "mlp", "wo", "bias")] = Source(p + "output.dense.bias", "copy", (d,))
    for mine, theirs in (
      ("attn_norm", "attention.output.LayerNorm"),
      ("mlp_norm", "output.LayerNorm"),
    ):
      m[(b, mine, "scale")] = Source(f"{p}{theirs}.weight", "copy", (d,))
      m[(b, mine, "bias")] = Source(f"{p}{theirs}.bias", "copy", (d,))
  return m


def tensor_map(model_type: str, config: TransformerConfig) -> dict[tuple[str, ...], Source]:
  """jaxdistill param path -> its HF ``Source``.

  Args:
    model_type: config.json's model_type ("bert", "gpt2"; anything else: the Llama layout).
    config: the model's config.
  Returns:
    One entry per param of the model built from ``config``.
  """
  if model_type == "bert":
    return _bert_map(config)
  if model_type == "gpt2":
    return _gpt2_map(config)
  return _llama_map(config, bias=config.bias == "qkv")
