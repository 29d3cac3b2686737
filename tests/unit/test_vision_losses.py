"""Tests for distill.vision_losses and evaluation.classify against float64 NumPy.

The references below are written independently of the implementation (loops over pooling
windows, explicit per-example sums; the feature-map reference projects BEFORE pooling, the
implementation after, which also checks that the two commute).

Shape legend: B batch, H x W spatial, C channels, N = H*W positions, K classes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import vision_losses as vl
from jaxdistill.evaluation import classify as cm

RTOL, ATOL = 2e-5, 1e-6
# Row 2 is padding; denom deliberately differs from weights.sum() so a loss that takes its
# own mean would fail.
WEIGHTS_B = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
DENOM = 4.25
B = len(WEIGHTS_B)

# Jitted once per static signature: eager op-by-op dispatch would dominate the test time. The
# error tests call the plain functions.
POOL_TO = jax.jit(vl.pool_to, static_argnums=1)
ATTENTION_MAP = jax.jit(vl.attention_map, static_argnames="p")
AT = jax.jit(vl.attention_transfer, static_argnames=("p", "kind"))
FEATURE_MAP = jax.jit(vl.feature_map_loss, static_argnums=0)
INIT_PROJECTION = jax.jit(vl.init_conv_projection, static_argnums=(1, 2))
TOPK = jax.jit(cm.topk_correct, static_argnums=3)
AGREEMENT = jax.jit(cm.agreement)
KL_SUM = jax.jit(cm.kl_sum)
BINS = jax.jit(cm.calibration_bins, static_argnames="num_bins")
ECE = jax.jit(cm.ece)


# ---------------------------------------------------------------------------
# float64 NumPy references
# ---------------------------------------------------------------------------


def np_pool(x, h, w):
  """Adaptive average pooling by explicit windows [floor(i n / m), ceil((i + 1) n / m))."""
  x = np.asarray(x, np.float64)
  H, W = x.shape[1:3]
  out = np.zeros((x.shape[0], h, w, x.shape[3]))
  for i in range(h):
    r0, r1 = math.floor(i * H / h), math.ceil((i + 1) * H / h)
    for j in range(w):
      c0, c1 = math.floor(j * W / w), math.ceil((j + 1) * W / w)
      out[:, i, j, :] = x[:, r0:r1, c0:c1, :].mean(axis=(1, 2))
  return out


def np_pool_pair(s, t):
  h, w = min(s.shape[1], t.shape[1]), min(s.shape[2], t.shape[2])
  return np_pool(s, h, w), np_pool(t, h, w)


def np_attention_map(x, p=2.0):
  x = np.asarray(x, np.float64)
  q = (np.abs(x) ** p).sum(axis=-1).reshape(x.shape[0], -1)
  norm = np.sqrt((q**2).sum(axis=-1, keepdims=True))
  return q / np.maximum(norm, 1e-12)


def np_weighted(per_example, weights, denom):
  return float(np.sum(np.where(weights != 0, per_example * weights, 0.0)) / denom)


def np_attention_transfer(s, t, weights, denom, p=2.0, kind="paper"):
  s, t = np_pool_pair(s, t)
  diff = np_attention_map(s, p) - np_attention_map(t, p)
  if kind == "paper":
    per = np.sqrt((diff**2).sum(axis=-1))
  else:
    per = (diff**2).mean(axis=-1)
  return np_weighted(per, weights, denom)


def np_feature_map(kind, s, t, weights, denom, projection=None):
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  if projection is not None:  # project first, then pool (the implementation pools first)
    s = s @ np.asarray(projection["kernel"], np.float64) + np.asarray(projection["bias"])
  s, t = np_pool_pair(s, t)
  if kind == "mse":
    per = ((s - t) ** 2).mean(axis=(1, 2, 3))
  else:
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    per = (1.0 - cos).mean(axis=(1, 2))
  return np_weighted(per, weights, denom)


def _maps(seed, h, w, c, b=B):
  # Post-ReLU-like maps (non-negative, some exact zeros), as the stages of a CNN give.
  x = np.random.default_rng(seed).normal(size=(b, h, w, c))
  return np.maximum(x, -0.2).astype(np.float32)


def _garbage_rows(x, weights):
  x = np.array(x, copy=True)
  x[weights == 0] = np.nan
  x[weights == 0, 0, 0, 0] = np.inf
  return x


# ---------------------------------------------------------------------------
# Pooling and attention maps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,size", [((8, 8), (4, 4)), ((7, 7), (4, 4)), ((7, 5), (3, 5)), ((6, 9), 3), ((5, 5), 5)]
)
def test_pool_to_matches_numpy(shape, size):
  x = _maps(0, *shape, 3)
  h, w = (size, size) if isinstance(size, int) else size
  out = POOL_TO(x, size)
  assert out.shape == (B, h, w, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), np_pool(x, h, w), rtol=RTOL, atol=ATOL)


def test_pool_to_windows_of_a_non_integer_ratio_and_integer_factor_is_avg_pool():
  # 7 -> 4: rows [0,2), [1,4), [3,6), [5,7) (overlapping by one), hand-computed on a ramp.
  ramp = np.broadcast_to(np.arange(7.0)[None, :, None, None], (1, 7, 1, 1)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(POOL_TO(ramp, (4, 1)))[0, :, 0, 0], [0.5, 2, 4, 5.5])
  # An integer factor is flax's plain non-overlapping average pooling.
  x = _maps(1, 8, 8, 2)
  np.testing.assert_allclose(
    np.asarray(POOL_TO(x, 4)), np.asarray(nn.avg_pool(x, (2, 2), (2, 2))), rtol=1e-6, atol=1e-7
  )


def test_pool_to_rejects_upsampling():
  with pytest.raises(ValueError, match="cannot pool a 4x4 map to 8x8"):
    vl.pool_to(_maps(0, 4, 4, 1), 8)
  with pytest.raises(ValueError, match="cannot pool"):
    vl.pool_to(_maps(0, 4, 4, 1), (0, 2))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_attention_map_matches_numpy_and_has_unit_rows(p):
  x = _maps(2, 5, 6, 4)
  q = np.asarray(ATTENTION_MAP(x, p))
  assert q.shape == (B, 30) and q.dtype == np.float32
  np.testing.assert_allclose(q, np_attention_map(x, p), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="p must be >= 1"):
    vl.attention_map(x, 0.5)


def test_attention_map_of_a_zero_map_is_zero_with_finite_gradient():
  zero = np.zeros((2, 4, 4, 3), np.float32)
  assert np.all(np.asarray(ATTENTION_MAP(zero)) == 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(ATTENTION_MAP(x) * jnp.arange(16.0))))(zero)
  assert np.all(np.isfinite(np.asarray(grad)))


# ---------------------------------------------------------------------------
# Attention transfer
# ---------------------------------------------------------------------------

AT_SHAPES = [
  ((8, 8, 3), (8, 8, 5)),  # same size, channels differ
  ((8, 8, 3), (4, 4, 6)),  # student pooled 8 -> 4
  ((4, 4, 6), (8, 8, 3)),  # teacher pooled 8 -> 4
  ((7, 7, 2), (4, 4, 2)),  # non-integer ratio, adaptive windows
  ((6, 3, 2), (3, 6, 2)),  # each axis pooled to its own minimum: 3 x 3
]


@pytest.mark.parametrize("kind", vl.AT_KINDS)
@pytest.mark.parametrize("s_shape,t_shape", AT_SHAPES)
def test_attention_transfer_matches_numpy(kind, s_shape, t_shape):
  s, t = _maps(3, *s_shape), _maps(4, *t_shape)
  loss, metrics = AT(s, t, WEIGHTS_B, DENOM, kind=kind)
  expected = np_attention_transfer(s, t, WEIGHTS_B, DENOM, kind=kind)
  assert loss.dtype == jnp.float32 and set(metrics) == {"distill/attention_transfer"}
  np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)


def test_attention_transfer_kinds_differ_and_p_matters():
  s, t = _maps(5, 8, 8, 3), _maps(6, 4, 4, 5)
  paper = float(AT(s, t, WEIGHTS_B, DENOM)[0])
  squared = float(AT(s, t, WEIGHTS_B, DENOM, kind="squared")[0])
  # The paper's norm is not its square, nor the positional mean of the squares.
  s_p, t_p = np_pool_pair(s, t)
  diff = np_attention_map(s_p) - np_attention_map(t_p)
  assert not np.isclose(paper, np_weighted((diff**2).sum(-1), WEIGHTS_B, DENOM), rtol=1e-3)
  assert not np.isclose(paper, squared, rtol=1e-3)
  p4 = float(AT(s, t, WEIGHTS_B, DENOM, p=4.0)[0])
  np.testing.assert_allclose(p4, np_attention_transfer(s, t, WEIGHTS_B, DENOM, p=4.0), rtol=RTOL)
  assert not np.isclose(p4, paper, rtol=1e-3)
  with pytest.raises(ValueError, match="unknown attention transfer kind"):
    vl.attention_transfer(s, t, WEIGHTS_B, DENOM, kind="l1")


def _np_grad_fd(fn, x, eps=1e-6):
  """Central finite differences of a float64 NumPy function."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    hi, lo = x.copy(), x.copy()
    hi[idx] += eps
    lo[idx] -= eps
    grad[idx] = (fn(hi) - fn(lo)) / (2 * eps)
  return grad


