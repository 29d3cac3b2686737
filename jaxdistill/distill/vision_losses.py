"""Feature-map distillation losses for image models: attention transfer and FitNets-style maps.

Shape legend: B batch, H x W spatial size, C channels (Cs student, Ct teacher), NHWC layout.

Conventions (those of ``losses.py``, with examples instead of tokens):

* Each loss returns ``(loss, metrics)``: ``loss`` is a float32 scalar,
  ``sum_b weights[b] * loss_b / denom``; ``metrics`` maps a ``distill/...`` name to it.
* ``weights_B`` is 1 for a real example and 0 for a padding row (other values weight the
  example); ``denom`` is the caller's GLOBAL sum of weights (over devices and micro-batches),
  so summed micro-batch losses give the exact global mean. ``denom`` = 0 gives 0, not NaN.
  Padding rows are replaced by zeros with ``jnp.where`` BEFORE any math, so garbage there
  (inf / NaN) changes neither the loss nor the gradients.
* All math is float32 whatever the input dtype (bf16 maps are upcast); the teacher's map gets
  ``stop_gradient``.
* Spatial sizes that differ are average-pooled to the smaller size on each axis (see
  ``pool_to``: adaptive average pooling, so 8 -> 4 averages 2x2 blocks and 7 -> 4 is defined too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32
LossAndMetrics = tuple[jax.Array, dict[str, jax.Array]]

# Floor on the L2 norm of an attention map (that of torch's F.normalize, which the AT authors'
# code uses): a zero map normalises to zeros with finite gradients instead of 0/0.
_AT_NORM_EPS = 1e-12
# Floor for squared channel norms in the per-pixel cosine (eps = 1e-8 on the norm, as losses.py).
_COS_EPS_SQ = 1e-16

AT_KINDS = ("paper", "squared")
FEATURE_MAP_KINDS = ("mse", "cosine")


# --- Helpers ---


def _zero_padded_rows(x_Bx: jax.Array, weights_B: jax.Array) -> jax.Array:
  """Cast to f32 and replace the rows of weight 0 by zeros (inputs sanitised, not outputs)."""
  valid_B = jnp.asarray(weights_B) != 0
  valid = valid_B.reshape(valid_B.shape + (1,) * (x_Bx.ndim - 1))
  return jnp.where(valid, jnp.asarray(x_Bx).astype(F32), 0.0)


def _weighted_total(per_example_B: jax.Array, weights_B: jax.Array, denom) -> jax.Array:
  """sum_b w_b * loss_b / denom, padding rows selected out (so 0 * NaN cannot leak)."""
  w_B = jnp.asarray(weights_B).astype(F32)
  kept_B = jnp.where(w_B != 0, per_example_B.astype(F32) * w_B, 0.0)
  denom = jnp.asarray(denom, F32)
  # Double-where: an all-padding global batch gives 0 and zero gradients, not 0/0.
  return jnp.sum(kept_B) / jnp.where(denom > 0, denom, 1.0)


def _check_maps(what: str, s_BxHxWxC, t_BxHxWxC, weights_B) -> None:
  if s_BxHxWxC.ndim != 4 or t_BxHxWxC.ndim != 4:
    raise ValueError(
      f"{what}: feature maps must be [B, H, W, C], got shapes {tuple(s_BxHxWxC.shape)} "
      f"and {tuple(t_BxHxWxC.shape)}"
    )
  batch = (s_BxHxWxC.shape[0], t_BxHxWxC.shape[0], jnp.shape(weights_B)[0])
  if len(set(batch)) != 1:
    raise ValueError(f"{what}: batch sizes of student, teacher and weights differ: {batch}")


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] averaging weights: output i averages inputs [floor(i n/m), ceil((i+1) n/m))."""
  pool = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)  # ceil division
    pool[i, start:end] = 1.0 / (end - start)
  return pool


def _pool_axis(x: jax.Array, axis: int, n_out: int) -> jax.Array:
  """Adaptive average pooling of one axis of ``x`` to ``n_out`` entries."""
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  if n_in % n_out == 0:
    # Integer factor: a reshape-mean (exact, no matrix), the same numbers as the general case.
    k = n_in // n_out
    shape = x.shape[:axis] + (n_out, k) + x.shape[axis + 1 :]
    return jnp.mean(x.reshape(shape), axis=axis + 1)
  pool = jnp.asarray(_adaptive_pool_matrix(n_in, n_out))
  return jnp.moveaxis(jnp.tensordot(pool, x, axes=[[1], [axis]]), 0, axis)


def _pair_to_smaller(s_BxHxWxC, t_BxHxWxC):
  """Both maps pooled to the smaller size per axis: (min(Hs, Ht), min(Ws, Wt))."""
  size = (min(s_BxHxWxC.shape[1], t_BxHxWxC.shape[1]), min(s_BxHxWxC.shape[2], t_BxHxWxC.shape[2]))
  return pool_to(s_BxHxWxC, size), pool_to(t_BxHxWxC, size)


