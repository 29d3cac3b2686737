"""Sparse teacher targets (distill/sparse.py) against float64 NumPy references: top-k with a
tail bucket converges to the dense KL and is exact at k = V; sampled targets are an unbiased
estimate of the dense soft cross-entropy and of its gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill import sparse

V = 32


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _dense_kl(zs, zt, tau):
  logp, logq = _log_softmax(zt / tau), _log_softmax(zs / tau)
  return (np.exp(logp) * (logp - logq)).sum(-1)


@functools.partial(jax.jit, static_argnames=("k", "samples", "tau"))
def _targets(zt, k=0, samples=0, tau=1.0):
  """Teacher targets of logits zt [N, V] (hidden = logits, head = identity), row i keyed i."""
  n = zt.shape[0]
  return sparse.teacher_targets(
    zt.astype(jnp.float32),
    jnp.eye(zt.shape[1], dtype=jnp.float32),
    jnp.arange(n, dtype=jnp.int32),
    jnp.zeros((n,), jnp.int32),
    temperature=tau,
    k=k,
    samples=samples,
    token_chunk=8,
  )


@functools.partial(jax.jit, static_argnames=("kind", "tau", "ce_weight"))
def _head(kind, zs, teacher, weights, tau, ce_weight=0.0):
  n = zs.shape[0]
  return sparse.sparse_loss_head(
    zs.astype(jnp.float32),
    jnp.eye(zs.shape[1], dtype=jnp.float32),
    jnp.arange(n, dtype=jnp.int32) % zs.shape[1],
    weights.astype(jnp.float32),
    weights.sum(),
    teacher,
    kind=kind,
    temperature=tau,
    ce_weight=ce_weight,
    token_chunk=8,
  )


@pytest.fixture(scope="module")
def logits():
  rng = np.random.default_rng(0)
  return 2.0 * rng.normal(size=(20, V)), 3.0 * rng.normal(size=(20, V))


def test_topk_tail_error_shrinks_with_k_and_is_exact_at_v(logits):
  zs, zt = logits
  weights = np.ones(len(zs))
  weights[-3:] = 0  # padded tokens change nothing
  tau = 2.0
  dense = (weights * _dense_kl(zs, zt, tau)).sum() / weights.sum() * tau**2
  full, errors = _targets(zt, k=V, tau=tau), []
  for k in (2, 8, V):  # top-k is sorted: the first k of the full ranking (tail in float64)
    logp = np.asarray(full["topk_logp"], np.float64)[:, :k]
    tg = dict(topk_ids=full["topk_ids"][:, :k], topk_logp=logp, tail=1 - np.exp(logp).sum(1))
    out = _head("topk_tail", zs, tg, weights, tau)
    errors.append(abs(float(out.divergence) - dense))
  # Merging classes never increases a KL: the error can only shrink as k grows.
  assert errors[0] > errors[1] > errors[2]
  assert errors[2] < 1e-5 * dense
  # The renormalised baseline is also exact at k = V.
  renorm = _head("topk_renorm", zs, full, weights, tau)
  np.testing.assert_allclose(float(renorm.divergence), dense, rtol=1e-5)


def test_head_ce_and_tail_against_numpy(logits):
  zs, zt = logits
  weights = np.ones(len(zs))
  k, tau = 5, 1.5
  tg = _targets(zt, k=k, tau=tau)
  out = _head("topk_tail", zs, tg, weights, tau, ce_weight=1.0)
  logp, logq = _log_softmax(zt / tau), _log_softmax(zs / tau)
  ids = np.argsort(-zt, axis=1)[:, :k]
  np.testing.assert_array_equal(np.asarray(tg["topk_ids"]), ids)
  p, q = np.take_along_axis(np.exp(logp), ids, 1), np.take_along_axis(np.exp(logq), ids, 1)
  np.testing.assert_allclose(np.asarray(tg["tail"]), 1 - p.sum(1), rtol=1e-5)
  ref = (p * np.log(p / q)).sum(1) + (1 - p.sum(1)) * np.log((1 - p.sum(1)) / (1 - q.sum(1)))
  np.testing.assert_allclose(float(out.divergence), ref.mean() * tau**2, rtol=1e-5)
  labels = np.arange(len(zs)) % V
  ce = -_log_softmax(zs)[np.arange(len(zs)), labels].mean()
  np.testing.assert_allclose(float(out.ce), ce, rtol=1e-5)
  # renorm: both sides renormalised over the k ids
  out = _head("topk_renorm", zs, tg, weights, tau)
  pr, qr = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
  np.testing.assert_allclose(
    float(out.divergence), (pr * np.log(pr / qr)).sum(1).mean() * tau**2, rtol=1e-5
  )


def test_unique_counts():
  ids, counts = sparse.unique_counts(jnp.asarray([[3, 1, 3, 3], [2, 2, 2, 2]]))
  np.testing.assert_array_equal(np.asarray(ids), [[1, 3, 0, 0], [2, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(counts), [[1, 3, 0, 0], [4, 0, 0, 0]])


def test_sampled_is_unbiased_loss_and_gradient():
  """Mean over many independent draws (rows) of the estimate and its gradient w.r.t. the
  student logits -> the dense soft CE -sum p log q and its gradient q - p."""
  rng = np.random.default_rng(1)
  tokens, repeats, n, tau = 3, 2000, 4, 1.0
  zs, zt = rng.normal(size=(tokens, V)), 2.0 * rng.normal(size=(tokens, V))
  zt_all = np.repeat(zt, repeats, axis=0)  # every copy draws with its own row key
  tg = _targets(zt_all, samples=n, tau=tau)
  counts = np.asarray(tg["sample_counts"])
  assert (counts.sum(1) == n).all() and counts.shape == (tokens * repeats, n)

  def estimate(zs_all):
    logq = jax.nn.log_softmax(zs_all / tau)
    at_ids = jnp.take_along_axis(logq, tg["sample_ids"], axis=1)
    return sparse.divergence_per_token("sampled", at_ids, tg)

  zs_all = jnp.asarray(np.repeat(zs, repeats, axis=0), jnp.float32)
  per_token = np.asarray(estimate(zs_all)).reshape(tokens, repeats)
  grads = np.asarray(jax.grad(lambda z: estimate(z).sum())(zs_all)).reshape(tokens, repeats, V)
  p, logq = np.exp(_log_softmax(zt / tau)), _log_softmax(zs / tau)
  dense = -(p * logq).sum(1)
  stderr = per_token.std(1) / np.sqrt(repeats)
  assert np.all(np.abs(per_token.mean(1) - dense) < 4 * stderr + 1e-3), (per_token.mean(1), dense)
  np.testing.assert_allclose(grads.mean(1), (np.exp(logq) - p) / tau, atol=0.03)
  # A biased estimator (dropping repeated draws: counts -> 1) fails the same check.
  unique = np.where(counts > 0, 1.0, 0.0)
  logq_ids = np.take_along_axis(np.repeat(logq, repeats, 0), np.asarray(tg["sample_ids"]), 1)
  biased = (-(unique * logq_ids).sum(1) / unique.sum(1)).reshape(tokens, repeats).mean(1)
  assert np.any(np.abs(biased - dense) > 4 * stderr + 1e-3)