@pytest.mark.parametrize("kind", vl.AT_KINDS)
def test_attention_transfer_gradient_matches_numpy_finite_differences(kind):
  weights = np.array([1.0, 0.0, 2.0], np.float32)
  s, t = _maps(7, 6, 6, 2, b=3), _maps(8, 3, 3, 4, b=3)
  grad = jax.jit(jax.grad(lambda x: AT(x, t, weights, 2.5, kind=kind)[0]))(s)
  expected = _np_grad_fd(lambda x: np_attention_transfer(x, t, weights, 2.5, kind=kind), s)
  assert np.abs(expected).max() > 1e-3  # a real gradient to compare
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-3, atol=1e-5)
  assert np.all(np.asarray(grad)[1] == 0.0)  # the padding row


def test_attention_transfer_of_zero_maps_is_finite():
  zero, t = np.zeros((B, 4, 4, 3), np.float32), _maps(9, 4, 4, 3)
  for kind in vl.AT_KINDS:
    loss_and_grad = jax.jit(
      jax.value_and_grad(lambda x, y: AT(x, y, WEIGHTS_B, DENOM, kind=kind)[0])
    )
    for s_in, t_in in ((zero, t), (t, zero), (zero, zero), (t, t)):
      loss, grad = loss_and_grad(s_in, t_in)
      assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))), kind
  # Equal maps: distance 0 up to rounding (the paper kind's sqrt at 0 has a zero gradient).
  assert float(AT(t, t, WEIGHTS_B, DENOM)[0]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------
# Feature maps (FitNets) through a 1x1 conv
# ---------------------------------------------------------------------------


def _projection(seed, cs, ct):
  proj = INIT_PROJECTION(jax.random.key(seed), cs, ct)
  # A non-zero bias, so the test sees whether it is applied.
  return {"kernel": proj["kernel"], "bias": jnp.linspace(-0.5, 0.5, ct)}


@pytest.mark.parametrize("kind", vl.FEATURE_MAP_KINDS)
@pytest.mark.parametrize(
  "s_shape,t_shape",
  [((4, 4, 5), (4, 4, 5)), ((8, 8, 3), (4, 4, 6)), ((4, 4, 6), (8, 8, 3)), ((7, 7, 3), (4, 4, 5))],
)
def test_feature_map_loss_matches_numpy(kind, s_shape, t_shape):
  s, t = _maps(10, *s_shape), _maps(11, *t_shape)
  proj = _projection(0, s_shape[-1], t_shape[-1]) if s_shape[-1] != t_shape[-1] else None
  loss, metrics = FEATURE_MAP(kind, s, t, WEIGHTS_B, DENOM, projection=proj)
  expected = np_feature_map(kind, s, t, WEIGHTS_B, DENOM, proj)
  assert set(metrics) == {"distill/feature_map"}
  np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)


