"""Sampled-token reverse KL (distill/policy_losses.py) against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import policy_losses


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_sampled_token_reverse_kl_value_and_gradient():
  rng = np.random.default_rng(0)
  b, t, v = 3, 5, 7
  s_logits = rng.normal(size=(b, t, v)).astype(np.float32)
  t_logits = rng.normal(size=(b, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  denom = mask.sum()

  def loss_fn(s):
    logq = policy_losses.token_logprobs(s, jnp.asarray(tokens))
    logp = policy_losses.token_logprobs(jnp.asarray(t_logits), jnp.asarray(tokens))
    return policy_losses.sampled_token_reverse_kl(logq, logp, mask, denom)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(s_logits))

  lq, lp = _log_softmax64(s_logits), _log_softmax64(t_logits)
  logq = np.take_along_axis(lq, tokens[..., None], -1)[..., 0]
  logp = np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  r = logq - logp
  np.testing.assert_allclose(
    metrics["distill/sampled_reverse_kl"], (r * mask).sum() / denom, rtol=1e-5
  )
  np.testing.assert_allclose(loss, (r * logq * mask).sum() / denom, rtol=1e-5, atol=1e-6)
  # d/ds of sum(r * log q(x)) with r fixed: r * (onehot(x) - softmax(s)) per valid token.
  onehot = np.eye(v)[tokens]
  ref = (r * mask)[..., None] * (onehot - np.exp(lq)) / denom
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-7)


def test_expected_gradient_is_the_reverse_kl_gradient():
  """Averaged over every token (exact expectation), the score-function gradient equals the
  analytic gradient of KL(q || p) for one position."""
  rng = np.random.default_rng(1)
  v = 6
  s, p_logits = rng.normal(size=v), rng.normal(size=v)
  q = np.exp(_log_softmax64(s))
  grads = []
  for x in range(v):

    def f(z, x=x):
      logq = policy_losses.token_logprobs(z[None, None], jnp.asarray([[x]]))
      logp = policy_losses.token_logprobs(
        jnp.asarray(p_logits, jnp.float32)[None, None], jnp.asarray([[x]])
      )
      return policy_losses.sampled_token_reverse_kl(logq, logp, jnp.ones((1, 1)), 1.0)[0]

    grads.append(q[x] * np.asarray(jax.grad(f)(jnp.asarray(s, jnp.float32)), np.float64))
  expected = np.sum(grads, axis=0)

  def kl(z):
    lq = jax.nn.log_softmax(z)
    return jnp.sum(jnp.exp(lq) * (lq - jax.nn.log_softmax(p_logits)))

  with jax.enable_x64(True):
    analytic = np.asarray(jax.grad(kl)(jnp.asarray(s, jnp.float64)))
  np.testing.assert_allclose(expected, analytic, rtol=1e-4, atol=1e-6)


def test_padding_carries_no_loss_and_no_gradient():
  logq = jnp.asarray([[-1.0, jnp.nan]])
  logp = jnp.asarray([[-2.0, jnp.inf]])
  mask = jnp.asarray([[1.0, 0.0]])
  loss, metrics = policy_losses.sampled_token_reverse_kl(logq, logp, mask, 1.0)
  assert np.isfinite(loss) and float(metrics["distill/sampled_reverse_kl"]) == 1.0
  g = jax.grad(lambda x: policy_losses.sampled_token_reverse_kl(x, logp, mask, 1.0)[0])(logq)
  assert float(g[0, 1]) == 0.0 and float(g[0, 0]) == 1.0


@pytest.mark.parametrize("baseline", ["batch", "sequence"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_baseline_and_clip_against_float64(baseline, clip):
  """a_t = r_t - b (the batch's or the row's mean r over valid tokens), clipped to +-clip:
  the loss sum(a_t log q) / denom and its gradient a_t (onehot - softmax) / denom."""
  rng = np.random.default_rng(2)
  b, t, v = 3, 6, 5
  s_logits = rng.normal(size=(b, t, v)).astype(np.float32)
  t_logits = 2 * rng.normal(size=(b, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, t))
  mask = (rng.random((b, t)) > 0.3).astype(np.float32)
  mask[0, 0] = 1.0
  denom = mask.sum()

  def loss_fn(s):
    logq = policy_losses.token_logprobs(s, jnp.asarray(tokens))
    logp = policy_losses.token_logprobs(jnp.asarray(t_logits), jnp.asarray(tokens))
    return policy_losses.sampled_token_reverse_kl(logq, logp, mask, denom, baseline, clip)

  (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(s_logits))

  lq, lp = _log_softmax64(s_logits), _log_softmax64(t_logits)
  logq = np.take_along_axis(lq, tokens[..., None], -1)[..., 0]
  r = logq - np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  m = mask.astype(np.float64)
  if baseline == "batch":
    a = r - (r * m).sum() / m.sum()
  else:
    a = r - ((r * m).sum(1) / np.maximum(m.sum(1), 1))[:, None]
  if clip:
    a = np.clip(a, -clip, clip)
  np.testing.assert_allclose(loss, (a * logq * m).sum() / denom, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["distill/sampled_reverse_kl"], (r * m).sum() / denom, 1e-5)
  rms = np.sqrt((a * a * m).sum() / denom)
  np.testing.assert_allclose(metrics["distill/sampled_reverse_kl_signal_rms"], rms, rtol=1e-5)
  onehot = np.eye(v)[tokens]
  ref = (a * m)[..., None] * (onehot - np.exp(lq)) / denom
  np.testing.assert_allclose(grad, ref, rtol=1e-5, atol=1e-7)


def test_a_constant_signal_gives_no_gradient_with_a_baseline():
  """Every token equally far from the teacher: after the baseline nothing is left to learn
  from (without one, the shared offset alone moves the student)."""
  logq = jnp.log(jnp.full((2, 3), 0.25))
  logp = logq - 1.5
  mask = jnp.ones((2, 3))

  def grad_of(baseline):
    f = lambda x: policy_losses.sampled_token_reverse_kl(x, logp, mask, 6.0, baseline)[0]  # noqa: E731
    return np.asarray(jax.grad(f)(logq))

  assert np.abs(grad_of("none")).max() > 0.1
  for baseline in ("batch", "sequence"):
    np.testing.assert_allclose(grad_of(baseline), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="baseline"):
    policy_losses.sampled_token_reverse_kl(logq, logp, mask, 6.0, "row")
