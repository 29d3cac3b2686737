"""BERT-style bidirectional encoder with sentence-embedding pooling (Flax Linen).

Exactly BERT's forward pass (as ``transformers.BertModel`` without dropout): word + learned
position + token-type embeddings, LayerNorm; then per block post-LayerNorm attention and MLP
(``x = LN(x + attn(x)); x = LN(x + mlp(x))``) with biases everywhere and exact (erf) GELU.
Attention is bidirectional and masked to the valid tokens of the same segment. The pooled
sentence embedding is the mean of the last hidden states over valid tokens, L2-normalised
(sentence-transformers' ``Pooling(mean)`` + ``Normalize``).

``Encoder`` is the model of a ``TransformerConfig`` with ``encoder=True`` (``models.build``
returns it for such a config section), built from the decoder's layers (``Attention``, ``Mlp``,
``Norm`` of ``layers.py``) with norm="layernorm", pos="learned", activation="gelu_erf",
bias="all" (``encoder_config``). It takes the decoder's call and returns the same intermediates
(hidden states, attention probabilities, q/k/v) under the same keys, so the MiniLM attention /
value-relation and hidden-state losses apply unchanged; a run builds, shards, checkpoints and
trains it like any student or teacher.

Shape legend: B batch, T sequence length (S keys), D width, H heads, K head dim, L blocks.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models import layers, scan
from jaxdistill.models.transformer_config import TransformerConfig, check_layers

# sentence-transformers' clamps: mean-pooling token count and L2 norm.
_COUNT_EPS = 1e-9
_NORM_EPS = 1e-12


def encoder_config(**kwargs) -> TransformerConfig:
  """A ``TransformerConfig`` with BERT's choices (layernorm, learned positions, erf GELU, biases).

  Args:
    kwargs: the size fields (vocab_size, d_model, num_layers, num_heads, d_ff, max_len) and any
      other ``TransformerConfig`` field (norm_eps, dtypes).
  """
  base = dict(
    norm="layernorm",
    pos="learned",
    activation="gelu_erf",
    bias="all",
    tie_embeddings=True,
    encoder=True,
    type_vocab_size=2,
  )
  return TransformerConfig(**{**base, **kwargs})


def mean_pool(hidden_BxTxD: jax.Array, valid_BxT: jax.Array) -> jax.Array:
  """L2-normalised mean of ``hidden_BxTxD`` over valid tokens: [B, D] float32.

  Args:
    hidden_BxTxD: last hidden states.
    valid_BxT: 1 / True for real tokens, 0 for padding.
  """
  valid_BxTx1 = valid_BxT.astype(jnp.float32)[..., None]
  sum_BxD = jnp.sum(hidden_BxTxD.astype(jnp.float32) * valid_BxTx1, axis=1)
  mean_BxD = sum_BxD / jnp.maximum(jnp.sum(valid_BxTx1, axis=1), _COUNT_EPS)
  norm_Bx1 = jnp.linalg.norm(mean_BxD, axis=-1, keepdims=True)
  return mean_BxD / jnp.maximum(norm_Bx1, _NORM_EPS)


class EncoderBlock(nn.Module):
  """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x)). Returns as ``layers.Block``."""

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS):
    cfg = self.config
    attn_BxTxD, probs_BxHxTxS, qkv, _ = layers.Attention(cfg, name="attn")(
      x_BxTxD, positions_BxT, mask_Bx1xTxS
    )
    x_BxTxD = layers.Norm(cfg, name="attn_norm")(x_BxTxD + attn_BxTxD)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, layers.ACT_RESIDUAL)
    x_BxTxD = layers.Norm(cfg, name="mlp_norm")(x_BxTxD + layers.Mlp(cfg, name="mlp")(x_BxTxD))
    return nn.with_logical_constraint(x_BxTxD, layers.ACT_RESIDUAL), probs_BxHxTxS, qkv


class Encoder(nn.Module):
  """BERT-style bidirectional encoder with mean pooling.

  Params (under "params"): token_embed/embedding [V, D], pos_embed/embedding [max_len, D],
  type_embed/embedding [type_vocab_size, D] (if > 0), embed_norm/{scale, bias} [D]; block_{i}:
  attn/{query,key,value}/{kernel [D, H, K], bias [H, K]}, attn/out/{kernel [H, K, D], bias
  [D]}, attn_norm, mlp/wi/{kernel [D, F], bias [F]}, mlp/wo/{kernel [F, D], bias [D]},
  mlp_norm. No vocabulary head (sentence encoders drop BERT's MLM head and pooler). These are
  the paths the Hugging Face mapping (``hf.py``) and saved runs use: never rename them.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(
    self,
    tokens_BxT: jax.Array,
    *,
    segment_ids_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    hidden_layers: Sequence[int] = (),
    attn_layers: Sequence[int] = (),
    qkv_layers: Sequence[int] = (),
    return_logits: bool = True,
    token_types_BxT: jax.Array | None = None,
  ) -> dict:
    """The encoder's forward pass.

    Args:
      tokens_BxT: token ids, each row one text ([CLS] ... [SEP]), right-padded.
      segment_ids_BxT: optional; 0 marks padding; tokens attend only within their segment.
        Default: every token valid.
      positions_BxT: optional position ids, default arange(T) (BERT's), must be < max_len.
      hidden_layers, attn_layers, qkv_layers: as ``transformer.Transformer``.
      return_logits: ignored (an encoder has no logits); taken so that one request serves
        decoders and encoders alike.
      token_types_BxT: optional token-type ids (default 0: single-sentence inputs).
    Returns:
      dict: "embedding" [B, D] float32 (mean over valid tokens, L2-normalised), "final_hidden"
      [B, T, D] compute dtype, and the requested "hidden" / "attn" / "qkv" as
      ``transformer.Transformer``.
    """
    del return_logits
    cfg = self.config
    b, t = tokens_BxT.shape
    hidden_layers = check_layers("hidden_layers", hidden_layers, cfg.num_layers)
    attn_layers = check_layers("attn_layers", attn_layers, cfg.num_layers - 1)
    qkv_layers = check_layers("qkv_layers", qkv_layers, cfg.num_layers - 1)
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {cfg.max_len}")
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    valid_BxT = segment_ids_BxT != 0
    # Keys must be valid and in the query's segment. A padding query sees no key: its softmax
    # is uniform (finite), and nothing downstream reads it.
    same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    mask_Bx1xTxS = (same_BxTxS & valid_BxT[:, None, :])[:, None]

    x_BxTxD = _embed(cfg, tokens_BxT, positions_BxT, token_types_BxT)
    hidden = {0: x_BxTxD} if 0 in hidden_layers else {}
    attn, qkv = {}, {}
    block = scan.block_class(cfg, scanned=False, cls=EncoderBlock)  # config.remat
    for i in range(cfg.num_layers):
      x_BxTxD, probs_BxHxTxS, qkv_i = block(cfg, name=f"block_{i}")(
        x_BxTxD, positions_BxT, mask_Bx1xTxS
      )
      if i + 1 in hidden_layers:
        hidden[i + 1] = x_BxTxD
      if i in attn_layers:
        attn[i] = probs_BxHxTxS
      if i in qkv_layers:
        qkv[i] = qkv_i
    out = {"embedding": mean_pool(x_BxTxD, valid_BxT), "final_hidden": x_BxTxD}
    for key, value in (("hidden", hidden), ("attn", attn), ("qkv", qkv)):
      if value:
        out[key] = value
    return out


def _embed(cfg, tokens_BxT, positions_BxT, token_types_BxT):
  """LayerNorm(word + position + token-type embeddings): [B, T, D] compute dtype."""

  def lookup(name, rows, names, ids_BxT):
    table = nn.Embed(
      rows,
      cfg.d_model,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name=name,
      embedding_init=layers.param_init(names),
    )
    return layers.embed_lookup(table, ids_BxT, names[0])

  x_BxTxD = lookup("token_embed", cfg.vocab_size, ("vocab", "embed"), tokens_BxT)
  x_BxTxD = x_BxTxD + lookup("pos_embed", cfg.max_len, (None, "embed"), positions_BxT)
  if cfg.type_vocab_size:
    if token_types_BxT is None:
      token_types_BxT = jnp.zeros_like(tokens_BxT)
    x_BxTxD = x_BxTxD + lookup("type_embed", cfg.type_vocab_size, (None, "embed"), token_types_BxT)
  x_BxTxD = layers.Norm(cfg, name="embed_norm")(x_BxTxD)
  return nn.with_logical_constraint(x_BxTxD, layers.ACT_RESIDUAL)