def test_feature_map_cosine_zero_maps_and_projection_gradient():
  zero, t = np.zeros((B, 4, 4, 3), np.float32), _maps(12, 4, 4, 3)
  for kind in vl.FEATURE_MAP_KINDS:
    loss_and_grad = jax.jit(
      jax.value_and_grad(lambda x, y: FEATURE_MAP(kind, x, y, WEIGHTS_B, DENOM)[0])
    )
    for s_in, t_in in ((zero, t), (t, zero), (zero, zero)):
      loss, grad = loss_and_grad(s_in, t_in)
      assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad))), kind
  # The projection's gradient against finite differences of the float64 reference.
  s, t6 = _maps(13, 4, 4, 2), _maps(14, 2, 2, 3)
  proj = _projection(1, 2, 3)
  grad = jax.jit(
    jax.grad(lambda k: FEATURE_MAP("cosine", s, t6, WEIGHTS_B, DENOM, {**proj, "kernel": k})[0])
  )(proj["kernel"])
  expected = _np_grad_fd(
    lambda k: np_feature_map("cosine", s, t6, WEIGHTS_B, DENOM, {**proj, "kernel": k}),
    proj["kernel"],
  )
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-3, atol=1e-5)


def test_feature_map_errors_and_init_conv_projection():
  s, t = _maps(0, 4, 4, 3), _maps(1, 4, 4, 5)
  with pytest.raises(ValueError, match="channels differ .* no projection"):
    vl.feature_map_loss("mse", s, t, WEIGHTS_B, DENOM)
  with pytest.raises(ValueError, match="do not map 3 student channels to 5"):
    vl.feature_map_loss("mse", s, t, WEIGHTS_B, DENOM, projection=_projection(0, 3, 4))
  with pytest.raises(ValueError, match="unknown feature map loss kind"):
    vl.feature_map_loss("l1", s, s, WEIGHTS_B, DENOM)
  with pytest.raises(ValueError, match="batch sizes"):
    vl.feature_map_loss("mse", s, s[:2], WEIGHTS_B, DENOM)
  with pytest.raises(ValueError, match=r"must be \[B, H, W, C\]"):
    vl.attention_transfer(s[0], s[0], WEIGHTS_B, DENOM)
  proj = INIT_PROJECTION(jax.random.key(0), 64, 32)
  assert proj["kernel"].shape == (64, 32) and proj["kernel"].dtype == jnp.float32
  assert proj["bias"].shape == (32,) and np.all(np.asarray(proj["bias"]) == 0)
  np.testing.assert_allclose(np.std(np.asarray(proj["kernel"])), 1 / 8, rtol=0.15)  # 1/sqrt(Cs)


