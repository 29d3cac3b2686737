"""The objective as a list of terms: requests follow the active terms, a term can be added,
and head terms work on any example shape (tokens [B, T] or, for classifiers, [B])."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config as config_lib
from jaxdistill.config import validate
from jaxdistill.distill import objective, sparse


def _cfg(**distill):
  cfg = config_lib.default_config()
  cfg.student.update(vocab_size=16, d_model=8, num_layers=2, num_heads=2, d_ff=16, max_len=8)
  cfg.teacher.update(
    source="random", vocab_size=16, d_model=12, num_layers=4, num_heads=2, d_ff=16, max_len=8
  )
  cfg.data.seq_len = 8
  cfg.distill.update(**distill)
  validate.validate(cfg)
  return cfg


def test_requests_hold_only_what_the_active_terms_read():
  obj = objective.make_objective(_cfg())  # fused KL head alone
  assert [t.name for t in obj.terms] == ["fused"]
  none = dict(hidden_layers=(), attn_layers=(), qkv_layers=(), return_logits=False)
  assert obj.student_request() == none and obj.teacher_request() == none

  cfg = _cfg(fused=False)
  cfg.distill.attention.update(weight=0.5, layer_map="1:2,2:4")  # value_weight stays 0
  cfg.distill.hidden.update(weight=0.3, layer_map="0:0,2:4")
  obj = objective.make_objective(cfg)
  assert [t.name for t in obj.terms] == ["dense", "attention", "hidden"]
  assert obj.student_request() == dict(
    hidden_layers=(0, 2), attn_layers=(0, 1), qkv_layers=(), return_logits=True
  )
  assert obj.teacher_request() == dict(
    hidden_layers=(0, 4), attn_layers=(1, 3), qkv_layers=(), return_logits=True
  )
  assert [(p.name, p.d_in, p.d_out) for p in obj.projections] == [
    ("layer_0", 8, 12),
    ("layer_2", 8, 12),
  ]

  # Without a logit loss the teacher is asked for nothing of its head.
  cfg.distill.update(logit=dict(weight=0.0), ce=dict(weight=1.0))
  cfg.distill.attention.value_weight = 0.2
  obj = objective.make_objective(cfg)
  assert [t.name for t in obj.terms] == ["dense", "attention", "value_relation", "hidden"]
  assert obj.teacher_request()["return_logits"] is False
  assert obj.teacher_request()["qkv_layers"] == (1, 3)


def _dense_inputs(seed=0, b=2, t=5, v=16):
  rng = np.random.default_rng(seed)
  s_out = {"logits": jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)}
  s_out["hidden"] = {0: jnp.asarray(rng.normal(size=(b, t, 8)), jnp.float32)}
  t_out = {"logits": jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)}
  weights = jnp.asarray(rng.random((b, t)) > 0.3, jnp.float32)
  batch = {"targets": jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32), "weights": weights}
  return s_out, t_out, batch, jnp.maximum(weights.sum(), 1.0)


def test_a_new_term_is_one_function_and_one_record():
  cfg = _cfg(fused=False, ce=dict(weight=0.5))
  obj = objective.make_objective(cfg)
  s_out, t_out, batch, denom = _dense_inputs()

  def toy(s, t, batch, denom, step, proj):
    """Mean squared embedding output (hidden state 0) per valid token."""
    value = jnp.sum(jnp.sum(s["hidden"][0] ** 2, -1) * batch["weights"]) / denom
    return value, {"distill/toy": value}

  two = lambda step: jnp.float32(2.0)
  term = objective.Term(
    "toy", toy, two, objective.Needs(hidden=(0,)), reports=(("weight/toy", two),)
  )
  extended = dataclasses.replace(obj, terms=obj.terms + (term,))
  assert obj.student_request()["hidden_layers"] == ()
  assert extended.student_request()["hidden_layers"] == (0,)
  assert extended.teacher_request() == obj.teacher_request()

  base, base_metrics = objective.compute_loss(obj, 0, {}, s_out, t_out, batch, denom)
  total, metrics = objective.compute_loss(extended, 0, {}, s_out, t_out, batch, denom)
  toy_value = toy(s_out, t_out, batch, denom, 0, {})[0]
  assert float(toy_value) > 0
  np.testing.assert_allclose(total, base + 2.0 * toy_value, rtol=1e-6)
  assert metrics["distill/toy"] == toy_value and metrics["task/ce"] == base_metrics["task/ce"]
  assert objective.schedule_metrics(extended, 0) == dict(
    objective.schedule_metrics(obj, 0), **{"weight/toy": 2.0}
  )
  assert set(objective.schedule_metrics(obj, 0)) == {
    "distill/temperature", "weight/ce", "weight/logit"
  }  # fmt: skip


@pytest.mark.parametrize("fused", [True, False])
def test_head_terms_take_any_example_shape(fused):
  """Weights [B] (a classifier's) and [B, T] give the same loss for the same rows."""
  cfg = _cfg(fused=fused, ce=dict(weight=0.5), token_chunk=3)
  head = objective.make_objective(cfg).terms[0]
  rng = np.random.default_rng(1)
  n, d, v = 12, 8, 16
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  hs, ws, ht, wt, zs, zt = f32(n, d), f32(d, v), f32(n, 12), f32(12, v), f32(n, v), f32(n, v)
  y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
  w = jnp.asarray(rng.random(n) > 0.25, jnp.float32)
  denom = w.sum()

  def run(shape):
    r = lambda x: x.reshape(*shape, *x.shape[1:])
    s = {"final_hidden": r(hs), "head": ws, "logits": r(zs)}
    t = {"final_hidden": r(ht), "head": wt, "logits": r(zt)}
    return head.fn(s, t, {"targets": r(y), "weights": r(w)}, denom, 0, {})

  (flat, m_flat), (tokens, m_tokens) = run((n,)), run((3, 4))
  assert float(flat) > 0 and {"task/ce", "distill/kl"} <= set(m_flat)
  np.testing.assert_allclose(flat, tokens, rtol=1e-6)
  np.testing.assert_allclose(m_flat["task/ce"], m_tokens["task/ce"], rtol=1e-6)


def test_online_sparse_targets_need_no_ids():
  rng = np.random.default_rng(2)
  h = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 20)), jnp.float32)
  got = sparse.teacher_targets(h, w, temperature=2.0, k=4, token_chunk=4)
  zeros = jnp.zeros((10,), jnp.int32)
  want = sparse.teacher_targets(h, w, zeros, zeros, temperature=2.0, k=4, token_chunk=4)
  assert set(got) == {"topk_ids", "topk_logp", "tail"}
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  with pytest.raises(ValueError, match="row_N and pos_N"):
    sparse.teacher_targets(h, w, temperature=2.0, k=4, samples=3)


@pytest.mark.slow
def test_sparse_kind_with_its_weight_off_trains_on_ce(tiny_config):
  """A sparse logit kind whose weight is 0 leaves CE alone in the fused head (it used to reach
  the dense heads as an unknown kind and crash)."""
  import jax

  from jaxdistill.train import loop

  cfg = tiny_config
  cfg.distill.logit.update(kind="topk_tail", weight=0.0)
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  run = loop.build_run(cfg, devices=jax.devices()[:1])
  history = []
  loop.run_steps(run, 2, lambda step, m, s: history.append(jax.device_get(m)))
  assert [k for k in history[0] if k.startswith("distill/")] == []
  m = history[0]
  assert m["task/ce"] > 0 and m["train/loss"] == cfg.distill.ce.weight * m["task/ce"]
