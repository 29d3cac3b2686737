import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # noqa: E702,E501

"""Tests for jaxdistill.distill.losses against independent float64 NumPy references.

Shape legend: B batch, T length, V vocab, H heads, K head dim, D width.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import layer_maps, losses

B, T, V, H = 2, 5, 11, 3
RTOL, ATOL = 1e-5, 1e-6
# Padding in both rows; denom deliberately differs from mask.sum() so a loss that
# takes its own mean would fail.
MASK_BxT = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=np.float32)
DENOM = 13.0


# ---------------------------------------------------------------------------
# float64 NumPy references (written independently of the implementation)
# ---------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_kl(p, q):
  """sum p log(p/q) over the last axis with 0 log 0 = 0 (probabilities in)."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  safe_p = np.where(p > 0, p, 1.0)
  safe_q = np.where(p > 0, q, 1.0)
  return np.sum(np.where(p > 0, p * np.log(safe_p / safe_q), 0.0), axis=-1)


def np_divergence(kind, s, t, tau, beta=0.5):
  q = np.exp(np_log_softmax(np.asarray(s, np.float64) / tau))
  p = np.exp(np_log_softmax(np.asarray(t, np.float64) / tau))
  if kind == "kl":
    d = np_kl(p, q)
  elif kind == "reverse_kl":
    d = np_kl(q, p)
  else:
    m = beta * p + (1 - beta) * q
    d = beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  return d * tau**2


def np_masked_total(per_token, mask, denom):
  return float(np.sum(np.where(mask != 0, per_token, 0.0)) / denom)


def np_softmax_rows(scores):
  return np.exp(np_log_softmax(scores))


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


def _logits(seed, scale=3.0):
  return (np.random.default_rng(seed).normal(size=(B, T, V)) * scale).astype(np.float32)


def _garbage_padded(x, mask, values=(1e30, np.inf, np.nan, -np.inf)):
  """Copy of x with every padded [b, t] position filled by inf / NaN / huge values."""
  x = np.array(x, copy=True)
  pad = np.argwhere(np.asarray(mask) == 0)
  for i, (b, t) in enumerate(pad):
    x[b, t] = values[i % len(values)]
  return x


def _garbage_attention(probs, mask):
  """Garbage in padded query rows and padded key columns of [B, H, T, T] probs."""
  probs = np.array(probs, copy=True)
  for b, t in np.argwhere(np.asarray(mask) == 0):
    probs[b, :, t, :] = np.nan
    probs[b, :, :, t] = 1e30
  return probs


def _attention_probs(seed, mask, causal=True):
  """Random attention probabilities [B, H, T, T], masked like a real model."""
  scores = np.random.default_rng(seed).normal(size=(B, H, T, T)) * 2.0
  allowed = np.broadcast_to(mask[:, None, None, :] != 0, scores.shape)
  if causal:
    allowed = allowed & np.tril(np.ones((T, T), bool))[None, None]
  scores = np.where(allowed, scores, -np.inf)
  # Padded query rows of a causal model may have no allowed key: keep them finite.
  scores = np.where(allowed.any(-1, keepdims=True), scores, 0.0)
  return np_softmax_rows(scores).astype(np.float32)


# ---------------------------------------------------------------------------
# Logit divergences
# ---------------------------------------------------------------------------

