"""Models that teach each other (``codistill``, train/codistill.py): the two-model loss and its
gradients against a hand-written one and a float64 NumPy value, exchange_every = 1 with copies
equal to mutual learning, the copies' refresh schedule, split rows under gradient
accumulation, peers of another size, a killed and resumed codistillation run, config errors."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jaxdistill import models
from jaxdistill.config import validate
from jaxdistill.errors import ConfigError
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import codistill as codistill_lib
from jaxdistill.train import run as run_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(exchange_every=1, split_data=False, peers=({"lr": 5e-3},), **data):
  """Two small decoders (the student and one peer) on synthetic data, CE + KL each."""
  cfg = testing.tiny_config()
  cfg.teacher.source = "none"
  cfg.distill.update(temperature=1.0)
  cfg.distill.ce.weight, cfg.distill.logit.weight = 1.0, 0.0
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.codistill.update(
    peers=peers, weight=0.7, temperature=2.0, exchange_every=exchange_every, split_data=split_data
  )
  cfg.mesh.update(data=4, fsdp=2)
  cfg.data.update(**data)
  return cfg


def _batch(cfg, index=0):
  from jaxdistill.data import synthetic

  d = cfg.data
  data = synthetic.SyntheticData(cfg.student.vocab_size, d.seq_len, d.batch_size, cfg.seed, 0.5)
  return data.global_batch(index)


def _np_logsoftmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_loss(z0, z1, targets, weights, w, tau):
  """float64: CE_0 + CE_1 + w tau^2 (KL(p1 || p0) + KL(p0 || p1)), token-weighted means."""
  total, denom = 0.0, max(weights.sum(), 1.0)
  for mine, theirs in ((z0, z1), (z1, z0)):
    logp = _np_logsoftmax(mine)
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    lq, lp = _np_logsoftmax(mine / tau), _np_logsoftmax(theirs / tau)
    kl = (np.exp(lp) * (lp - lq)).sum(-1) * tau**2
    total += ((ce + w * kl) * weights).sum() / denom
  return total


def _loss_inputs(cfg):
  run = run_lib.build_run(cfg, data=False)
  co = codistill_lib.of(cfg)
  batch = sharding_lib.shard_batch(_batch(cfg), run.mesh)
  return run, co, batch


@pytest.mark.slow  # about 8 s: two models' forward and backward compiled twice
def test_two_model_loss_and_gradients_match_a_hand_written_loss():
  cfg = _config()
  run, co, batch = _loss_inputs(cfg)
  loss_fn = codistill_lib.make_loss_fn(co, run.student)
  params = run.state.params
  denom = codistill_lib.denominators(co, batch)
  peer = co.modules[0]
  logits = lambda m, p: models.apply(m, {"params": p}, batch)["logits"]  # noqa: E731

  def hand(params):
    # L_0 reaches model 0 only, L_1 model 1 only: the other side is a constant.
    z0, z1 = logits(run.student, params["student"]), logits(peer, params["peers"]["peer_1"])
    w, tau, mask = 0.7, 2.0, batch["weights"]
    total = 0.0
    for mine, theirs in ((z0, z1), (z1, z0)):
      theirs = jax.lax.stop_gradient(theirs)
      logp = jax.nn.log_softmax(mine)
      ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
      lq, lp = jax.nn.log_softmax(mine / tau), jax.nn.log_softmax(theirs / tau)
      kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1) * tau**2
      total = total + jnp.sum((ce + w * kl) * mask) / jnp.maximum(mask.sum(), 1.0)
    return total

  with sharding_lib.rules_context(run.mesh):
    (got, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, None, None, batch, 0, denom, None
    )
    want, want_grads = jax.value_and_grad(hand)(params)
    z0 = np.asarray(logits(run.student, params["student"]), np.float64)
    z1 = np.asarray(logits(peer, params["peers"]["peer_1"]), np.float64)
  host = {k: np.asarray(v) for k, v in batch.items()}
  ref = _np_loss(z0, z1, host["targets"], host["weights"].astype(np.float64), 0.7, 2.0)
  np.testing.assert_allclose(float(got), ref, rtol=2e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  assert float(metrics["task/ce"]) == pytest.approx(float(metrics["codistill/ce_0"]))
  assert 0 <= float(metrics["codistill/agreement_0"]) <= 1
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=2e-4, atol=1e-6)
  assert float(jnp.abs(grads["peers"]["peer_1"]["token_embed"]["embedding"]).sum()) > 0


def _train(cfg, steps, use_copies=None, batches=None):
  if use_copies is None:
    run = run_lib.build_run(cfg, data=False)
  else:  # the copy mechanism forced on (or off) whatever exchange_every says
    run = _rebuild(cfg, dataclasses.replace(codistill_lib.of(cfg), use_copies=use_copies))
  states = []
  for k in range(steps):
    batch = sharding_lib.shard_batch(_batch(cfg, k), run.mesh)
    metrics = run.step(batch)
    states.append((jax.device_get(run.state), jax.device_get(metrics)))
  return states


def _rebuild(cfg, co):
  """A run whose step and state use ``co`` as given (a test-only codistillation)."""
  from jaxdistill.train import step as step_lib

  run = run_lib.build_run(cfg, data=False)
  tx = codistill_lib.optimizer(co, cfg.optim)
  state, shardings = step_lib.init_state(
    run.objective, run.student, tx, jax.random.key(cfg.seed), run.mesh, cfg.data.seq_len,
    codistill=co,
  )  # fmt: skip
  step = step_lib.make_distill_step(run.objective, run.student, None, tx, codistill=co)
  run.state = state
  run.step_fn = step_lib.jit_distill_step(step, shardings, None, run.mesh)
  return run


@pytest.mark.slow  # four runs of 2 steps, each compiled
@pytest.mark.parametrize("split", [False, True])
def test_exchange_every_one_through_copies_equals_mutual_learning(split):
  cfg = _config(exchange_every=1, split_data=split)
  live = _train(cfg, 2)
  copied = _train(cfg, 2, use_copies=True)
  assert live[0][0].peer_copies is None and copied[0][0].peer_copies is not None
  for (a, ma), (b, mb) in zip(live, copied):
    assert float(ma["train/loss"]) == pytest.approx(float(mb["train/loss"]), rel=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # one run of 5 steps
def test_copies_refresh_every_n_steps_and_others_are_read_through_them():
  cfg = _config(exchange_every=2, split_data=True)
  states = _train(cfg, 5)
  run = run_lib.build_run(cfg, data=False)
  initial = jax.device_get(codistill_lib.live_params(codistill_lib.of(cfg), run.state.params))
  # After steps 0..4 (0-based): copies taken at the start of steps 0, 2, 4 = the params after
  # 0, 2, 4 updates.
  live_after = [codistill_lib.live_params(codistill_lib.of(cfg), s.params) for s, _ in states]
  want = [initial, initial, live_after[1], live_after[1], live_after[3]]
  for (state, metrics), copies, k in zip(states, want, range(5)):
    assert float(metrics["codistill/exchanged"]) == (1.0 if k % 2 == 0 else 0.0)
    for x, y in zip(jax.tree.leaves(state.peer_copies), jax.tree.leaves(copies), strict=True):
      np.testing.assert_array_equal(x, y)


@pytest.mark.slow  # two runs of 2 steps
def test_split_rows_and_denominators_are_the_same_under_gradient_accumulation():
  cfg = _config(exchange_every=3, split_data=True, batch_size=16)
  one = _train(cfg, 2)
  cfg.optim.grad_accum = 2
  two = _train(cfg, 2)
  for (a, ma), (b, mb) in zip(one, two):
    assert float(ma["train/loss"]) == pytest.approx(float(mb["train/loss"]), rel=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_denominators_count_each_models_block_of_rows():
  cfg = _config(split_data=True)
  co = codistill_lib.of(cfg)
  weights = np.zeros((8, 16), np.float32)
  weights[:4, :3], weights[4:, :5] = 1, 1
  got = codistill_lib.denominators(co, {"weights": jnp.asarray(weights)})
  np.testing.assert_array_equal(np.asarray(got), [12.0, 20.0])
  whole = codistill_lib.denominators(
    dataclasses.replace(co, split_data=False), {"weights": jnp.asarray(weights)}
  )
  np.testing.assert_array_equal(np.asarray(whole), [32.0, 32.0])


@pytest.mark.slow
def test_a_smaller_peer_with_its_own_learning_rate_trains_and_is_evaluated():
  cfg = _config(peers=({"d_model": 16, "d_ff": 32, "num_layers": 1, "lr": 1e-3},))
  run = run_lib.build_run(cfg, data=False)
  peer = run.state.params["peers"]["peer_1"]
  assert peer["token_embed"]["embedding"].shape == (64, 16)
  assert run.state.opt_state.keys() == {"model_0", "peer_1"}
  batch = sharding_lib.shard_batch(_batch(cfg), run.mesh)
  m = run.step(batch)
  assert np.isfinite(float(m["train/loss"])) and float(m["codistill/kl_1"]) >= 0
  flops = run.flops
  assert flops.student > 0 and flops.teacher == 0  # live, whole batch: forwards reused


@pytest.mark.slow
def test_killed_and_resumed_codistillation_logs_the_same_losses(tmp_path):
  # configs/codistill.py at its test size (split rows, copies every 2 steps): 6 steps
  # uninterrupted against a run resumed from the step-3 checkpoint, whose copies were taken
  # at step 2 and are read again at step 4 (0-based 3): they must come back exactly.
  import orbax.checkpoint as ocp

  from jaxdistill.config import load_config
  from jaxdistill.train import loop

  cfg = load_config(f"{ROOT}/configs/codistill.py:test")
  cfg.optim.update(steps=6, warmup_steps=1)
  cfg.eval.every = 0
  cfg.log.update(every=1, progress=False)
  cfg.ckpt.update(every=3, async_save=False)
  ref, resumed = tmp_path / "ref", tmp_path / "resumed"
  loop.train(cfg, str(ref))
  loop.train(cfg, str(resumed), resume_from=str(ref / "checkpoints" / "3"))
  rows = testing.metric_rows(ref)
  assert testing.metric_rows(resumed) == testing.metric_rows(ref, after=3) and len(rows) == 6
  assert [r["codistill/exchanged"] for r in testing.metric_rows(ref)] == [1, 0, 1, 0, 1, 0]
  with ocp.StandardCheckpointer() as ckptr:
    a = ckptr.restore(str(resumed / "checkpoints" / "6" / "state"))
    b = ckptr.restore(str(ref / "checkpoints" / "6" / "state"))
  assert jax.tree.leaves(a["peer_copies"]) and jax.tree.leaves(a["params"]["peers"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(testing.host_array(x), testing.host_array(y))


@pytest.mark.parametrize(
  "change, key, words",
  [
    (dict(exchange_every=0), "codistill.exchange_every", "int >= 1"),
    (dict(exchange_every=-2), "codistill.exchange_every", "int >= 1"),
    (dict(temperature=0.0), "codistill.temperature", "> 0"),
    (dict(peers=({"vocab_size": 128},)), "codistill.peers[0].vocab_size", "one vocabulary"),
    (dict(peers=({"widht": 3},)), "codistill.peers[0].widht", "unknown key"),
    (dict(peers=({"lr": -1.0},)), "codistill.peers[0].lr", ">= 0"),
    (dict(peers=({"max_len": 8},)), "codistill.peers[0].max_len", "data.seq_len"),
    (dict(peers=("big",)), "codistill.peers[0]", "dict of student keys"),
  ],
)
def test_bad_codistill_settings_name_their_key(change, key, words):
  cfg = _config()
  cfg.codistill.update(**change)
  with pytest.raises(ConfigError, match=r"^" + key.replace(".", r"\.").replace("[", r"\[")) as e:
    validate.validate(cfg)
  assert words in str(e.value)


def test_codistillation_refuses_a_teacher_and_rows_that_do_not_split():
  cfg = _config()
  cfg.teacher.update(source="random", **testing.SMALL_LM_TEACHER)
  with pytest.raises(ConfigError, match=r"^teacher\.source"):
    validate.validate(cfg)
  cfg = _config(split_data=True, batch_size=6)
  cfg.optim.grad_accum = 2
  with pytest.raises(ConfigError, match=r"^data\.batch_size"):
    validate.validate(cfg)


def test_the_codistill_config_validates_in_every_variant():
  from jaxdistill.config import load_config

  for arg in ("", ":test", ":mutual", ":mutual,test"):
    cfg = load_config(f"{ROOT}/configs/codistill.py{arg}")
    validate.validate(cfg)
    assert len(cfg.codistill.peers) == 1
    assert cfg.codistill.split_data == ("mutual" not in arg)
  with pytest.raises(ConfigError, match="--config"):
    load_config(f"{ROOT}/configs/codistill.py:huge")


def test_a_peer_key_is_overridden_on_the_command_line():
  from jaxdistill.config import load_config

  cfg = load_config(
    f"{ROOT}/configs/codistill.py:test",
    [("codistill.peers[0].lr", "0.002"), ("codistill.peers[0].d_model", "32")],
  )
  assert cfg.codistill.peers[0]["lr"] == 0.002 and cfg.codistill.peers[0]["d_model"] == 32
  for key, where in (
    ("codistill.peers[1].lr", "out of range"),
    ("codistill.peers[0].x", "unknown"),
  ):
    with pytest.raises(ConfigError, match=where):
      load_config(f"{ROOT}/configs/codistill.py:test", [(key, "1")])
