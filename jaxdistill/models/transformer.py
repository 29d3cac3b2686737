"""Decoder-only causal Transformer LM (Flax Linen), used as teacher and student.

``Transformer(config).apply(params, tokens_BxT, ...)`` returns a dict with exactly the requested
outputs (logits, or final hidden + head matrix for a fused loss; optional per-layer hidden states,
attention probabilities and q/k/v). Every param carries logical axis names and the main
activations carry logical constraints; without an active ``nn.logical_axis_rules`` context those
are no-ops, so the model runs unchanged on one device.

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
from flax.linen import fp8_ops
import jax.numpy as jnp

_NORMS = ("rmsnorm", "layernorm")
_POSITIONS = ("rope", "learned")
_ACTIVATIONS = ("swiglu", "gelu", "gelu_erf")  # gelu: tanh approximation (GPT-2); gelu_erf: BERT
_BIASES = ("none", "qkv", "all")  # which projections carry a bias (qkv: Qwen2; all: GPT-2, BERT)
_INIT_STDDEV = 0.02

# Logical activation axis names; the sharding module maps them onto the mesh.
_ACT_RESIDUAL = ("act_batch", "act_length", "act_embed")
_ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_kv")
_ACT_MLP = ("act_batch", "act_length", "act_mlp")
_ACT_LOGITS = ("act_batch", "act_length", "act_vocab")
# Variable collection of FP8 scales / amax histories: its "gradients" are its new values.
FP8_STATE = fp8_ops.OVERWRITE_WITH_GRADIENT


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


def _init(names: Sequence[str | None], stddev: float = _INIT_STDDEV):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev), tuple(names))


def _residual_stddev(cfg: TransformerConfig) -> float:
  # GPT-2 style: residual-branch output projections are scaled by 1/sqrt(2L) so the residual
  # stream variance does not grow with depth at init.
  return _INIT_STDDEV / math.sqrt(2 * cfg.num_layers)


class Norm(nn.Module):
  """RMSNorm or LayerNorm (per ``config.norm``) over the last axis.

  Args (call):
    x_BxTxD: activations, any float dtype.
  Returns:
    [B, T, D] normalized activations in ``config.dtype``.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    cfg = self.config
    d = x_BxTxD.shape[-1]
    init = lambda fn: nn.with_logical_partitioning(fn, ("embed",))  # noqa: E731
    scale_D = self.param("scale", init(nn.initializers.ones), (d,), cfg.param_dtype)
    # Statistics in float32: a bf16 mean of squares over D loses too many bits.
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    if cfg.norm == "layernorm":
      x32_BxTxD = x32_BxTxD - jnp.mean(x32_BxTxD, axis=-1, keepdims=True)
    var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
    y_BxTxD = x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + cfg.norm_eps) * scale_D.astype(jnp.float32)
    if cfg.norm == "layernorm":
      bias_D = self.param("bias", init(nn.initializers.zeros), (d,), cfg.param_dtype)
      y_BxTxD = y_BxTxD + bias_D.astype(jnp.float32)
    return y_BxTxD.astype(cfg.dtype)