LOGIT_CASES = [("kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.9)]


@pytest.mark.parametrize("kind,beta", LOGIT_CASES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_logit_loss_matches_numpy(kind, beta, tau):
  s, t = _logits(0), _logits(1)
  loss, metrics = losses.logit_loss(kind, s, t, MASK_BxT, DENOM, temperature=tau, beta=beta)
  expected = np_masked_total(np_divergence(kind, s, t, tau, beta), MASK_BxT, DENOM)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)
  assert set(metrics) == {f"distill/{kind}"}
  assert float(metrics[f"distill/{kind}"]) == float(loss)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_per_token_matches_numpy_and_bf16_inputs(kind):
  s, t = _logits(2), _logits(3)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  fn = losses.LOGIT_DIVERGENCES[kind]
  args = (0.3,) if kind == "jsd" else ()
  out = fn(s16, t16, 1.7, *args)
  assert out.dtype == jnp.float32 and out.shape == (B, T)
  # Reference on the bf16-rounded values: the math itself must be f32.
  ref = np_divergence(kind, np.asarray(s16, np.float64), np.asarray(t16, np.float64), 1.7, *args)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_divergence_of_identical_distributions_is_zero(kind):
  x = _logits(4)
  out = losses.LOGIT_DIVERGENCES[kind](x, x, 2.0, *((0.5,) if kind == "jsd" else ()))
  np.testing.assert_allclose(np.asarray(out), 0.0, atol=1e-6)
  # And it is not trivially zero for different inputs.
  assert np.all(
    np.asarray(
      losses.LOGIT_DIVERGENCES[kind](x, _logits(5), 2.0, *((0.5,) if kind == "jsd" else ()))
    )
    > 1e-4
  )


def test_jsd_half_is_symmetric_and_bounded_by_log2():
  s, t = _logits(6), _logits(7)
  a = np.asarray(losses.jsd_per_token(s, t, 1.0, 0.5))
  b = np.asarray(losses.jsd_per_token(t, s, 1.0, 0.5))
  np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  assert np.all(a <= math.log(2) + 1e-6)
  # Nearly disjoint supports approach the bound.
  one_hot_s = np.eye(V, dtype=np.float32)[None, :2] * 60.0
  one_hot_t = np.eye(V, dtype=np.float32)[None, 5:7] * 60.0
  far = np.asarray(losses.jsd_per_token(one_hot_s, one_hot_t, 1.0, 0.5))
  assert np.all(far <= math.log(2) + 1e-6) and np.all(far > math.log(2) - 1e-4)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_ends_are_exactly_zero_with_finite_gradients(beta):
  s, t = _logits(8), _logits(9)
  out = losses.jsd_per_token(s, t, 2.0, beta)
  assert np.all(np.asarray(out) == 0.0)
  grad = jax.grad(lambda x: jnp.sum(losses.jsd_per_token(x, t, 2.0, beta)))(s)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_forward_kl_gradient_is_tau_times_q_minus_p(tau):
  s, t = _logits(10), _logits(11)
  grad = jax.grad(lambda x: losses.logit_loss("kl", x, t, MASK_BxT, 1.0, temperature=tau)[0])(s)
  q = np.exp(np_log_softmax(s.astype(np.float64) / tau))
  p = np.exp(np_log_softmax(t.astype(np.float64) / tau))
  expected = np.where(MASK_BxT[..., None] != 0, tau * (q - p), 0.0)
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[MASK_BxT == 0] == 0.0)


def test_teacher_logits_with_minus_inf_are_safe():
  s, t = _logits(12), _logits(13)
  t[..., :3] = -np.inf  # e.g. a teacher that bans some tokens
  for kind in ("kl", "jsd"):
    loss, _ = losses.logit_loss(kind, s, t, MASK_BxT, DENOM, temperature=1.0)
    expected = np_masked_total(np_divergence(kind, s, t, 1.0), MASK_BxT, DENOM)
    np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)
    grad = jax.grad(lambda x: losses.logit_loss(kind, x, t, MASK_BxT, DENOM, temperature=1.0)[0])(s)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_logit_loss_rejects_unknown_kind_and_shape_mismatch():
  s, t = _logits(0), _logits(1)
  with pytest.raises(ValueError, match="jsd.*kl.*reverse_kl"):
    losses.logit_loss("tvd", s, t, MASK_BxT, DENOM, temperature=1.0)
  with pytest.raises(ValueError, match="shape"):
    losses.logit_loss("kl", s[..., :-1], t, MASK_BxT, DENOM, temperature=1.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.logit_loss("kl", s, t, MASK_BxT, DENOM, temperature=0.0)


def test_zero_denominator_gives_zero_not_nan():
  s, t = _logits(0), _logits(1)
  zeros = np.zeros_like(MASK_BxT)
  loss, _ = losses.logit_loss("kl", s, t, zeros, 0.0, temperature=1.0)
  grad = jax.grad(lambda x: losses.logit_loss("kl", x, t, zeros, 0.0, temperature=1.0)[0])(s)
  assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)


# ---------------------------------------------------------------------------
# Cross-entropy
# ---------------------------------------------------------------------------