# ---------------------------------------------------------------------------
# Shared conventions: padding, teacher, denom, dtype, jit, additivity
# ---------------------------------------------------------------------------


def _loss_fns():
  proj = _projection(2, 3, 5)
  return {
    "at-paper": lambda s, t, w, d: AT(s, t, w, d)[0],
    "at-squared": lambda s, t, w, d: AT(s, t, w, d, kind="squared")[0],
    "fm-mse": lambda s, t, w, d: FEATURE_MAP("mse", s, t, w, d, proj)[0],
    "fm-cosine": lambda s, t, w, d: FEATURE_MAP("cosine", s, t, w, d, proj)[0],
  }


LOSS_FNS = _loss_fns()
S_MAP, T_MAP = _maps(20, 8, 8, 3), _maps(21, 4, 4, 5)


@pytest.mark.parametrize("name", LOSS_FNS)
def test_padding_rows_contribute_nothing_and_teacher_gets_no_gradient(name):
  fn = LOSS_FNS[name]
  loss_and_grad = jax.jit(jax.value_and_grad(fn))
  clean, clean_grad = loss_and_grad(S_MAP, T_MAP, WEIGHTS_B, DENOM)
  dirty_s, dirty_t = _garbage_rows(S_MAP, WEIGHTS_B), _garbage_rows(T_MAP, WEIGHTS_B)
  dirty, dirty_grad = loss_and_grad(dirty_s, dirty_t, WEIGHTS_B, DENOM)
  assert np.isfinite(float(clean)) and float(clean) > 0
  np.testing.assert_allclose(float(dirty), float(clean), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(dirty_grad), np.asarray(clean_grad))
  assert np.all(np.asarray(dirty_grad)[WEIGHTS_B == 0] == 0.0)
  assert np.any(np.asarray(clean_grad) != 0.0)
  assert np.all(np.asarray(jax.jit(jax.grad(fn, argnums=1))(S_MAP, T_MAP, WEIGHTS_B, DENOM)) == 0.0)
  # An all-padding global batch (denom 0) gives 0 and zero gradients, not NaN.
  zero_w = np.zeros_like(WEIGHTS_B)
  loss0, grad0 = loss_and_grad(S_MAP, T_MAP, zero_w, 0.0)
  assert float(loss0) == 0.0 and np.all(np.asarray(grad0) == 0.0)


@pytest.mark.parametrize("name", LOSS_FNS)
def test_bf16_inputs_under_jit_and_halves_add_up(name):
  fn = jax.jit(LOSS_FNS[name])
  s16, t16 = jnp.asarray(S_MAP, jnp.bfloat16), jnp.asarray(T_MAP, jnp.bfloat16)
  loss16 = fn(s16, t16, WEIGHTS_B, DENOM)
  assert loss16.dtype == jnp.float32
  # Same as the f32 loss on the bf16-rounded values: the math itself runs in f32.
  ref = fn(np.asarray(s16, np.float32), np.asarray(t16, np.float32), WEIGHTS_B, DENOM)
  np.testing.assert_allclose(float(loss16), float(ref), rtol=1e-5)
  # Micro-batches with the global denom add up to the whole batch (the padding row in one).
  halves = sum(fn(S_MAP[sl], T_MAP[sl], WEIGHTS_B[sl], DENOM) for sl in (slice(0, 2), slice(2, 4)))
  np.testing.assert_allclose(float(halves), float(fn(S_MAP, T_MAP, WEIGHTS_B, DENOM)), rtol=1e-6)