# --- Pooling and attention maps ---


def pool_to(x_BxHxWxC, size) -> jax.Array:
  """Adaptive average pooling of a feature map down to a smaller (or equal) spatial size.

  Output row i averages input rows ``[floor(i * H / h), ceil((i + 1) * H / h))`` (and the same
  for columns): PyTorch's ``adaptive_avg_pool2d`` convention. With an integer factor (8 -> 4)
  this is plain k x k average pooling with non-overlapping windows; with a non-integer ratio
  (7 -> 4) neighbouring windows overlap by one input (7 -> 4 averages rows [0,2), [1,4),
  [3,6), [5,7)). Every output is a mean (its weights sum to 1), so pooling commutes with a
  per-pixel affine map such as a 1x1 convolution.

  Args:
    x_BxHxWxC: [B, H, W, C] feature map, any float dtype.
    size: int (square) or (h, w) with h <= H and w <= W.

  Returns:
    [B, h, w, C] float32 pooled map (x itself, upcast, when the size already matches).

  Raises:
    ValueError: if ``size`` is larger than the map on either axis (pooling cannot upsample)
      or not positive.
  """
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  _, height, width, _ = x_BxHxWxC.shape
  if not (0 < h <= height and 0 < w <= width):
    raise ValueError(
      f"pool_to: cannot pool a {height}x{width} map to {h}x{w}; the target must be positive "
      "and no larger than the map (pooling only shrinks)"
    )
  x = jnp.asarray(x_BxHxWxC).astype(F32)
  return _pool_axis(_pool_axis(x, 1, h), 2, w)


def attention_map(features_BxHxWxC, p: float = 2.0) -> jax.Array:
  """Spatial attention map of Zagoruyko & Komodakis (2017): Q = sum_c |A_c|^p, L2-normalised.

  The norm is floored at 1e-12 (torch's F.normalize), so an all-zero map gives a zero vector
  with finite (zero) gradients.

  Args:
    features_BxHxWxC: [B, H, W, C] activations, any float dtype.
    p: exponent >= 1 (the paper uses 2); below 1 the gradient at a zero activation is infinite.

  Returns:
    [B, H*W] float32 maps, each row of unit L2 norm (or all zeros), row-major over (H, W).
  """
  if not p >= 1:
    raise ValueError(f"attention_map: p must be >= 1, got {p!r}")
  a = jnp.asarray(features_BxHxWxC).astype(F32)
  # p = 2 (the paper's choice) squares exactly instead of going through pow.
  powered = jnp.square(a) if p == 2 else jnp.abs(a) ** p
  q_BxN = jnp.sum(powered, axis=-1).reshape(a.shape[0], -1)
  sum_sq_Bx1 = jnp.sum(jnp.square(q_BxN), axis=-1, keepdims=True)
  # max() picks the constant for a zero map, so no 1/sqrt(0) reaches the gradient.
  return q_BxN * jax.lax.rsqrt(jnp.maximum(sum_sq_Bx1, _AT_NORM_EPS**2))


def attention_transfer(
  s_BxHxWxC, t_BxHxWxC, weights_B, denom, *, p: float = 2.0, kind: str = "paper"
) -> LossAndMetrics:
  """Attention transfer (Zagoruyko & Komodakis 2017) between one student and one teacher map.

  Attention maps are channel-free, so Cs and Ct may differ. If the spatial sizes differ, the
  FEATURES are pooled to the smaller size (``pool_to``) before the maps are computed.

  Args:
    s_BxHxWxC: [B, Hs, Ws, Cs] student activations.
    t_BxHxWxC: [B, Ht, Wt, Ct] teacher activations (gradient stopped).
    weights_B: [B] per-example weights (0 = padding row).
    denom: scalar global sum of weights.
    p: exponent of ``attention_map`` (2 in the paper).
    kind: "paper" -> || Q_s - Q_t ||_2 per example (the paper's norm, NOT squared, without
      its beta/2 factor: the weight comes from the config); "squared" -> the authors' public
      code, mean over the h*w positions of (Q_s - Q_t)^2 per example.

  Returns:
    (loss, {"distill/attention_transfer": loss}), loss a float32 scalar.
  """
  if kind not in AT_KINDS:
    raise ValueError(f"unknown attention transfer kind {kind!r}; valid kinds: {list(AT_KINDS)}")
  _check_maps("attention_transfer", s_BxHxWxC, t_BxHxWxC, weights_B)
  s = _zero_padded_rows(s_BxHxWxC, weights_B)
  t = _zero_padded_rows(jax.lax.stop_gradient(t_BxHxWxC), weights_B)
  s, t = _pair_to_smaller(s, t)
  diff_BxN = attention_map(s, p) - attention_map(t, p)
  sum_sq_B = jnp.sum(jnp.square(diff_BxN), axis=-1)
  if kind == "paper":
    # Double-where: equal maps give distance 0 with gradient 0, not sqrt'(0) = inf.
    positive_B = sum_sq_B > 0
    per_example_B = jnp.where(positive_B, jnp.sqrt(jnp.where(positive_B, sum_sq_B, 1.0)), 0.0)
  else:
    per_example_B = sum_sq_B / diff_BxN.shape[-1]
  loss = _weighted_total(per_example_B, weights_B, denom)
  return loss, {"distill/attention_transfer": loss}