def test_cross_entropy_is_plain_mean_ce_over_valid_tokens():
  logits = _logits(14)
  targets = np.random.default_rng(15).integers(0, V, size=(B, T))
  targets[MASK_BxT == 0] = -1  # ignore-index style padding labels
  loss, metrics = losses.cross_entropy(logits, targets, MASK_BxT, MASK_BxT.sum())
  logq = np_log_softmax(logits)
  valid = MASK_BxT != 0
  nll = -logq[valid, targets[valid]]
  np.testing.assert_allclose(float(loss), nll.mean(), rtol=RTOL, atol=ATOL)
  assert set(metrics) == {"task/ce"}
  # With a global denom it is a sum / denom, not a local mean.
  loss13, _ = losses.cross_entropy(logits, targets, MASK_BxT, DENOM)
  np.testing.assert_allclose(float(loss13), nll.sum() / DENOM, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Attention and value relations
# ---------------------------------------------------------------------------


def np_attention_kl(a_s, a_t, mask, denom):
  kl_BxHxT = np_kl(a_t, a_s)
  return np_masked_total(kl_BxHxT.mean(axis=1), mask, denom)


def test_attention_kl_matches_numpy_and_is_zero_for_identical():
  a_s, a_t = _attention_probs(20, MASK_BxT), _attention_probs(21, MASK_BxT)
  loss, metrics = losses.attention_kl(a_s, a_t, MASK_BxT, DENOM)
  np.testing.assert_allclose(
    float(loss), np_attention_kl(a_s, a_t, MASK_BxT, DENOM), rtol=RTOL, atol=ATOL
  )
  assert float(loss) > 1e-3 and set(metrics) == {"distill/attention"}
  same, _ = losses.attention_kl(a_t, a_t, MASK_BxT, DENOM)
  np.testing.assert_allclose(float(same), 0.0, atol=1e-7)


def test_attention_kl_over_all_keys_when_only_some_rows_carry_loss():
  # A prompt's positions carry no loss (weights 0) but are attended to: with keys_BxT every
  # weighted row's KL is over its whole distribution (as NumPy's), so it is never negative.
  a_s, a_t = _attention_probs(22, MASK_BxT), _attention_probs(23, MASK_BxT)
  rows = MASK_BxT.copy()
  rows[:, :2] = 0  # the first two positions: a prompt
  loss, _ = losses.attention_kl(a_s, a_t, rows, DENOM, keys_BxT=MASK_BxT)
  np.testing.assert_allclose(
    float(loss), np_attention_kl(a_s, a_t, rows, DENOM), rtol=RTOL, atol=ATOL
  )
  kl_rows = np_kl(a_t, a_s).mean(axis=1)
  assert (kl_rows[rows != 0] >= 0).all() and float(loss) > 0


def test_attention_kl_rejects_head_mismatch():
  a = _attention_probs(22, MASK_BxT)
  with pytest.raises(ValueError, match="head"):
    losses.attention_kl(a[:, :2], a, MASK_BxT, DENOM)


def np_value_relation(v_s, v_t, mask, denom, causal=False):
  allowed = np.broadcast_to(mask[:, None, None, :] != 0, (B, 1, T, T))
  if causal:
    allowed = allowed & np.tril(np.ones((T, T), bool))

  def rel(v):
    v = np.asarray(v, np.float64)
    scores = np.einsum("bqhk,bshk->bhqs", v, v) / np.sqrt(v.shape[-1])
    scores = np.where(allowed, scores, -np.inf)
    return np_softmax_rows(scores)

  return np_masked_total(np_kl(rel(v_t), rel(v_s)).mean(axis=1), mask, denom)


def _values(seed, k):
  return np.random.default_rng(seed).normal(size=(B, T, H, k)).astype(np.float32)


def test_value_relation_matches_numpy_with_different_head_dims():
  v_s, v_t = _values(30, 4), _values(31, 6)
  loss, metrics = losses.value_relation(v_s, v_t, MASK_BxT, DENOM)
  np.testing.assert_allclose(
    float(loss), np_value_relation(v_s, v_t, MASK_BxT, DENOM), rtol=RTOL, atol=ATOL
  )
  assert float(loss) > 1e-3 and set(metrics) == {"distill/value_relation"}
  same, _ = losses.value_relation(v_t, v_t, MASK_BxT, DENOM)
  np.testing.assert_allclose(float(same), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="head"):
    losses.value_relation(v_s[:, :, :2], v_t, MASK_BxT, DENOM)


def test_value_relation_is_bidirectional():
  # Student and teacher differ only at the last valid token of each row. A causal
  # relation would see the difference only from that query row on; a bidirectional
  # one (MiniLM) sees it from every valid query row.
  v_t = _values(32, 4)
  v_s = v_t.copy()
  v_s[0, 2] += 3.0
  v_s[1, 3] -= 3.0
  loss, _ = losses.value_relation(v_s, v_t, MASK_BxT, DENOM)
  bidirectional = np_value_relation(v_s, v_t, MASK_BxT, DENOM)
  causal = np_value_relation(v_s, v_t, MASK_BxT, DENOM, causal=True)
  np.testing.assert_allclose(float(loss), bidirectional, rtol=RTOL, atol=ATOL)
  assert abs(bidirectional - causal) > 1e-3


# ---------------------------------------------------------------------------
# Hidden states
# ---------------------------------------------------------------------------


def np_hidden(kind, h_s, h_t, mask, denom, projection=None):
  h_s, h_t = np.asarray(h_s, np.float64), np.asarray(h_t, np.float64)
  if projection is not None:
    h_s = h_s @ np.asarray(projection, np.float64)
  if kind == "mse":
    per = ((h_s - h_t) ** 2).sum(-1) / h_t.shape[-1]
  else:
    cos = (h_s * h_t).sum(-1) / (np.linalg.norm(h_s, axis=-1) * np.linalg.norm(h_t, axis=-1))
    per = 1.0 - cos
  return np_masked_total(per, mask, denom)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("with_projection", [False, True])
def test_hidden_loss_matches_numpy(kind, with_projection):
  rng = np.random.default_rng(40)
  d_s = 4 if with_projection else 7
  h_s = rng.normal(size=(B, T, d_s)).astype(np.float32)
  h_t = rng.normal(size=(B, T, 7)).astype(np.float32)
  proj = np.asarray(losses.init_projection(jax.random.key(0), d_s, 7)) if with_projection else None
  loss, metrics = losses.hidden_loss(kind, h_s, h_t, MASK_BxT, DENOM, projection=proj)
  expected = np_hidden(kind, h_s, h_t, MASK_BxT, DENOM, proj)
  np.testing.assert_allclose(float(loss), expected, rtol=RTOL, atol=ATOL)
  assert set(metrics) == {"distill/hidden"}


def test_hidden_cosine_is_scale_invariant_and_zero_vectors_are_safe():
  rng = np.random.default_rng(41)
  h = rng.normal(size=(B, T, 8)).astype(np.float32)
  loss, _ = losses.hidden_loss("cosine", 3.0 * h, h, MASK_BxT, DENOM)
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)
  zeros = np.zeros_like(h)
  grad = jax.grad(lambda x: losses.hidden_loss("cosine", x, h, MASK_BxT, DENOM)[0])(zeros)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_hidden_loss_errors_and_init_projection():
  h_s = np.zeros((B, T, 6), np.float32)
  h_t = np.zeros((B, T, 8), np.float32)
  with pytest.raises(ValueError, match="width"):
    losses.hidden_loss("mse", h_s, h_t, MASK_BxT, DENOM)
  with pytest.raises(ValueError, match="projection"):
    losses.hidden_loss("mse", h_s, h_t, MASK_BxT, DENOM, projection=np.zeros((8, 8)))
  with pytest.raises(ValueError, match="mse"):
    losses.hidden_loss("l1", h_t, h_t, MASK_BxT, DENOM)
  proj = losses.init_projection(jax.random.key(1), 256, 128)
  assert proj.shape == (256, 128) and proj.dtype == jnp.float32
  # LeCun normal: variance 1 / fan_in.
  assert abs(float(jnp.std(proj)) * math.sqrt(256) - 1.0) < 0.1