# ---------------------------------------------------------------------------
# Classification metrics
# ---------------------------------------------------------------------------

K_CLASSES = 10
# Integer logits so there are many ties (broken towards the lower class index).
LOGITS = np.random.default_rng(30).integers(-3, 4, size=(16, K_CLASSES)).astype(np.float32)
TEACHER = np.random.default_rng(31).normal(size=(16, K_CLASSES)).astype(np.float32) * 2
LABELS = np.random.default_rng(32).integers(0, K_CLASSES, size=16).astype(np.int32)
W16 = np.random.default_rng(33).uniform(0.5, 2.0, size=16).astype(np.float32)
W16[[3, 11]] = 0.0  # padding rows


def np_topk_correct(logits, labels, weights, k):
  order = np.argsort(-np.asarray(logits, np.float64), axis=-1, kind="stable")[:, :k]
  hit = np.array([labels[b] in order[b] for b in range(len(labels))])
  return float(np.sum(weights * hit))


def np_kl_sum(t, s, weights, tau):
  def log_softmax(x):
    x = np.asarray(x, np.float64) / tau
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  logp, logq = log_softmax(t), log_softmax(s)
  p = np.exp(logp)
  kl = np.sum(p * np.where(p > 0, logp - logq, 0.0), axis=-1)
  return float(np.sum(weights * kl))


