"""Decoder-only causal Transformer LM (Flax Linen), used as teacher and student.

``Transformer(config).apply(params, tokens_BxT, ...)`` returns a dict with exactly the requested
outputs (logits, or final hidden + head matrix for a fused loss; optional per-layer hidden states,
attention probabilities and q/k/v). Every param carries logical axis names and the main
activations carry logical constraints; without an active ``nn.logical_axis_rules`` context those
are no-ops, so the model runs unchanged on one device. The layers (norms, RoPE, attention,
MLP, block, the FP8-capable ``EinsumDense``) live in ``layers.py``, shared with ``bert.py``;
this module holds the config, the model and its parameter / FLOP counts.

Shape-letter legend:
  B: batch size
  T: sequence length (S for the key axis of attention, S == T)
  D: model width (d_model)
  H: number of attention heads
  K: head dimension (D // H)
  F: MLP hidden width (d_ff)
  V: vocabulary size
  L: number of blocks (num_layers)
"""

import dataclasses
import math
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models.layers import (
  ACT_LOGITS,
  ACT_RESIDUAL,
  Block,
  EinsumDense,
  Norm,
  param_init,
  embed_lookup,
  make_attention_mask,
)

_NORMS = ("rmsnorm", "layernorm")
_POSITIONS = ("rope", "learned")
_ACTIVATIONS = ("swiglu", "gelu", "gelu_erf")  # gelu: tanh approximation (GPT-2); gelu_erf: BERT
_BIASES = ("none", "qkv", "all")  # which projections carry a bias (qkv: Qwen2; all: GPT-2, BERT)


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters and precision policy of a ``Transformer``.

  ``dtype`` is the compute dtype (activations, matmuls), ``param_dtype`` the storage dtype of
  params, ``output_dtype`` the dtype of returned logits. ``fp8``: the ``EinsumDense`` projections
  run through Flax's ``Fp8Einsum`` (e4m3 forward, e5m2 gradients, delayed scaling from
  ``fp8_history``-long amax histories in the ``_overwrite_with_gradient`` collection); the
  vocabulary head stays in ``dtype``. ``head_dim`` (K) = d_model // num_heads. ``num_kv_heads``
  (0 = num_heads) < num_heads is grouped-query attention (key/value heads shared by
  num_heads // num_kv_heads query heads). ``bias``: "none", "qkv" (query/key/value) or "all"
  (every projection but the vocabulary head). ``encoder``: the model is the post-norm,
  bidirectional, mean-pooling encoder of ``models/bert.py`` (same call and outputs, plus
  "embedding"). Invalid values raise ValueError naming the field.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  max_len: int
  norm: str = "rmsnorm"
  pos: str = "rope"
  tie_embeddings: bool = True
  activation: str = "swiglu"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  fp8: bool = False
  fp8_history: int = 1024
  norm_eps: float = 1e-6
  rope_base: float = 10000.0
  num_kv_heads: int = 0
  bias: str = "none"
  # A bidirectional BERT-style encoder (models/bert.py) instead of a causal LM.
  encoder: bool = False
  type_vocab_size: int = 0  # encoder only: token-type embedding rows (0 = none)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
      value = getattr(self, name)
      if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.d_model % self.num_heads:
      raise ValueError(
        f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})"
      )
    if not _is_int(self.num_kv_heads) or self.num_kv_heads < 0 or (self.num_heads % self.kv_heads):
      raise ValueError(
        f"num_kv_heads must be 0 or divide num_heads ({self.num_heads}), got {self.num_kv_heads!r}"
      )
    choices = (("norm", _NORMS), ("pos", _POSITIONS), ("activation", _ACTIVATIONS))
    for name, allowed in choices + (("bias", _BIASES),):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.pos == "rope" and self.head_dim % 2:
      raise ValueError(
        f"pos='rope' needs an even head_dim (d_model // num_heads), got {self.head_dim}"
      )
    if not self.norm_eps > 0:
      raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
    if not self.rope_base > 0:
      raise ValueError(f"rope_base must be > 0, got {self.rope_base!r}")
    if not _is_int(self.type_vocab_size) or self.type_vocab_size < 0:
      raise ValueError(f"type_vocab_size must be an int >= 0, got {self.type_vocab_size!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Number of key/value heads (num_kv_heads, or num_heads when it is 0)."""
    return self.num_kv_heads or self.num_heads


def _check_layers(name: str, layers: Sequence[int], upper: int) -> tuple[int, ...]:
  layers = tuple(layers)
  for i in layers:
    if not _is_int(i) or not 0 <= i <= upper:
      raise ValueError(f"{name} index {i!r} out of range [0, {upper}]")
  return layers


class Transformer(nn.Module):
  """Decoder-only causal LM.

  Params (under "params"): token_embed/embedding [V, D]; pos_embed/embedding [max_len, D]
  (pos="learned" only); block_{i} for i < L: attn_norm, attn/{query,key,value}/kernel [D, H, K],
  attn/out/kernel [H, K, D], mlp_norm, mlp/{wi_gate, wi_up | wi}/kernel [D, F], mlp/wo/kernel
  [F, D]; final_norm; lm_head/kernel [D, V] (untied only). Norms hold scale [D] (+ bias [D]
  for layernorm). key/value kernels are [D, num_kv_heads, K] with grouped-query attention;
  projections with a bias (``config.bias``) hold ``bias`` of their output shape ([H, K] or [D]).
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
    """Runs the model (``config.encoder``: the encoder of ``models/bert.py``, see there).

    Args:
      tokens_BxT: int token ids; T <= max_len.
      segment_ids_BxT: optional document ids of packed rows (0 = padding); attention never
        crosses segments.
      positions_BxT: optional position ids (default arange(T) in every row); with
        pos="learned" they must be < max_len (out-of-range rows read as NaN, jnp.take's fill).
      hidden_layers: indices in [0, L]: 0 = embedding output, i = output of block i (1-based).
      attn_layers: block indices in [0, L-1] whose attention probabilities to return.
      qkv_layers: block indices in [0, L-1] whose q, k (after RoPE) and v to return.
      return_logits: if False, return "final_hidden" and "head" instead of "logits" (for
        fused losses that never materialize [B, T, V]).
      token_types_BxT: encoder only: token-type ids (default 0).
    Returns:
      dict with only the requested keys: "logits" [B, T, V] output_dtype, or "final_hidden"
      [B, T, D] and "head" [D, V] (compute dtype; logits = final_hidden @ head); "hidden"
      {i: [B, T, D] compute dtype}; "attn" {i: [B, H, T, T] float32}; "qkv" {i: (q, k, v)
      each [B, T, H, K]}.
    """
    cfg = self.config
    if cfg.encoder:
      from jaxdistill.models import bert

      return bert.encode(
        self, tokens_BxT, segment_ids_BxT, positions_BxT, token_types_BxT, hidden_layers,
        attn_layers, qkv_layers,
      )  # fmt: skip
    b, t = tokens_BxT.shape
    hidden_layers = _check_layers("hidden_layers", hidden_layers, cfg.num_layers)
    attn_layers = _check_layers("attn_layers", attn_layers, cfg.num_layers - 1)
    qkv_layers = _check_layers("qkv_layers", qkv_layers, cfg.num_layers - 1)
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {cfg.max_len}")
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    token_embed, x_BxTxD = self._embed(tokens_BxT, positions_BxT)
    mask_Bx1xTxS = make_attention_mask(segment_ids_BxT, t)
    hidden = {0: x_BxTxD} if 0 in hidden_layers else {}
    attn, qkv = {}, {}
    for i in range(cfg.num_layers):
      x_BxTxD, probs_BxHxTxS, qkv_i = Block(cfg, name=f"block_{i}")(
        x_BxTxD, positions_BxT, mask_Bx1xTxS
      )
      # Only requested tensors are kept; the rest is dead code XLA drops under jit.
      if i + 1 in hidden_layers:
        hidden[i + 1] = x_BxTxD
      if i in attn_layers:
        attn[i] = probs_BxHxTxS
      if i in qkv_layers:
        qkv[i] = qkv_i
    final_BxTxD = Norm(cfg, name="final_norm")(x_BxTxD)

    out = self._output(final_BxTxD, token_embed, return_logits)
    for key, value in (("hidden", hidden), ("attn", attn), ("qkv", qkv)):
      if value:
        out[key] = value
    return out

  def _embed(self, tokens_BxT, positions_BxT):
    """Returns (token nn.Embed, embedding output x_BxTxD in compute dtype)."""
    cfg = self.config
    token_embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      name="token_embed",
      embedding_init=param_init(("vocab", "embed")),
    )
    x_BxTxD = embed_lookup(token_embed, tokens_BxT, "vocab")
    if cfg.pos == "learned":
      pos_embed = nn.Embed(
        cfg.max_len,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="pos_embed",
        embedding_init=param_init((None, "embed")),
      )
      x_BxTxD = x_BxTxD + embed_lookup(pos_embed, positions_BxT, None)
    return token_embed, nn.with_logical_constraint(x_BxTxD, ACT_RESIDUAL)

  def _output(self, final_BxTxD, token_embed, return_logits):
    """Returns {"logits"} or {"final_hidden", "head"}."""
    cfg = self.config
    if cfg.tie_embeddings:
      head_DxV = token_embed.embedding.T.astype(cfg.dtype)
    else:
      lm_head = EinsumDense(
        cfg,
        (cfg.d_model, cfg.vocab_size),
        ("embed", "vocab"),
        "btd,dv->btv",
        allow_fp8=False,  # only .kernel is used: the head feeds fp32 softmaxes
        name="lm_head",
      )
      head_DxV = lm_head.kernel.astype(cfg.dtype)
    if not return_logits:
      return {"final_hidden": final_BxTxD, "head": head_DxV}
    logits_BxTxV = jnp.einsum("btd,dv->btv", final_BxTxD, head_DxV).astype(cfg.output_dtype)
    return {"logits": nn.with_logical_constraint(logits_BxTxV, ACT_LOGITS)}


def count_params(params: Any) -> int:
  """Number of scalars in a param pytree.

  Args:
    params: arrays or ShapeDtypeStructs, boxed with logical names or not.
  Returns:
    Sum of the leaves' sizes.
  """
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(nn.unbox(params)))


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Approximate forward FLOPs per token: 2 * N_matmul + 4 * L * T * D.

  N_matmul = L * (4 * D^2 + n_mlp * D * F) + D * V: the weights used in matmuls (q, k, v, out
  with H * K == D; n_mlp = 3 for SwiGLU, 2 for GELU; the head, tied or not; lookups are free).
  4 * L * T * D: q.k scores and probs.v (2 * T * D each per layer) over the full T x T matrix,
  which the einsums compute despite the causal mask. Norms, softmax, activations are ignored.

  Args:
    config: the model config.
    seq_len: T, the length attended over.
  Returns:
    Forward FLOPs per token (about 3x for forward + backward).
  """
  d, f, layers = config.d_model, config.d_ff, config.num_layers
  n_mlp = 3 if config.activation == "swiglu" else 2
  matmul_params = layers * (4 * d * d + n_mlp * d * f) + d * config.vocab_size
  return float(2 * matmul_params + 4 * layers * seq_len * d)