# ---------------------------------------------------------------------------
# Cross-cutting invariants: padding contributes nothing, teacher gets no gradient
# ---------------------------------------------------------------------------


def _loss_cases():
  """(name, loss(student, teacher, mask), student, teacher, garbage fn) for every loss."""
  s, t = _logits(50), _logits(51)
  targets = np.random.default_rng(52).integers(0, V, size=(B, T))
  a_s, a_t = _attention_probs(53, MASK_BxT), _attention_probs(54, MASK_BxT)
  proj = losses.init_projection(jax.random.key(2), 6, 8)
  h_s = np.random.default_rng(55).normal(size=(B, T, 6)).astype(np.float32)
  h_t = np.random.default_rng(56).normal(size=(B, T, 8)).astype(np.float32)
  cases = [
    (
      f"logit-{kind}",
      lambda x, y, m, kind=kind: losses.logit_loss(kind, x, y, m, DENOM, temperature=2.0, beta=0.3)[
        0
      ],
      s,
      t,
      _garbage_padded,
    )
    for kind in ("kl", "reverse_kl", "jsd")
  ]
  cases += [
    ("ce", lambda x, y, m: losses.cross_entropy(x, targets, m, DENOM)[0], s, t, _garbage_padded),
    (
      "attention",
      lambda x, y, m: losses.attention_kl(x, y, m, DENOM)[0],
      a_s,
      a_t,
      _garbage_attention,
    ),
    (
      "value_relation",
      lambda x, y, m: losses.value_relation(x, y, m, DENOM)[0],
      _values(57, 4),
      _values(58, 6),
      _garbage_padded,
    ),
  ]
  cases += [
    (
      f"hidden-{kind}",
      lambda x, y, m, kind=kind: losses.hidden_loss(kind, x, y, m, DENOM, projection=proj)[0],
      h_s,
      h_t,
      _garbage_padded,
    )
    for kind in ("mse", "cosine")
  ]
  return cases


