"""Decoder-only causal Transformer LM (Flax Linen), used as teacher and student.

``Transformer(config).apply(params, tokens_BxT, ...)`` returns a dict with exactly the requested
outputs (logits, or final hidden + head matrix for a fused loss; optional per-layer hidden states,
attention probabilities and q/k/v). Every param carries logical axis names and the main
activations carry logical constraints; without an active ``nn.logical_axis_rules`` context those
are no-ops, so the model runs unchanged on one device. The layers (norms, RoPE, attention,
MLP, block, the FP8-capable ``EinsumDense``) live in ``layers.py``, shared with ``bert.py``;
the config (``TransformerConfig``) in ``config.py``; this module holds the model and its
parameter count (FLOPs: ``flops.py``).

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

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.models import scan as scan_lib
from jaxdistill.models.layers import (
  ACT_LOGITS,
  ACT_RESIDUAL,
  EinsumDense,
  Norm,
  cache_mask,
  embed_lookup,
  make_attention_mask,
  param_init,
)
from jaxdistill.models.transformer_config import TransformerConfig, check_layers


class Transformer(nn.Module):
  """Decoder-only causal LM.

  Params (under "params"): token_embed/embedding [V, D]; pos_embed/embedding [max_len, D]
  (pos="learned" only); block_{i} for i < L: attn_norm, attn/{query,key,value}/kernel [D, H, K],
  attn/out/kernel [H, K, D], mlp_norm, mlp/{wi_gate, wi_up | wi}/kernel [D, F], mlp/wo/kernel
  [F, D]; final_norm; lm_head/kernel [D, V] (untied only). Norms hold scale [D] (+ bias [D]
  for layernorm). key/value kernels are [D, num_kv_heads, K] with grouped-query attention;
  projections with a bias (``config.bias``) hold ``bias`` of their output shape ([H, K] or [D]).

  With ``config.scan_layers`` the blocks run under ``nn.scan`` and their params are one
  subtree ``blocks`` holding block_{i}'s leaves stacked on a leading axis of L (logical name
  "layers", replicated); ``models.scan`` converts params between the two layouts. Outputs are
  the same: per-layer hidden states / attention / q/k/v are stacked by the scan only when some
  layer of them is requested, then sliced; a cache's per-block (k, v) are stacked into the
  scan's inputs and come back per block (the cache format does not change). ``config.remat``
  wraps each block in ``nn.remat`` (``scan.block_class``), scanned or not.
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
    cache: dict | None = None,
  ) -> dict:
    """Runs the model.

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
      cache: decoding (``generate.cache``): {"layers": ((k_BxGxSxK, v_BxGxSxK) per block),
        "lengths": int32 [B] tokens already cached per row}. The T new tokens of row b sit at
        positions lengths[b] + t (unless ``positions_BxT`` says otherwise), are written to those
        slots and attend to everything cached before them; no segment ids, attention or q/k/v.
    Returns:
      dict with only the requested keys: "logits" [B, T, V] output_dtype, or "final_hidden"
      [B, T, D] and "head" [D, V] (compute dtype; logits = final_hidden @ head); "hidden"
      {i: [B, T, D] compute dtype}; "attn" {i: [B, H, T, T] float32}; "qkv" {i: (q, k, v)
      each [B, T, H, K]}; with ``cache``, "cache": the updated cache, lengths + T.
    """
    cfg = self.config
    if cfg.encoder:  # a decoder's params would not load as the encoder's: refuse, loudly
      raise ValueError("config.encoder is set: the model is bert.Encoder (models.module_for)")
    b, t = tokens_BxT.shape
    hidden_layers = check_layers("hidden_layers", hidden_layers, cfg.num_layers)
    attn_layers = check_layers("attn_layers", attn_layers, cfg.num_layers - 1)
    qkv_layers = check_layers("qkv_layers", qkv_layers, cfg.num_layers - 1)
    if t > cfg.max_len:
      raise ValueError(f"sequence length {t} exceeds max_len {cfg.max_len}")
    index_B = None if cache is None else cache["lengths"]
    if cache is not None and (segment_ids_BxT is not None or attn_layers or qkv_layers):
      raise ValueError("a cached call takes no segment_ids, attn_layers or qkv_layers")
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      if cache is not None:
        positions_BxT = positions_BxT + index_B[:, None]

    token_embed, x_BxTxD = self._embed(tokens_BxT, positions_BxT)
    if cache is None:
      mask_Bx1xTxS = make_attention_mask(segment_ids_BxT, t)
    else:
      mask_Bx1xTxS = cache_mask(index_B, t, cache["layers"][0][0].shape[2])  # [B, G, S, K]
    wanted = (hidden_layers, attn_layers, qkv_layers, cache)
    blocks = self._scanned if cfg.scan_layers else self._unrolled
    x0_BxTxD = x_BxTxD
    x_BxTxD, per_layer = blocks(x_BxTxD, positions_BxT, mask_Bx1xTxS, cache, wanted)
    # Only requested tensors are kept (unrolled: the rest is dead code XLA drops under jit).
    hidden = {i: per_layer("hidden", i - 1) if i else x0_BxTxD for i in sorted(set(hidden_layers))}
    attn = {i: per_layer("attn", i) for i in sorted(set(attn_layers))}
    qkv = {i: per_layer("qkv", i) for i in sorted(set(qkv_layers))}
    final_BxTxD = Norm(cfg, name="final_norm")(x_BxTxD)

    out = self._output(final_BxTxD, token_embed, return_logits)
    if cache is not None:
      new_layers = tuple(per_layer("cache", i) for i in range(cfg.num_layers))
      out["cache"] = {"layers": new_layers, "lengths": index_B + t}
    for key, value in (("hidden", hidden), ("attn", attn), ("qkv", qkv)):
      if value:
        out[key] = value
    return out

  def _unrolled(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache, wanted):
    """The L blocks one after the other: (output x_BxTxD, per_layer) as ``_scanned``."""
    del wanted  # every output exists; the unrequested ones are dead code
    cfg, outputs = self.config, []
    block = scan_lib.block_class(cfg, scanned=False)
    for i in range(cfg.num_layers):
      x_BxTxD, probs_BxHxTxS, qkv_i, layer_cache = block(cfg, name=f"block_{i}")(
        x_BxTxD,
        positions_BxT,
        mask_Bx1xTxS,
        None if cache is None else cache["layers"][i],
        None if cache is None else cache["lengths"],
      )
      outputs.append(dict(hidden=x_BxTxD, attn=probs_BxHxTxS, qkv=qkv_i, cache=layer_cache))
    return x_BxTxD, lambda name, i: outputs[i][name]

  def _scanned(self, x_BxTxD, positions_BxT, mask_Bx1xTxS, cache, wanted):
    """The L blocks under ``nn.scan`` (config.scan_layers): (output x_BxTxD, per_layer).

    Params are one "blocks" subtree, every leaf stacked on a leading axis of L named "layers".
    The scan stacks a per-layer output only when some layer of it was requested (hidden
    states [L, B, T, D], attention probabilities [L, B, H, T, S], q/k/v; all L layers of it,
    then indexed); a cache's per-block (k, v) are stacked into [L, ...] scan inputs and its
    updated slices come back the same way. ``per_layer(name, i)`` is layer i's value of
    output ``name`` (None when not emitted).
    """
    cfg = self.config
    hidden_layers, attn_layers, qkv_layers, cache = wanted
    emit = tuple(
      name
      for name, want in (
        ("hidden", hidden_layers),
        ("attn", attn_layers),
        ("qkv", qkv_layers),
        ("cache", cache is not None),
      )
      if want
    )
    scanned = nn.scan(
      scan_lib.block_class(cfg, scanned=True),
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
      length=cfg.num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    layers_kv = None
    index_B = None
    if cache is not None:
      layers_kv = tuple(jnp.stack(xs) for xs in zip(*cache["layers"]))  # ([L, ...], [L, ...])
      index_B = cache["lengths"]
    x_BxTxD, stacked = scanned(cfg, emit, name="blocks")(
      x_BxTxD, positions_BxT, mask_Bx1xTxS, layers_kv, index_B
    )

    def per_layer(name, i):
      if name not in stacked:
        return None
      return jax.tree.map(lambda a: a[i], stacked[name])

    return x_BxTxD, per_layer

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