def apply_rope(x_BxTxHxK: jax.Array, positions_BxT: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (rotate-half convention, as GPT-NeoX / Llama).

  Args:
    x_BxTxHxK: queries or keys; K must be even.
    positions_BxT: integer position of every token.
    base: rotary frequency base.
  Returns:
    [B, T, H, K] rotated tensor in the dtype of ``x_BxTxHxK``.
  """
  k = x_BxTxHxK.shape[-1]
  half = k // 2
  # Angles in float32: bf16 positions * frequencies are badly rounded for long sequences.
  inv_freq_Kh = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / k)
  angle_BxTx1xKh = (positions_BxT.astype(jnp.float32)[..., None] * inv_freq_Kh)[:, :, None, :]
  sin_BxTx1xKh, cos_BxTx1xKh = jnp.sin(angle_BxTx1xKh), jnp.cos(angle_BxTx1xKh)
  x32_BxTxHxK = x_BxTxHxK.astype(jnp.float32)
  x1_BxTxHxKh, x2_BxTxHxKh = x32_BxTxHxK[..., :half], x32_BxTxHxK[..., half:]
  out_BxTxHxK = jnp.concatenate(
    [
      x1_BxTxHxKh * cos_BxTx1xKh - x2_BxTxHxKh * sin_BxTx1xKh,
      x2_BxTxHxKh * cos_BxTx1xKh + x1_BxTxHxKh * sin_BxTx1xKh,
    ],
    axis=-1,
  )
  return out_BxTxHxK.astype(x_BxTxHxK.dtype)


def make_attention_mask(segment_ids_BxT: jax.Array | None, length: int) -> jax.Array:
  """Bool [B|1, 1, T, S] mask (True = may attend): causal AND same segment.

  Causality is by index in the row (not by position id), so packed documents whose positions
  restart at 0 stay causal. Padding (segment 0) sees only padding and the diagonal is always
  allowed, so no query row is fully masked (no NaN).

  Args:
    segment_ids_BxT: optional document id per token (0 = padding); without it the mask's batch
      axis is 1 and broadcasts.
    length: T (== S).
  """
  idx_T = jnp.arange(length)
  mask_1x1xTxS = (idx_T[:, None] >= idx_T[None, :])[None, None]
  if segment_ids_BxT is None:
    return mask_1x1xTxS
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return mask_1x1xTxS & same_BxTxS[:, None]


class EinsumDense(nn.Module):
  """Bias-free ``einsum(equation, x, kernel)`` in the compute dtype; ``.kernel`` has ``shape``.

  Not ``nn.DenseGeneral``: that inits a flat 2-D kernel and reshapes it, so under an active mesh
  its 3-D logical names hit a 2-D value and Flax raises (even in ``apply``, where Linen
  shape-checks existing params by tracing the initializer).
  """

  config: TransformerConfig
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  equation: str
  stddev: float = _INIT_STDDEV
  allow_fp8: bool = True  # False: plain matmul even when config.fp8 (the vocabulary head)
  bias_dims: int = 0  # > 0: add a bias over the kernel's last bias_dims (output) axes

  def setup(self):
    self.kernel = self.param(
      "kernel", _init(self.names, self.stddev), self.shape, self.config.param_dtype
    )
    if self.bias_dims:
      self.bias = self.param(
        "bias",
        nn.with_logical_partitioning(nn.initializers.zeros, self.names[-self.bias_dims :]),
        self.shape[-self.bias_dims :],
        self.config.param_dtype,
      )
    if self.config.fp8 and self.allow_fp8:
      self.fp8 = fp8_ops.Fp8Einsum(amax_history_length=self.config.fp8_history)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self._matmul(x)
    return y + self.bias.astype(y.dtype) if self.bias_dims else y

  def _matmul(self, x: jax.Array) -> jax.Array:
    dtype = self.config.dtype
    x, kernel = x.astype(dtype), self.kernel.astype(dtype)
    # Without its FP8 state (e.g. evaluating params saved alone) an fp8 model
    # falls back to plain matmuls in the compute dtype.
    if (
      self.config.fp8
      and self.allow_fp8
      and (self.is_initializing() or self.has_variable(FP8_STATE, "fp8"))
    ):
      return self.fp8(self.equation, x, kernel)
    return jnp.einsum(self.equation, x, kernel)


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention with explicit einsums.

  Args (call):
    x_BxTxD: normalized residual stream.
    positions_BxT: position ids (used by RoPE).
    mask_Bx1xTxS: bool mask from ``make_attention_mask`` (causal), or any mask broadcasting
      to [B, 1, T, S] (an encoder's padding mask [B, 1, 1, S]).
  Returns:
    (out_BxTxD, probs_BxHxTxS float32, (q, k, v) each [B, T, H, K]). q and k are AFTER RoPE,
    i.e. exactly the tensors whose scaled dot product gives the attention scores; with
    grouped-query attention k and v are repeated to H heads.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS):
    cfg = self.config
    h, k = cfg.num_heads, cfg.head_dim
    qkv_bias = 2 if cfg.bias in ("qkv", "all") else 0

    def proj(name, heads):
      return EinsumDense(
        cfg,
        (cfg.d_model, heads, k),
        ("embed", "heads", "kv"),
        "btd,dhk->bthk",
        bias_dims=qkv_bias,
        name=name,
      )(x_BxTxD)

    q_BxTxHxK = proj("query", h)
    # Grouped-query attention: key/value head j serves query heads j*G .. j*G+G-1.
    group = h // cfg.kv_heads
    k_BxSxHxK, v_BxSxHxK = proj("key", cfg.kv_heads), proj("value", cfg.kv_heads)
    if group > 1:
      k_BxSxHxK = jnp.repeat(k_BxSxHxK, group, axis=2)
      v_BxSxHxK = jnp.repeat(v_BxSxHxK, group, axis=2)
    if cfg.pos == "rope":
      q_BxTxHxK = apply_rope(q_BxTxHxK, positions_BxT, cfg.rope_base)
      k_BxSxHxK = apply_rope(k_BxSxHxK, positions_BxT, cfg.rope_base)
    q_BxTxHxK = nn.with_logical_constraint(q_BxTxHxK, _ACT_HEADS)
    k_BxSxHxK = nn.with_logical_constraint(k_BxSxHxK, _ACT_HEADS)
    v_BxSxHxK = nn.with_logical_constraint(v_BxSxHxK, _ACT_HEADS)

    # Scores accumulate in float32 so the softmax sees full-precision logits.
    scores_BxHxTxS = jnp.einsum(
      "bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
    ) / math.sqrt(k)
    # finfo.min (not -inf) keeps the max-subtraction finite: no inf - inf = NaN.
    scores_BxHxTxS = jnp.where(mask_Bx1xTxS, scores_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    ctx_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(cfg.dtype), v_BxSxHxK)
    ctx_BxTxHxK = nn.with_logical_constraint(ctx_BxTxHxK, _ACT_HEADS)
    out_BxTxD = EinsumDense(
      cfg,
      (h, k, cfg.d_model),
      ("heads", "kv", "embed"),
      "bthk,hkd->btd",
      _residual_stddev(cfg),
      bias_dims=1 if cfg.bias == "all" else 0,
      name="out",
    )(ctx_BxTxHxK)
    return out_BxTxD, probs_BxHxTxS, (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK)


class Mlp(nn.Module):
  """SwiGLU (wi_gate, wi_up, wo) or GELU (wi, wo; tanh-approximate or exact erf) feed-forward.

  Args (call):
    x_BxTxD: normalized residual stream.
  Returns:
    [B, T, D] in ``config.dtype``.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.config
    d, f = cfg.d_model, cfg.d_ff
    bias = 1 if cfg.bias == "all" else 0

    def wi(name):
      return EinsumDense(cfg, (d, f), ("embed", "mlp"), "btd,df->btf", bias_dims=bias, name=name)(
        x_BxTxD
      )

    if cfg.activation == "swiglu":
      h_BxTxF = nn.silu(wi("wi_gate")) * wi("wi_up")
    else:
      h_BxTxF = nn.gelu(wi("wi"), approximate=cfg.activation == "gelu")
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, _ACT_MLP)
    return EinsumDense(
      cfg,
      (f, d),
      ("mlp", "embed"),
      "btf,fd->btd",
      _residual_stddev(cfg),
      bias_dims=bias,
      name="wo",
    )(h_BxTxF)