# --- FitNets-style feature maps through a 1x1 convolution ---


def init_conv_projection(rng: jax.Array, c_student: int, c_teacher: int) -> dict[str, jax.Array]:
  """A 1x1 convolution from the student's to the teacher's channels, as plain arrays.

  A 1x1 conv is a per-pixel matmul, so the kernel is stored as a [Cs, Ct] matrix, LeCun-normal
  like ``losses.init_projection`` (fan-in Cs), and the bias starts at zero. The caller owns it
  as a trainable param and drops it at export.

  Args:
    rng: PRNG key.
    c_student: Cs, the student map's channels.
    c_teacher: Ct, the teacher map's channels.

  Returns:
    {"kernel": [Cs, Ct] float32, "bias": [Ct] float32}.
  """
  kernel = jax.nn.initializers.lecun_normal()(rng, (c_student, c_teacher), F32)
  return {"kernel": kernel, "bias": jnp.zeros((c_teacher,), F32)}


def _check_projection(s_shape, t_shape, projection) -> None:
  """Shape checks of the optional 1x1 conv, before any math."""
  c_student, c_teacher = s_shape[-1], t_shape[-1]
  if projection is None:
    if c_student != c_teacher:
      raise ValueError(
        f"feature_map_loss: channels differ (student {c_student}, teacher {c_teacher}) and "
        "no projection was given; pass projection=init_conv_projection(rng, Cs, Ct)"
      )
    return
  kernel, bias = projection["kernel"], projection["bias"]
  if tuple(kernel.shape) != (c_student, c_teacher) or tuple(bias.shape) != (c_teacher,):
    raise ValueError(
      f"feature_map_loss: projection kernel {tuple(kernel.shape)} / bias {tuple(bias.shape)} "
      f"do not map {c_student} student channels to {c_teacher} teacher channels"
    )


def feature_map_loss(
  kind: str, s_BxHxWxC, t_BxHxWxC, weights_B, denom, projection=None
) -> LossAndMetrics:
  """FitNets-style matching of a student and a teacher feature map.

  Spatial sizes that differ are pooled to the smaller one (``pool_to``). Pooling happens
  before the projection; the two commute exactly (a 1x1 conv is per-pixel affine and every
  pooled value is a mean), and pooling first is cheaper.

  Args:
    kind: "mse" -> mean over (h, w, Ct) of the squared error per example; "cosine" ->
      1 - cos(student pixel, teacher pixel) over channels, mean over the h*w pixels (norms
      floored at 1e-8, so zero maps give finite values and gradients).
    s_BxHxWxC: [B, Hs, Ws, Cs] student map.
    t_BxHxWxC: [B, Ht, Wt, Ct] teacher map (gradient stopped).
    weights_B: [B] per-example weights (0 = padding row).
    denom: scalar global sum of weights.
    projection: optional {"kernel": [Cs, Ct], "bias": [Ct]} (``init_conv_projection``),
      trained with the student; without it Cs must equal Ct.

  Returns:
    (loss, {"distill/feature_map": loss}).
  """
  if kind not in FEATURE_MAP_KINDS:
    raise ValueError(
      f"unknown feature map loss kind {kind!r}; valid kinds: {list(FEATURE_MAP_KINDS)}"
    )
  _check_maps("feature_map_loss", s_BxHxWxC, t_BxHxWxC, weights_B)
  _check_projection(s_BxHxWxC.shape, t_BxHxWxC.shape, projection)
  s = _zero_padded_rows(s_BxHxWxC, weights_B)
  t = _zero_padded_rows(jax.lax.stop_gradient(t_BxHxWxC), weights_B)
  s, t = _pair_to_smaller(s, t)
  if projection is not None:  # a 1x1 conv: the same [Cs, Ct] matmul at every pixel
    kernel, bias = projection["kernel"].astype(F32), projection["bias"].astype(F32)
    s = jnp.einsum("bhwc,cd->bhwd", s, kernel) + bias
  if kind == "mse":
    per_example_B = jnp.mean(jnp.square(s - t), axis=(1, 2, 3))
  else:
    dot_BxHxW = jnp.sum(s * t, axis=-1)
    inv_s = jax.lax.rsqrt(jnp.maximum(jnp.sum(s * s, axis=-1), _COS_EPS_SQ))
    inv_t = jax.lax.rsqrt(jnp.maximum(jnp.sum(t * t, axis=-1), _COS_EPS_SQ))
    per_example_B = jnp.mean(1.0 - dot_BxHxW * inv_s * inv_t, axis=(1, 2))
  loss = _weighted_total(per_example_B, weights_B, denom)
  return loss, {"distill/feature_map": loss}
