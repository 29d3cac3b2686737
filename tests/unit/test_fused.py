"""The fused loss head against an independent float64 dense reference, on one and 8 devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistill import config as config_lib
from jaxdistill.config import validate
from jaxdistill.distill import fused, objective
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import sharding

# --- float64 reference (dense logits, written independently of fused.py and losses.py) ---


def _ref_loss(hs, ws, ht, wt, y, w, denom, *, kind, tau, beta, kl_weight, ce_weight):
  """Weighted divergence + CE over dense [N, V] logits; runs under jax.enable_x64."""
  zs, zt = hs @ ws, ht @ wt
  logq, logp = jax.nn.log_softmax(zs / tau), jax.nn.log_softmax(zt / tau)
  q, p = jnp.exp(logq), jnp.exp(logp)
  if kind == "kl":
    div = jnp.sum(p * (logp - logq), -1)
  elif kind == "reverse_kl":
    div = jnp.sum(q * (logq - logp), -1)
  else:
    logm = jnp.log(beta * p + (1 - beta) * q)
    div = beta * jnp.sum(p * (logp - logm), -1) + (1 - beta) * jnp.sum(q * (logq - logm), -1)
  ce = jax.nn.logsumexp(zs, -1) - jnp.take_along_axis(zs, y[:, None], -1)[:, 0]
  per_token = jnp.where(w != 0, w * (kl_weight * tau**2 * div + ce_weight * ce), 0.0)
  return jnp.sum(per_token) / jnp.maximum(denom, 1.0)


def _tied(loss_fn, tied: bool):
  """(hidden, head) -> loss; tied: the second argument is an embedding E [V, Ds], head = E.T,
  and E's rows are also added to the hidden states (as an input lookup), so E gets both
  gradients back through the custom_vjp, as in a tied-embedding model."""
  if not tied:
    return loss_fn

  def wrapped(hs, emb, *rest):
    lookup = jnp.take(emb, jnp.arange(hs.shape[0]) % emb.shape[0], axis=0)
    return loss_fn(hs + lookup, emb.T, *rest)

  return wrapped


def _case(seed, n, ds, dt, v, *, pad=0.3, float_weights=False, tied=False):
  rng = np.random.default_rng(seed)
  hs = rng.normal(size=(n, ds))
  ws = rng.normal(size=(v, ds) if tied else (ds, v)) * 2 / np.sqrt(ds)
  ht = rng.normal(size=(n, dt))
  wt = rng.normal(size=(dt, v)) * 2 / np.sqrt(dt)
  y = rng.integers(0, v, n)
  valid = rng.random(n) >= pad
  w = np.where(valid, rng.uniform(0.5, 2.0, n) if float_weights else 1.0, 0.0)
  y = np.where(valid, y, -1)  # padded labels hold garbage
  return hs, ws, ht, wt, y, w


def _reference(arrays, opts, tied):
  """Float64 loss and gradients w.r.t. (student hidden, student head or embedding)."""
  hs, ws, ht, wt, y, w = arrays
  with jax.enable_x64(True):
    y_safe = jnp.asarray(np.where(w != 0, y, 0))
    fn = _tied(lambda hs, ws, ht, wt: _ref_loss(hs, ws, ht, wt, y_safe, w, w.sum(), **opts), tied)
    value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(
      *[jnp.asarray(a, jnp.float64) for a in (hs, ws, ht, wt)]
    )
    return float(value), [np.asarray(g) for g in grads]


def _fused_fn(y, w, opts, chunks, tied, teacher=True):
  def loss(hs, ws, ht, wt):
    return fused.fused_loss_head(
      hs,
      ws,
      y,
      w,
      w.sum(),
      teacher_hidden_NxDt=ht if teacher else None,
      teacher_head_DtxV=wt if teacher else None,
      kind=opts["kind"],
      temperature=opts["tau"],
      beta=opts["beta"],
      kl_weight=opts["kl_weight"],
      ce_weight=opts["ce_weight"],
      token_chunk=chunks[0],
      vocab_chunk=chunks[1],
    ).loss

  return _tied(loss, tied)


def _assert_matches(value, grads, ref_value, ref_grads):
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, err_msg="loss")
  for name, g, r in zip(("hidden", "head"), grads, ref_grads):
    # Relative to the gradient's scale: elements near 0 have no meaningful relative error.
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max(), err_msg=name)


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def _opts(kind="kl", tau=2.0, beta=0.5, kl_weight=0.7, ce_weight=0.4):
  return dict(kind=kind, tau=tau, beta=beta, kl_weight=kl_weight, ce_weight=ce_weight)


def _random_cases(count=9, seed=0):
  """Seeded random shapes: odd vocabularies, chunk sizes that do not divide them; every kind
  (only forward KL streams over vocab chunks)."""
  rng = np.random.default_rng(seed)
  cases = []
  for i in range(count):
    kind = ("kl", "reverse_kl", "jsd")[i % 3]
    vocab_chunk = {0: 9, 3: 4}.get(i, 0) if kind == "kl" else 0
    cases.append(
      dict(
        seed=i,
        n=int(rng.integers(1, 40)),
        ds=int(rng.integers(2, 20)),
        dt=int(rng.integers(2, 20)),
        v=int(rng.choice([3, 17, 37, 61])),
        chunks=(int(rng.choice([0, 1, 5, 16])), vocab_chunk),
        opts=_opts(kind, tau=float(rng.choice([0.5, 1.0, 2.5])), beta=float(rng.uniform(0.1, 0.9))),
        tied=bool(i % 2),
        float_weights=bool(rng.random() < 0.5),
      )
    )
  return cases


@pytest.mark.parametrize("case", _random_cases(), ids=lambda c: f"seed{c['seed']}")
def test_matches_float64_reference(case):
  arrays = _case(
    case["seed"],
    case["n"],
    case["ds"],
    case["dt"],
    case["v"],
    float_weights=case["float_weights"],
    tied=case["tied"],
  )
  ref_value, ref_grads = _reference(arrays, case["opts"], case["tied"])
  hs, ws, ht, wt, y, w = arrays
  fn = _fused_fn(
    jnp.asarray(y), jnp.asarray(w, jnp.float32), case["opts"], case["chunks"], case["tied"]
  )
  value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(*_f32(hs, ws, ht, wt))
  _assert_matches(value, grads, ref_value, ref_grads)


@pytest.mark.parametrize(
  "kind,chunks", [("kl", (0, 0)), ("kl", (3, 0)), ("kl", (4, 10)), ("kl", (0, 9)), ("jsd", (5, 0))]
)
def test_sharded_matches_float64_reference(kind, chunks):
  """Rows over data x fsdp (4 shards), vocabulary over tensor (2 shards) on 8 fake devices."""
  n, v = 4 * 11, 2 * 27  # 11 rows and 27 columns per shard: chunks never divide them
  arrays = _case(7, n, 8, 12, v, float_weights=True)
  opts = _opts(kind, tau=1.5)
  ref_value, ref_grads = _reference(arrays, opts, tied=False)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  hs, ws, ht, wt, y, w = arrays
  rows = ("data", "fsdp")
  y, w = put(jnp.asarray(y), rows), put(jnp.asarray(w, jnp.float32), rows)
  fn = _fused_fn(y, w, opts, chunks, tied=False)
  hs, ws, ht, wt = _f32(hs, ws, ht, wt)
  args = (put(hs, rows), put(ws, "fsdp", "tensor"), put(ht, rows), put(wt, "fsdp", "tensor"))
  with sharding.rules_context(mesh):
    # The shard-aware chunk layout is really in use.
    assert sharding.logical_shards("act_batch", n) == 4 and sharding.logical_shards("vocab", v) == 2
    value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(*args)
  _assert_matches(value, [np.asarray(g) for g in grads], ref_value, ref_grads)


@pytest.mark.parametrize("chunks", [(4, 0), (4, 8)])
def test_ce_only_without_teacher(chunks):
  hs, ws, ht, wt, y, w = _case(3, 23, 6, 6, 29)
  opts = _opts(kl_weight=0.0, ce_weight=1.0)
  ref_value, ref_grads = _reference((hs, ws, ht, wt, y, w), opts, tied=False)
  fn = _fused_fn(jnp.asarray(y), jnp.asarray(w, jnp.float32), opts, chunks, False, teacher=False)
  value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(*_f32(hs, ws, ht, wt))
  _assert_matches(value, grads, ref_value, ref_grads)


@pytest.mark.parametrize("chunks", [(4, 0), (4, 8)])
def test_teacher_gets_no_gradient_and_weights_get_their_terms(chunks):
  hs, ws, ht, wt, y, w = _case(4, 19, 6, 10, 29)
  hs, ws, ht, wt = _f32(hs, ws, ht, wt)
  y, w = jnp.asarray(y), jnp.asarray(w, jnp.float32)

  def loss(ht, wt, kl_weight, ce_weight):
    out = fused.fused_loss_head(
      hs,
      ws,
      y,
      w,
      w.sum(),
      teacher_hidden_NxDt=ht,
      teacher_head_DtxV=wt,
      temperature=2.0,
      kl_weight=kl_weight,
      ce_weight=ce_weight,
      token_chunk=chunks[0],
      vocab_chunk=chunks[1],
    )
    return out.loss, out

  grads, out = jax.jit(jax.grad(loss, (0, 1, 2, 3), has_aux=True))(ht, wt, 0.3, 0.6)
  assert float(jnp.abs(grads[0]).max()) == 0.0 and float(jnp.abs(grads[1]).max()) == 0.0
  # d loss / d weight = the term it weights.
  np.testing.assert_allclose(grads[2], out.divergence, rtol=1e-6)
  np.testing.assert_allclose(grads[3], out.ce, rtol=1e-6)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunks", [(0, 0), (3, 0), (3, 7)])
def test_per_token_outputs_and_undifferentiated_path(chunks):
  hs, ws, ht, wt, y, w = _case(5, 21, 6, 9, 31, float_weights=True)
  tau, valid = 1.7, w != 0
  call = lambda hs: fused.fused_loss_head(
    hs,
    *_f32(ws),
    jnp.asarray(y),
    jnp.asarray(w, jnp.float32),
    w.sum(),
    teacher_hidden_NxDt=_f32(ht)[0],
    teacher_head_DtxV=_f32(wt)[0],
    temperature=tau,
    token_chunk=chunks[0],
    vocab_chunk=chunks[1],
  )
  out = jax.jit(call)(*_f32(hs))  # nothing differentiated: the primal, no gradient work
  zs, zt = hs @ ws, ht @ wt  # float64
  logq, logp = _np_log_softmax(zs / tau), _np_log_softmax(zt / tau)
  lse_s = np.log(np.exp(zs).sum(-1))
  expected = dict(
    divergence=tau**2 * np.sum(np.exp(logp) * (logp - logq), -1),
    ce=lse_s - zs[np.arange(len(y)), np.where(valid, y, 0)],
    student_lse=lse_s,
    teacher_lse=np.log(np.exp(zt / tau).sum(-1)),
  )
  for key, value in expected.items():
    np.testing.assert_allclose(
      out.per_token[key], np.where(valid, value, 0), rtol=1e-5, atol=1e-6, err_msg=key
    )
  np.testing.assert_allclose(out.ce, np.sum(w * expected["ce"]) / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(
    out.divergence, np.sum(w * expected["divergence"]) / w.sum(), rtol=1e-5
  )
  # The gradient-in-forward path gives the same value as the primal.
  value = jax.jit(jax.value_and_grad(lambda h: call(h).loss))(*_f32(hs))[0]
  np.testing.assert_allclose(value, out.loss, rtol=1e-6)


@pytest.mark.parametrize("chunks", [(4, 0), (4, 8)])
def test_padding_garbage_changes_nothing(chunks):
  hs, ws, ht, wt, y, w = _case(6, 17, 6, 6, 23)
  pad = w == 0
  opts = _opts()
  fn = lambda y: _fused_fn(jnp.asarray(y), jnp.asarray(w, jnp.float32), opts, chunks, False)
  grad = lambda f, *a: jax.jit(jax.value_and_grad(f, (0, 1)))(*_f32(*a))
  clean = grad(fn(np.where(pad, 0, y)), hs, ws, ht, wt)
  hs_bad, ht_bad = hs.copy(), ht.copy()
  hs_bad[pad], ht_bad[pad] = np.nan, np.inf
  dirty = grad(fn(np.where(pad, 10**6, y)), hs_bad, ws, ht_bad, wt)
  assert np.isfinite(float(dirty[0]))
  np.testing.assert_array_equal(dirty[0], clean[0])
  for g_dirty, g_clean in zip(dirty[1], clean[1]):
    np.testing.assert_array_equal(g_dirty, g_clean)
  assert np.all(np.asarray(dirty[1][0])[pad] == 0)


def test_all_padded_gives_zero_not_nan():
  hs, ws, ht, wt, y, w = _case(8, 9, 4, 4, 11, pad=1.0)
  fn = _fused_fn(jnp.asarray(y), jnp.asarray(w, jnp.float32), _opts(), (4, 0), False)
  value, grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(*_f32(hs, ws, ht, wt))
  assert float(value) == 0.0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_bfloat16_inputs_give_bfloat16_gradients_close_to_float32():
  hs, ws, ht, wt, y, w = _case(9, 24, 16, 16, 40)
  fn = _fused_fn(jnp.asarray(y), jnp.asarray(w, jnp.float32), _opts(), (8, 0), False)
  v32, g32 = jax.jit(jax.value_and_grad(fn, (0, 1)))(*_f32(hs, ws, ht, wt))
  bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (hs, ws, ht, wt)]
  v16, g16 = jax.jit(jax.value_and_grad(fn, (0, 1)))(*bf16)
  assert v16.dtype == jnp.float32 and all(g.dtype == jnp.bfloat16 for g in g16)
  np.testing.assert_allclose(v16, v32, rtol=2e-2)
  for a, b in zip(g16, g32):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=3e-2 * np.abs(b).max())


def test_bad_arguments_raise():
  hs, ws, ht, wt, y, w = _f32(*_case(1, 5, 4, 4, 7))
  with pytest.raises(ValueError, match="streams only"):
    fused.fused_loss_head(
      hs, ws, y, w, 1.0, teacher_hidden_NxDt=ht, teacher_head_DtxV=wt, kind="jsd", vocab_chunk=4
    )
  with pytest.raises(ValueError, match="both"):
    fused.fused_loss_head(hs, ws, y, w, 1.0, teacher_hidden_NxDt=ht)
  with pytest.raises(ValueError, match="unknown logit loss kind"):
    fused.fused_loss_head(hs, ws, y, w, 1.0, kind="kll")


# --- Config and objective wiring ---


def _config(**distill):
  cfg = config_lib.default_config()
  with cfg.distill.ignore_type():  # as a config file may set any type
    cfg.distill.update(**distill)
  return cfg


def test_objective_requests_hidden_and_head_when_fused():
  fused_obj = objective.make_objective(_config())
  assert fused_obj.terms[0].name == "fused"
  assert fused_obj.student_request()["return_logits"] is False
  assert fused_obj.teacher_request()["return_logits"] is False
  dense_obj = objective.make_objective(_config(fused=False))
  assert dense_obj.terms[0].name == "dense"
  assert dense_obj.student_request()["return_logits"] is True


@pytest.mark.parametrize(
  "distill,key",
  [
    (dict(token_chunk=-1), "distill.token_chunk"),
    (dict(vocab_chunk=2.5), "distill.vocab_chunk"),
    (dict(fused="yes"), "distill.fused"),
    (dict(vocab_chunk=64), "distill.vocab_chunk"),  # with logit.kind = jsd below
  ],
)
def test_config_checks_name_the_key(distill, key):
  cfg = _config(**distill)
  cfg.distill.logit.kind = "jsd"
  with pytest.raises(ConfigError, match=key):
    validate.validate(cfg)


def test_vocab_chunk_with_forward_kl_is_valid():
  validate.validate(_config(vocab_chunk=64))
  cfg = _config(vocab_chunk=64, fused=False)  # dense path: the chunk size is unused
  cfg.distill.logit.kind = "jsd"
  validate.validate(cfg)