class Block(nn.Module):
  """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x)).

  Args (call): as ``Attention``, with x_BxTxD the (un-normalized) residual stream.
  Returns:
    (x_BxTxD new residual stream, probs_BxHxTxS, (q, k, v)) as ``Attention``.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS):
    cfg = self.config
    attn_BxTxD, probs_BxHxTxS, qkv = Attention(cfg, name="attn")(
      Norm(cfg, name="attn_norm")(x_BxTxD), positions_BxT, mask_Bx1xTxS
    )
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + attn_BxTxD, _ACT_RESIDUAL)
    mlp_BxTxD = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + mlp_BxTxD, _ACT_RESIDUAL)
    return x_BxTxD, probs_BxHxTxS, qkv


def _lookup(embed: nn.Embed, ids_BxT: jax.Array, rows: str | None) -> jax.Array:
  """[B, T, D] rows of ``embed``'s table, in its compute dtype.

  The table's D axis is gathered first (constraint (rows, None)): gathering from a table sharded
  on D into a batch-sharded output makes the SPMD partitioner fall back to full replication.
  """
  table_NxD = nn.with_logical_constraint(embed.embedding, (rows, None))
  return jnp.take(table_NxD.astype(embed.dtype), ids_BxT, axis=0)


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
      embedding_init=_init(("vocab", "embed")),
    )
    x_BxTxD = _lookup(token_embed, tokens_BxT, "vocab")
    if cfg.pos == "learned":
      pos_embed = nn.Embed(
        cfg.max_len,
        cfg.d_model,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        name="pos_embed",
        embedding_init=_init((None, "embed")),
      )
      x_BxTxD = x_BxTxD + _lookup(pos_embed, positions_BxT, None)
    return token_embed, nn.with_logical_constraint(x_BxTxD, _ACT_RESIDUAL)

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
    return {"logits": nn.with_logical_constraint(logits_BxTxV, _ACT_LOGITS)}


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