CASES = _loss_cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_padding_contributes_nothing(case):
  _, fn, student, teacher, garbage = case
  loss_and_grad = jax.value_and_grad(fn, argnums=0)
  clean_loss, clean_grad = loss_and_grad(student, teacher, MASK_BxT)
  dirty_student = garbage(student, MASK_BxT)
  dirty_loss, dirty_grad = loss_and_grad(dirty_student, garbage(teacher, MASK_BxT), MASK_BxT)
  assert np.isfinite(float(clean_loss)) and float(clean_loss) > 0
  np.testing.assert_allclose(float(dirty_loss), float(clean_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(dirty_grad), np.asarray(clean_grad), rtol=1e-6, atol=1e-9)
  # Padded positions get exactly zero gradient.
  padded = dirty_student != student  # also True where NaN was written
  assert padded.any() and np.all(np.asarray(dirty_grad)[padded] == 0.0)
  # Bool masks behave like float masks.
  bool_loss = fn(student, teacher, MASK_BxT.astype(bool))
  np.testing.assert_allclose(float(bool_loss), float(clean_loss), rtol=1e-6)


@pytest.mark.parametrize(
  "case", [c for c in CASES if c[0] != "ce"], ids=[c[0] for c in CASES if c[0] != "ce"]
)
def test_no_gradient_reaches_teacher(case):
  _, fn, student, teacher, _ = case
  grad_teacher = jax.grad(fn, argnums=1)(student, teacher, MASK_BxT)
  grad_student = jax.grad(fn, argnums=0)(student, teacher, MASK_BxT)
  assert np.all(np.asarray(grad_teacher) == 0.0)
  assert np.any(np.asarray(grad_student) != 0.0)  # the test can see a gradient


def test_losses_work_under_jit_with_traced_temperature_and_denom():
  s, t = _logits(60), _logits(61)

  @jax.jit
  def f(s, t, tau, denom):
    return losses.logit_loss("kl", s, t, MASK_BxT, denom, temperature=tau)[0]

  expected = np_masked_total(np_divergence("kl", s, t, 1.5), MASK_BxT, DENOM)
  np.testing.assert_allclose(float(f(s, t, 1.5, DENOM)), expected, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# Layer maps
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "spec,l_s,l_t,expected",
  [
    ("uniform", 4, 12, ((1, 3), (2, 6), (3, 9), (4, 12))),
    ("uniform", 2, 4, ((1, 2), (2, 4))),
    ("uniform", 3, 4, ((1, 1), (2, 3), (3, 4))),  # 1.33 -> 1, 2.67 -> 3
    ("uniform", 4, 6, ((1, 2), (2, 3), (3, 5), (4, 6))),  # 1.5 -> 2, 4.5 -> 5 (half up)
    ("uniform", 3, 3, ((1, 1), (2, 2), (3, 3))),
    ("last", 2, 4, ((2, 4),)),
    ("last:1", 3, 5, ((3, 5),)),
    ("last:2", 3, 5, ((2, 4), (3, 5))),
    ("last:3", 3, 5, ((1, 3), (2, 4), (3, 5))),
    ("1:2,2:4", 2, 4, ((1, 2), (2, 4))),
    (" 0:0 , 2:4 ", 2, 4, ((0, 0), (2, 4))),
  ],
)
def test_layer_map(spec, l_s, l_t, expected):
  assert layer_maps.layer_map(spec, l_s, l_t) == expected


@pytest.mark.parametrize(
  "spec,match",
  [
    ("3:4", "student layer 3.*0..2"),
    ("1:5", "teacher layer 5.*0..4"),
    ("last:3", "K=3.*1..2"),
    ("last:0", "K=0.*1..2"),
    ("bogus", "uniform"),
    ("1-2", "uniform"),
    ("", "uniform"),
    ("1:2,", "uniform"),
    ("-1:2", "uniform"),
  ],
)
def test_layer_map_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    layer_maps.layer_map(spec, 2, 4)
