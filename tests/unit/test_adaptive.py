"""distill.adaptive (distill/adaptive.py): per-token KD weights against float64 NumPy
references written from the formulas in docs/losses.md, in the dense and fused heads, their
normalisation and stop-gradient, the config checks, and one step of a tiny run.

Shape legend: B batch, T length, V vocab, N = B * T tokens, D width.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config
from jaxdistill.config import validate
from jaxdistill.distill import adaptive, losses, objective
from jaxdistill.distill import fused as fused_lib
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import sharding
from jaxdistill.train import run as run_lib

B, T, V, D = 2, 6, 13, 8
TAU, DENOM = 2.0, 11.0  # denom differs from the real tokens' count: no term takes a mean
# Padding in both rows and one token of weight 0.5 (weights act per token, as in losses.py).
MASK_BxT = np.array([[1, 1, 1, 1, 0, 0], [1, 0.5, 1, 1, 1, 0]], np.float32)
MODES = adaptive.MODES[1:]
KINDS = ("kl", "reverse_kl", "jsd")


# --- float64 references ------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(logp, logq):
  return np.sum(np.exp(logp) * (logp - logq), -1)


def np_divergence(kind, zs, zt, tau, beta=0.5):
  """tau^2 x the divergence between p = softmax(zt / tau) and q = softmax(zs / tau)."""
  logq, logp = np_log_softmax(np.asarray(zs, np.float64) / tau), np_log_softmax(zt / tau)
  if kind == "kl":
    d = np_kl(logp, logq)
  elif kind == "reverse_kl":
    d = np_kl(logq, logp)
  else:
    logm = np.log(beta * np.exp(logp) + (1 - beta) * np.exp(logq))
    d = beta * np_kl(logp, logm) + (1 - beta) * np_kl(logq, logm)
  return d * tau**2


def np_scores(mode, zs, zt, y, kind="kl", tau=TAU):
  """r_t: exp(-H(p_t)) | p_t(y_t) (teacher at temperature 1) | D_t(z_s, z_t) at tau."""
  logp = np_log_softmax(zt)
  if mode == "teacher_entropy":
    return np.exp(np.sum(np.exp(logp) * logp, -1))
  if mode == "teacher_correct":
    return np.exp(np.take_along_axis(logp, y[..., None], -1)[..., 0])
  return np_divergence(kind, zs, zt, tau)


def np_normalise(r, m):
  """a_t = r_t sum(m) / sum(m r) on real tokens (m != 0), 0 on padding."""
  m = np.asarray(m, np.float64)
  r = np.where(m != 0, r, 0.0)
  return np.where(m != 0, r * m.sum() / (m * r).sum(), 0.0)


def np_ce(zs, y):
  return -np.take_along_axis(np_log_softmax(zs), y[..., None], -1)[..., 0]


# --- inputs ------------------------------------------------------------------------------


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  hs, ht = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, D))
  ws, wt = rng.normal(size=(D, V)), rng.normal(size=(D, V)) * 1.5
  y = rng.integers(0, V, (B, T))
  return hs, ws, ht, wt, y


def _garbage(x_BxT, mask):
  """NaN / inf in the padded positions: they must change nothing."""
  x = np.array(x_BxT, np.float32, copy=True)
  x[np.asarray(mask) == 0] = np.nan
  x[0, -1] = np.inf
  return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_weights_match_numpy_with_padding(mode, kind):
  if kind != "kl" and mode != "student_teacher_gap":
    pytest.skip("only the gap reads the divergence's kind")
  hs, ws, ht, wt, y = _inputs()
  zs, zt = hs @ ws, ht @ wt
  a = adaptive.token_weights(
    mode, _garbage(zs, MASK_BxT), _garbage(zt, MASK_BxT), jnp.asarray(y), MASK_BxT,
    kind=kind, temperature=TAU, beta=0.5,
  )  # fmt: skip
  expected = np_normalise(np_scores(mode, zs, zt, y, kind), MASK_BxT)
  np.testing.assert_allclose(np.asarray(a), expected, rtol=2e-5, atol=1e-7)
  # Normalised: the m-weighted mean over real tokens is exactly 1; padding gets 0.
  np.testing.assert_allclose(float(jnp.sum(MASK_BxT * a) / MASK_BxT.sum()), 1.0, rtol=1e-6)
  assert np.all(np.asarray(a)[MASK_BxT == 0] == 0)


def test_the_fused_scores_equal_the_dense_ones():
  hs, ws, ht, wt, y = _inputs(1)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  for mode in MODES:
    r = adaptive.chunk_scores(
      mode, f32(hs.reshape(-1, D)), f32(ws), f32(ht.reshape(-1, D)), f32(wt), y.reshape(-1),
      token_chunk=5, kind="kl", temperature=TAU,
    )  # fmt: skip
    expected = np_scores(mode, hs @ ws, ht @ wt, y).reshape(-1)
    np.testing.assert_allclose(np.asarray(r), expected, rtol=2e-5, atol=1e-7, err_msg=mode)


def test_no_real_token_scoring_above_zero_gives_weight_one():
  """A student equal to its teacher has gap 0 everywhere: uniform weights, not 0 / 0."""
  zt = jnp.asarray(_inputs()[2] @ _inputs()[3], jnp.float32)
  y = jnp.zeros((B, T), jnp.int32)
  a = adaptive.token_weights("student_teacher_gap", zt, zt, y, MASK_BxT, kind="kl", temperature=1)
  np.testing.assert_array_equal(np.asarray(a), (MASK_BxT != 0).astype(np.float32))


@pytest.mark.parametrize("mode", MODES)
def test_no_gradient_flows_through_the_weights(mode):
  *floats, y = _inputs()
  hs, ws, ht, wt = (jnp.asarray(x, jnp.float32) for x in floats)
  dense = lambda zs, zt: jnp.sum(  # noqa: E731
    adaptive.token_weights(mode, zs, zt, y, MASK_BxT, kind="kl", temperature=TAU) ** 2
  )
  for g in jax.grad(dense, (0, 1))(hs @ ws, ht @ wt):
    assert float(jnp.abs(g).max()) == 0.0
  flat = lambda x: x.reshape(-1, D)  # noqa: E731
  fused = lambda *args: jnp.sum(  # noqa: E731
    adaptive.chunk_scores(mode, *args, y.reshape(-1), token_chunk=4, kind="kl", temperature=TAU)
  )
  for g in jax.grad(fused, (0, 1, 2, 3))(flat(hs), ws, flat(ht), wt):
    assert float(jnp.abs(g).max()) == 0.0


# --- the head terms ----------------------------------------------------------------------


def _config(mode, fused, kind="kl"):
  c = config.default_config()
  c.teacher.source = "random"
  c.distill.update(adaptive=mode, fused=fused, temperature=TAU, token_chunk=5)
  c.distill.logit.update(kind=kind, weight=0.7)
  c.distill.ce.weight = 0.3
  return c


def _head_loss(cfg, hs, ws, ht, wt, y):
  obj = objective.make_objective(cfg)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  if cfg.distill.fused:
    s = {"final_hidden": f32(hs), "head": f32(ws)}
    t = {"final_hidden": f32(ht), "head": f32(wt)}
  else:
    s, t = {"logits": f32(hs) @ f32(ws)}, {"logits": f32(ht @ wt)}
  batch = {"targets": jnp.asarray(y), "weights": jnp.asarray(MASK_BxT)}
  return objective.compute_loss(obj, 0, {}, s, t, batch, DENOM)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode,kind", [(m, "kl") for m in MODES] + [("student_teacher_gap", "jsd")])
def test_head_loss_matches_numpy(mode, kind, fused):
  """0.7 x sum_t m_t a_t D_t / denom + 0.3 x sum_t m_t CE_t / denom, and its gradient is the
  same loss's with the weights a_t held constant."""
  hs, ws, ht, wt, y = _inputs(2)
  zs, zt = hs @ ws, ht @ wt
  a = np_normalise(np_scores(mode, zs, zt, y, kind), MASK_BxT)
  div = np.sum(MASK_BxT * a * np_divergence(kind, zs, zt, TAU)) / DENOM
  ce = np.sum(MASK_BxT * np_ce(zs, y)) / DENOM
  cfg = _config(mode, fused, kind)
  loss, metrics = _head_loss(cfg, hs, ws, ht, wt, y)
  np.testing.assert_allclose(float(loss), 0.7 * div + 0.3 * ce, rtol=2e-5)
  np.testing.assert_allclose(float(metrics[f"distill/{kind}"]), div, rtol=2e-5)

  # The gradient: that of the same loss with a_t a constant (computed here in float64).
  def with_constant_weights(ws):
    zs = jnp.asarray(hs, jnp.float32) @ ws
    zt32, w = jnp.asarray(zt, jnp.float32), MASK_BxT * a
    d = losses.logit_loss(kind, zs, zt32, w, DENOM, temperature=TAU)[0]
    return 0.7 * d + 0.3 * losses.cross_entropy(zs, jnp.asarray(y), MASK_BxT, DENOM)[0]

  ws32 = jnp.asarray(ws, jnp.float32)
  got = jax.grad(lambda w: _head_loss(cfg, hs, w, ht, wt, y)[0])(ws32)
  np.testing.assert_allclose(got, jax.grad(with_constant_weights)(ws32), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("vocab_chunk", [0, 4])
def test_fused_divergence_weights_match_dense(vocab_chunk):
  """``fused_loss_head(divergence_weights_N=a)``: loss and gradients of the dense head with
  the divergence's token weights m a and CE's m (token and vocabulary chunks)."""
  hs, ws, ht, wt, y = (np.asarray(x).reshape(-1, *np.shape(x)[2:]) for x in _inputs(5))
  ws, wt, m = ws.reshape(D, V), wt.reshape(D, V), MASK_BxT.reshape(-1)
  a = jnp.asarray(np_normalise(np_scores("teacher_correct", None, ht @ wt, y), m), jnp.float32)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

  def fused_loss(hs, ws):
    return fused_lib.fused_loss_head(
      hs, ws, jnp.asarray(y), m, DENOM, teacher_hidden_NxDt=f32(ht), teacher_head_DtxV=f32(wt),
      temperature=TAU, kl_weight=0.7, ce_weight=0.3, token_chunk=5, vocab_chunk=vocab_chunk,
      divergence_weights_N=a,
    ).loss  # fmt: skip

  def dense_loss(hs, ws):
    zs, zt = hs @ ws, f32(ht) @ f32(wt)
    d = losses.logit_loss("kl", zs, zt, m * a, DENOM, temperature=TAU)[0]
    return 0.7 * d + 0.3 * losses.cross_entropy(zs, jnp.asarray(y), m, DENOM)[0]

  got, want = (jax.value_and_grad(fn, (0, 1))(f32(hs), f32(ws)) for fn in (fused_loss, dense_loss))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("how,fused", [("probs", False), ("logits", True), ("losses", True)])
def test_two_identical_teachers_weigh_as_one(how, fused):
  """With several teachers a_t comes from the combined target (probs, logits) or from each
  teacher's own divergence (losses): two copies of one teacher give that teacher's loss."""
  hs, ws, ht, wt, y = _inputs(4)
  one = _config("student_teacher_gap", fused)
  two = _config("student_teacher_gap", fused)
  two.teacher.weight, two.distill.ensemble = 0.3, how
  two.teachers = (config.teacher_fields(weight=0.7),)
  validate.validate(two)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  if fused:
    s, t = {"final_hidden": f32(hs), "head": f32(ws)}, {"final_hidden": f32(ht), "head": f32(wt)}
  else:
    s, t = {"logits": f32(hs @ ws)}, {"logits": f32(ht @ wt)}
  batch = {"targets": jnp.asarray(y), "weights": jnp.asarray(MASK_BxT)}
  loss = lambda c, t: objective.compute_loss(objective.make_objective(c), 0, {}, s, t, batch, DENOM)  # noqa: E731
  np.testing.assert_allclose(float(loss(two, (t, t))[0]), float(loss(one, t)[0]), rtol=1e-5)


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "change,words",
  [
    (dict(adaptive="hardness"), "unknown"),
    (dict(adaptive="Teacher_Entropy"), "unknown"),
    (dict(source="none"), "logit divergence from a teacher"),
    (dict(weight=0.0), "logit divergence from a teacher"),
    (dict(kind="topk_tail"), "dense divergences"),
    (dict(vocab_chunk=4), "vocab_chunk=0"),
    (dict(lmbda=0.5), "on-policy"),
  ],
)
def test_bad_settings_name_distill_adaptive(change, words):
  c = _config("teacher_correct", True)
  c.distill.adaptive = change.get("adaptive", c.distill.adaptive)
  if "source" in change:
    c.teacher.source, c.distill.logit.weight = "none", 0.0
  c.distill.logit.weight = change.get("weight", c.distill.logit.weight)
  c.distill.logit.kind = change.get("kind", c.distill.logit.kind)
  c.distill.vocab_chunk = change.get("vocab_chunk", 0)
  c.distill.on_policy.lmbda = change.get("lmbda", 0.0)
  with pytest.raises(ConfigError) as e:
    validate.validate(c)
  assert e.value.key == "distill.adaptive", str(e.value)
  assert words in str(e.value)