def np_ece(logits, reference, weights, num_bins):
  x = np.asarray(logits, np.float64)
  prob = np.exp(x - x.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  conf, correct = prob.max(-1), (prob.argmax(-1) == reference).astype(np.float64)
  total, gap = 0.0, 0.0
  for m in range(num_bins):
    in_bin = (conf > m / num_bins) & (conf <= (m + 1) / num_bins) & (weights != 0)
    gap += abs(np.sum(weights * correct * in_bin) - np.sum(weights * conf * in_bin))
    total += np.sum(weights * in_bin)
  return gap / total


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_topk_correct_matches_numpy(k):
  labels = np.where(W16 == 0, -1, LABELS)  # padding rows may hold any label
  got = float(TOPK(LOGITS, labels, W16, k))
  np.testing.assert_allclose(got, np_topk_correct(LOGITS, LABELS, np.where(W16 == 0, 0, W16), k))
  if k == 10:
    np.testing.assert_allclose(got, W16.sum(), rtol=1e-6)


def test_topk_ties_go_to_the_lower_index_and_k_must_be_positive():
  # Constant logits: top-1 is class 0, so only the label-0 example counts (not all).
  const = np.zeros((3, 4), np.float32)
  assert float(TOPK(const, np.array([0, 1, 3]), np.ones(3), 1)) == 1.0
  assert float(TOPK(const, np.array([0, 1, 3]), np.ones(3), 2)) == 2.0
  with pytest.raises(ValueError, match="k must be >= 1"):
    cm.topk_correct(const, np.array([0, 1, 3]), np.ones(3), 0)


def test_agreement_and_kl_sum_match_numpy():
  weights = np.where(W16 == 0, 0, W16)
  expected = float(np.sum(weights * (LOGITS.argmax(-1) == TEACHER.argmax(-1))))
  np.testing.assert_allclose(float(AGREEMENT(LOGITS, TEACHER, W16)), expected, rtol=1e-6)
  teacher = TEACHER.copy()
  teacher[0, 2] = -np.inf  # a class the teacher rules out: 0 log 0 = 0
  for tau in (1.0, 2.0):
    got = float(KL_SUM(teacher, LOGITS, W16, temperature=tau))
    np.testing.assert_allclose(got, np_kl_sum(teacher, LOGITS, weights, tau), rtol=RTOL)
  # Argument order matters: KL(teacher || student), not the reverse.
  reverse = np_kl_sum(LOGITS, TEACHER, weights, 1.0)
  assert not np.isclose(float(KL_SUM(TEACHER, LOGITS, W16)), reverse, rtol=1e-3)
  assert float(KL_SUM(TEACHER, TEACHER, W16)) == pytest.approx(0.0, abs=1e-5)


def _two_class(confidence, winner):
  """Logits [2] whose softmax puts `confidence` on class `winner`."""
  logits = np.array([math.log(confidence), math.log1p(-confidence)], np.float32)
  return logits if winner == 0 else logits[::-1]


def test_ece_with_hand_known_bins():
  # 10 bins, right-closed (m/10, (m+1)/10]. Hand-computed:
  #   bin 4: conf 0.5 (a tie; top-1 is class 0, label 1: wrong)  -> |0 - 0.5|    = 0.5
  #   bin 5: conf 0.55 right                                    -> |1 - 0.55|   = 0.45
  #   bin 6: conf 0.65 right, 0.65 wrong                        -> |1 - 1.3|    = 0.3
  #   bin 9: conf 0.95 right, 1.0 right                         -> |2 - 1.95|   = 0.05
  #   ECE = (0.5 + 0.45 + 0.3 + 0.05) / 6 = 1.3 / 6
  logits = np.stack(
    [
      np.zeros(2, np.float32),
      _two_class(0.55, 1),
      _two_class(0.65, 0),
      _two_class(0.65, 0),
      _two_class(0.95, 1),
      np.array([30.0, -30.0], np.float32),  # confidence 1.0 in float32: the last bin
      np.full(2, np.nan, np.float32),  # padding
    ]
  )
  labels = np.array([1, 1, 0, 1, 1, 0, 5])
  weights = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)
  bins = BINS(logits, labels, weights, num_bins=10)
  np.testing.assert_array_equal(np.asarray(bins.count), [0, 0, 0, 0, 1, 1, 2, 0, 0, 2])
  np.testing.assert_allclose(np.asarray(bins.correct_sum), [0, 0, 0, 0, 0, 1, 1, 0, 0, 2])
  np.testing.assert_allclose(
    np.asarray(bins.confidence_sum), [0, 0, 0, 0, 0.5, 0.55, 1.3, 0, 0, 1.95], rtol=1e-6
  )
  np.testing.assert_allclose(float(ECE(bins)), 1.3 / 6, rtol=1e-6)
  # Weights count: doubling the wrong tie example doubles its bin's mass.
  heavy = BINS(logits, labels, weights * np.array([2, 1, 1, 1, 1, 1, 1]), 10)
  np.testing.assert_allclose(float(ECE(heavy)), 1.8 / 7, rtol=1e-6)
  # No examples: ECE 0, not NaN.
  assert float(ECE(BINS(logits, labels, np.zeros(7), 10))) == 0.0


@pytest.mark.parametrize("against", ["labels", "teacher"])
def test_ece_matches_numpy(against):
  logits = TEACHER * 1.7 + LOGITS  # fewer ties, spread confidences
  reference = LABELS if against == "labels" else TEACHER.argmax(-1)
  weights = np.where(W16 == 0, 0, W16)
  got = float(ECE(BINS(logits, reference, W16)))
  np.testing.assert_allclose(got, np_ece(logits, reference, weights, 15), rtol=1e-5)
  assert not np.isclose(got, np_ece(logits, reference, weights, 10), rtol=1e-3)


def test_metric_sums_over_two_halves_equal_the_whole_batch():
  halves = (slice(0, 8), slice(8, None))  # one padding row in each

  def both(fn):
    whole = fn(slice(None))
    parts = [fn(sl) for sl in halves]
    return whole, jax.tree.map(lambda a, b: a + b, *parts)

  checks = {
    "top5": lambda sl: TOPK(LOGITS[sl], LABELS[sl], W16[sl], 5),
    "agreement": lambda sl: AGREEMENT(LOGITS[sl], TEACHER[sl], W16[sl]),
    "kl": lambda sl: KL_SUM(TEACHER[sl], LOGITS[sl], W16[sl], 2.0),
    "bins": lambda sl: BINS(TEACHER[sl], LABELS[sl], W16[sl]),
  }
  for name, fn in checks.items():
    whole, summed = both(fn)
    for w, s in zip(jax.tree.leaves(whole), jax.tree.leaves(summed)):
      np.testing.assert_allclose(np.asarray(s), np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=name)
  whole, summed = both(checks["bins"])
  np.testing.assert_allclose(float(ECE(summed)), float(ECE(whole)), rtol=1e-5)
  assert float(ECE(whole)) > 0.01  # a real calibration gap to compare
