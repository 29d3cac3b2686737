"""Transformer layers (Flax Linen): norms, RoPE, attention, MLP and the block, shared by the
decoder (``transformer.Transformer``) and the encoder (``bert.Encoder``).

Every param carries logical axis names and the main activations carry logical constraints
(``ACT_*``; the sharding module maps them onto the mesh). ``EinsumDense`` is the one home of
FP8: with ``config.fp8`` its matmul goes through Flax's ``Fp8Einsum`` and keeps scales / amax
histories in the ``FP8_STATE`` collection.

Shape letters as in ``transformer``: B batch, T / S query / key length, D width, H heads,
K head dim, F MLP width, V vocabulary.
"""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

from jaxdistill.models.transformer_config import TransformerConfig

_INIT_STDDEV = 0.02

# Logical activation axis names; the sharding module maps them onto the mesh.
ACT_RESIDUAL = ("act_batch", "act_length", "act_embed")
ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_kv")
ACT_MLP = ("act_batch", "act_length", "act_mlp")
ACT_LOGITS = ("act_batch", "act_length", "act_vocab")
# A key/value cache tensor [B, G, S, K] (``generate.cache``): the q/k/v activation names.
CACHE_AXES = ("act_batch", "act_heads", "act_length", "act_kv")
# The score of a masked key: finfo.min (not -inf) keeps the softmax's max-subtraction finite.
_MASKED = jnp.finfo(jnp.float32).min
# Variable collection of FP8 scales / amax histories: its "gradients" are its new values.
FP8_STATE = fp8_ops.OVERWRITE_WITH_GRADIENT


def param_init(names: Sequence[str | None], stddev: float = _INIT_STDDEV):
  """Normal(0, stddev) initializer whose param carries the logical axis ``names``."""
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
      "kernel", param_init(self.names, self.stddev), self.shape, self.config.param_dtype
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
    # No cast when the dtype matches: an int8 model's kernel is qwix's int8 array + scales,
    # whose astype qwix 0.1.8 cannot do (the same program for a float kernel).
    kernel = self.kernel if self.kernel.dtype == dtype else self.kernel.astype(dtype)
    x = x.astype(dtype)
    # Without its FP8 state (e.g. evaluating params saved alone) an fp8 model
    # falls back to plain matmuls in the compute dtype.
    if (
      self.config.fp8
      and self.allow_fp8
      and (self.is_initializing() or self.has_variable(FP8_STATE, "fp8"))
    ):
      return self.fp8(self.equation, x, kernel)
    return jnp.einsum(self.equation, x, kernel)


def write_cache(cache_BxGxSxK: jax.Array, new_BxTxGxK: jax.Array, index_B: jax.Array) -> jax.Array:
  """``cache`` with row b's slots index_B[b] .. index_B[b] + T - 1 set to ``new``'s row b.

  An in-place scatter of the B * T new slices (no pass over the rest of the cache). A start
  past S - T is clamped to S - T (as ``dynamic_update_slice``): the caller keeps running rows'
  index_B + T <= S; a finished row's write may land on its last slot, which it no longer reads.
  """
  (b, _, s, _), t = cache_BxGxSxK.shape, new_BxTxGxK.shape[1]
  start_B = jnp.clip(index_B, 0, s - t)
  slots_BxT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)[None, :]
  new_BxTxGxK = new_BxTxGxK.astype(cache_BxGxSxK.dtype)
  if b == 1:  # one slice: a plain in-place dynamic_update_slice (XLA copies a 1-row scatter)
    zero = jnp.zeros((), start_B.dtype)
    new_1xGxTxK = new_BxTxGxK.transpose(0, 2, 1, 3)
    return jax.lax.dynamic_update_slice(cache_BxGxSxK, new_1xGxTxK, (zero, zero, start_B[0], zero))
  rows_Bx1 = jnp.arange(b, dtype=start_B.dtype)[:, None]
  # Advanced indices around a slice: the update's axes are [B, T, G, K], new's own layout.
  at = cache_BxGxSxK.at[rows_Bx1, :, slots_BxT]
  return at.set(new_BxTxGxK, mode="promise_in_bounds", unique_indices=True, indices_are_sorted=True)