def test_every_mode_validates():
  for mode in adaptive.MODES:
    for fused in (False, True):
      validate.validate(_config(mode, fused))


# --- one step of a tiny run --------------------------------------------------------------

SMALL = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=2, d_ff=64, max_len=16)


def _tiny(mode, fused):
  c = _config(mode, fused)
  c.student.update(SMALL)
  c.teacher.update(SMALL)
  c.data.update(batch_size=4, seq_len=16, pad_fraction=0.5)
  c.optim.steps, c.mesh.data, c.log.progress = 2, 1, False
  return c


def test_a_step_trains_with_each_head():
  """The first step's loss from the same init and batch: finite, and not that of 'none'."""
  base = run_lib.build_run(_tiny("none", True), devices=jax.devices()[:1])
  batch = sharding.shard_batch(next(base.data_iter), base.mesh)
  first = {"none": float(base.step(batch)["train/loss"])}
  for mode, fused in (("student_teacher_gap", True), ("teacher_entropy", False)):
    run = run_lib.build_run(_tiny(mode, fused), devices=jax.devices()[:1], data=False)
    first[mode] = float(run.step(batch)["train/loss"])
  assert all(np.isfinite(v) for v in first.values()), first
  assert first["student_teacher_gap"] != first["none"], first
  assert first["teacher_entropy"] != first["none"], first


@pytest.mark.slow
def test_a_sharded_fused_step_equals_one_device():
  """The fused head's scoring pass under a 2x2x2 mesh (rows over batch shards, vocabulary
  over tensor): two steps' losses equal one device's."""
  first = {}
  for mesh in ((1, 1, 1), (2, 2, 2)):
    c = _tiny("student_teacher_gap", True)
    c.data.batch_size = 8
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    run = run_lib.build_run(c, devices=jax.devices()[: int(np.prod(mesh))])
    steps = [run.step(sharding.shard_batch(next(run.data_iter), run.mesh)) for _ in range(2)]
    first[mesh] = [float(m["train/loss"]) for m in steps]
  np.testing.assert_allclose(first[(2, 2, 2)], first[(1, 1, 1)], rtol=1e-5)