def cache_mask(index_B: jax.Array, length: int, capacity: int) -> jax.Array:
  """Bool [B, 1, T, S]: query t of row b (written at index_B[b] + t into an S-slot cache) may
  attend to slots s <= index_B[b] + t; slots beyond a row's tokens are never read."""
  query_BxT = index_B[:, None] + jnp.arange(length, dtype=index_B.dtype)[None, :]
  return (jnp.arange(capacity)[None, None, :] <= query_BxT[:, :, None])[:, None]


class Attention(nn.Module):
  """Multi-head (or grouped-query) self-attention with explicit einsums.

  Args (call):
    x_BxTxD: normalized residual stream.
    positions_BxT: position ids (used by RoPE).
    mask_Bx1xTxS: bool mask from ``make_attention_mask`` (causal), or any mask broadcasting
      to [B, 1, T, S] (an encoder's padding mask [B, 1, 1, S]); with ``cache``, from
      ``cache_mask`` (S = the cache's slots).
    cache: decoding: (k_BxGxSxK, v_BxGxSxK), this layer's key/value cache (G = kv heads, keys
      after RoPE). The T new keys/values are written at ``cache_index_B`` + t and the queries
      attend over the cache; no probabilities or q/k/v are returned.
    cache_index_B: int32 [B], the first slot each row's new tokens go to (with ``cache``).
  Returns:
    (out_BxTxD, probs_BxHxTxS float32, (q, k, v) each [B, T, H, K], None), or with ``cache``
    (out_BxTxD, None, None, (k, v) the updated cache). q and k are AFTER RoPE, i.e. exactly the
    tensors whose scaled dot product gives the attention scores; with grouped-query attention k
    and v are repeated to H heads.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache=None, cache_index_B=None):
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
    if cache is not None:
      return self._cached(
        q_BxTxHxK,
        proj("key", cfg.kv_heads),
        proj("value", cfg.kv_heads),
        positions_BxT,
        mask_Bx1xTxS,
        cache,
        cache_index_B,
      )
    # Grouped-query attention: key/value head j serves query heads j*G .. j*G+G-1.
    group = h // cfg.kv_heads
    k_BxSxHxK, v_BxSxHxK = proj("key", cfg.kv_heads), proj("value", cfg.kv_heads)
    if group > 1:
      k_BxSxHxK = jnp.repeat(k_BxSxHxK, group, axis=2)
      v_BxSxHxK = jnp.repeat(v_BxSxHxK, group, axis=2)
    if cfg.pos == "rope":
      q_BxTxHxK = apply_rope(q_BxTxHxK, positions_BxT, cfg.rope_base)
      k_BxSxHxK = apply_rope(k_BxSxHxK, positions_BxT, cfg.rope_base)
    q_BxTxHxK = nn.with_logical_constraint(q_BxTxHxK, ACT_HEADS)
    k_BxSxHxK = nn.with_logical_constraint(k_BxSxHxK, ACT_HEADS)
    v_BxSxHxK = nn.with_logical_constraint(v_BxSxHxK, ACT_HEADS)

    # Scores accumulate in float32 so the softmax sees full-precision logits.
    scores_BxHxTxS = jnp.einsum(
      "bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
    ) / math.sqrt(k)
    # finfo.min (not -inf) keeps the max-subtraction finite: no inf - inf = NaN.
    scores_BxHxTxS = jnp.where(mask_Bx1xTxS, scores_BxHxTxS, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    ctx_BxTxHxK = jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(cfg.dtype), v_BxSxHxK)
    ctx_BxTxHxK = nn.with_logical_constraint(ctx_BxTxHxK, ACT_HEADS)
    out_BxTxD = self._out(ctx_BxTxHxK)
    return out_BxTxD, probs_BxHxTxS, (q_BxTxHxK, k_BxSxHxK, v_BxSxHxK), None

  def _out(self, ctx_BxTxHxK):
    cfg = self.config
    return EinsumDense(
      cfg,
      (cfg.num_heads, cfg.head_dim, cfg.d_model),
      ("heads", "kv", "embed"),
      "bthk,hkd->btd",
      _residual_stddev(cfg),
      bias_dims=1 if cfg.bias == "all" else 0,
      name="out",
    )(ctx_BxTxHxK)

  def _cached(self, q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, positions_BxT, mask_Bx1xTxS, cache, index_B):
    """Attention of T new tokens over the key/value cache (see ``__call__``).

    The cache [B, G, S, K] is read as it was (slots before index_B) and the T new keys/values
    directly (causally), then they are written: XLA updates it in place (reading the written
    cache would copy it every step). The einsums are batched over (B, G), S and K the matrix
    axes (XLA on CPU still transposes the keys at batch 1: a copy of K).
    """
    cfg = self.config
    b, t, h, k = q_BxTxHxK.shape
    g, s = cfg.kv_heads, cache[0].shape[2]
    if cfg.pos == "rope":
      q_BxTxHxK = apply_rope(q_BxTxHxK, positions_BxT, cfg.rope_base)
      k_BxTxGxK = apply_rope(k_BxTxGxK, positions_BxT, cfg.rope_base)
    k_BxGxSxK, v_BxGxSxK = (nn.with_logical_constraint(c, CACHE_AXES) for c in cache)
    dtype = k_BxGxSxK.dtype
    # Grouped queries against the G cached heads: the cache is read once, never repeated to H.
    q_BxGxRxTxK = q_BxTxHxK.reshape(b, t, g, h // g, k).transpose(0, 2, 3, 1, 4).astype(dtype)
    k_BxTxGxK, v_BxTxGxK = k_BxTxGxK.astype(dtype), v_BxTxGxK.astype(dtype)
    q_BxGxRxTxK = q_BxGxRxTxK / jnp.asarray(math.sqrt(k), dtype)
    scores = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    old_Bx1xTxS = mask_Bx1xTxS & (jnp.arange(s)[None, None, None, :] < index_B[:, None, None, None])
    new_TxU = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    old = jnp.where(
      old_Bx1xTxS[:, :, None], scores("bgrtk,bgsk->bgrts", q_BxGxRxTxK, k_BxGxSxK), _MASKED
    )
    new = jnp.where(new_TxU, scores("bgrtk,bugk->bgrtu", q_BxGxRxTxK, k_BxTxGxK), _MASKED)
    scores_BxGxRxTxSU = jnp.concatenate([old, new], axis=-1)
    probs_BxGxRxTxSU = jax.nn.softmax(scores_BxGxRxTxSU, axis=-1).astype(dtype)
    ctx_BxGxRxTxK = jnp.einsum("bgrts,bgsk->bgrtk", probs_BxGxRxTxSU[..., :s], v_BxGxSxK)
    ctx_BxGxRxTxK += jnp.einsum("bgrtu,bugk->bgrtk", probs_BxGxRxTxSU[..., s:], v_BxTxGxK)
    ctx_BxTxHxK = ctx_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, h, k).astype(cfg.dtype)
    dep = (jnp.clip(ctx_BxTxHxK[:, :, :1, :1], -1, 1) * 0).astype(dtype)  # writes after reads
    k_BxTxGxK, v_BxTxGxK = k_BxTxGxK + dep, v_BxTxGxK + dep
    pairs = ((k_BxGxSxK, k_BxTxGxK), (v_BxGxSxK, v_BxTxGxK))
    new = tuple(
      nn.with_logical_constraint(write_cache(c, n, index_B), CACHE_AXES) for c, n in pairs
    )
    return self._out(ctx_BxTxHxK), None, None, new


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
    h_BxTxF = nn.with_logical_constraint(h_BxTxF, ACT_MLP)
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
    (x_BxTxD new residual stream, probs_BxHxTxS, (q, k, v), cache) as ``Attention``.
  """

  config: TransformerConfig

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache=None, cache_index_B=None):
    cfg = self.config
    attn_BxTxD, probs_BxHxTxS, qkv, cache = Attention(cfg, name="attn")(
      Norm(cfg, name="attn_norm")(x_BxTxD), positions_BxT, mask_Bx1xTxS, cache, cache_index_B
    )
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + attn_BxTxD, ACT_RESIDUAL)
    mlp_BxTxD = Mlp(cfg, name="mlp")(Norm(cfg, name="mlp_norm")(x_BxTxD))
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + mlp_BxTxD, ACT_RESIDUAL)
    return x_BxTxD, probs_BxHxTxS, qkv, cache


def embed_lookup(embed: nn.Embed, ids_BxT: jax.Array, rows: str | None) -> jax.Array:
  """[B, T, D] rows of ``embed``'s table, in its compute dtype.

  The table's D axis is gathered first (constraint (rows, None)): gathering from a table sharded
  on D into a batch-sharded output makes the SPMD partitioner fall back to full replication.
  """
  table_NxD = nn.with_logical_constraint(embed.embedding, (rows, None))
  return jnp.take(table_NxD.astype(embed.dtype), ids_BxT, axis=0)
