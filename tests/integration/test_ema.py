"""Self-distillation from an EMA "mean teacher" (``teacher.source='ema'``, train/ema.py): the
decay schedule, the in-step update against a float64 NumPy recomputation, the average's
shardings, no gradient reaching it, a bitwise resume of an EMA run, and the config errors."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jaxdistill.config import validate
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import ema as ema_lib
from jaxdistill.train import run as run_lib
from jaxdistill.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _ema_config(decay=0.8, warmup=3):
  """tiny_config's all-losses objective (logit KD, CE, attention, hidden states) with the
  student's own EMA as the teacher, on an 4 x 2 data x fsdp mesh."""
  cfg = testing.tiny_config()
  cfg.teacher.update(source="ema", ema_decay=decay, ema_warmup_steps=warmup, **testing.SMALL_LM)
  cfg.mesh.update(data=4, fsdp=2)
  return cfg


def test_decay_schedule_warms_up_linearly_then_holds():
  constant = ema_lib.Schedule(0.99, 0)
  assert [float(ema_lib.decay_at(constant, s)) for s in (0, 1, 100)] == pytest.approx([0.99] * 3)
  warm = ema_lib.Schedule(0.9, 4)
  got = [float(ema_lib.decay_at(warm, s)) for s in range(7)]
  assert got == pytest.approx([0.0, 0.225, 0.45, 0.675, 0.9, 0.9, 0.9])


def test_update_is_the_float64_average_in_the_leaf_dtype():
  rng = np.random.default_rng(0)
  e, p = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  got = ema_lib.update({"w": jnp.asarray(e, jnp.float32)}, {"w": jnp.asarray(p, jnp.float32)}, 0.7)
  assert got["w"].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got["w"]), 0.7 * e + 0.3 * p, rtol=1e-6, atol=1e-6)
  half = ema_lib.update(
    {"w": jnp.asarray(e, jnp.bfloat16)}, {"w": jnp.asarray(p, jnp.float32)}, 0.5
  )
  assert half["w"].dtype == jnp.bfloat16


@pytest.mark.slow  # about 15 s with a cold compilation cache
def test_step_updates_the_ema_like_a_float64_reference():
  # Every step: ema <- d_t * ema + (1 - d_t) * new student params, d_t = 0.8 * min(1, t / 3),
  # recomputed in float64 from the student params each step returned; the teacher's terms
  # (logit KD, attention, hidden states) read the average.
  cfg = _ema_config()
  run = run_lib.build_run(cfg)
  student = run.state.params["student"]
  shardings = lambda tree: [a.sharding for a in jax.tree.leaves(tree)]  # noqa: E731
  assert shardings(run.state.ema_params) == shardings(student)
  assert any(not s.is_fully_replicated for s in shardings(student))  # fsdp splits some
  assert run.teacher_vars is None and run.teachers[0][1]["params"] is run.state.ema_params
  ref = [np.asarray(a, np.float64) for a in jax.tree.leaves(jax.device_get(student))]
  decays = []
  for t in range(5):
    metrics = run.step(sharding_lib.shard_batch(next(run.data_iter), run.mesh))
    d = 0.8 * min(1.0, t / 3)
    params = [np.asarray(a, np.float64) for a in jax.tree.leaves(run.state.params["student"])]
    ref = [d * e + (1 - d) * p for e, p in zip(ref, params)]
    decays.append(float(metrics["train/ema_decay"]))
    assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/nonfinite"]) == 0
  assert decays == pytest.approx([0.0, 0.8 / 3, 1.6 / 3, 0.8, 0.8])
  got = [np.asarray(a, np.float64) for a in jax.tree.leaves(run.state.ema_params)]
  assert len(got) == len(ref)
  moved = False
  for g, r, p in zip(got, ref, params):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    moved |= not np.allclose(g, p)
  assert moved  # the average lags the student: it is not a copy of it
  assert shardings(run.state.ema_params) == shardings(run.state.params["student"])


@pytest.mark.slow  # about 12 s with a cold compilation cache
def test_no_gradient_reaches_the_ema_params():
  # The average is the teacher's input, never a parameter: not in params (so not in the
  # optimizer state), and the loss's gradient with respect to it is exactly zero.
  cfg = _ema_config()
  run = run_lib.build_run(cfg, data=False)
  state = run.state
  opt_of_params = jax.eval_shape(step_lib.make_optimizer(cfg.optim).init, state.params)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(opt_of_params)
  loss_fn = step_lib._make_loss_fn(run.objective, run.student, run.teacher)
  batch = sharding_lib.shard_batch(next(iter(_batches(cfg))), run.mesh)
  denom = jnp.maximum(batch["weights"].sum(), 1.0)

  def loss_of_teacher(teacher_vars):
    loss, _ = loss_fn(state.params, None, teacher_vars, batch, state.step, denom, None)
    return loss

  with sharding_lib.rules_context(run.mesh):
    loss, grads = jax.value_and_grad(loss_of_teacher)(ema_lib.teacher_vars(state))
  assert np.isfinite(float(loss))
  for g in jax.tree.leaves(grads):
    assert not np.any(np.asarray(g))


def _batches(cfg):
  from jaxdistill import data as data_lib

  return data_lib.make_iterator(cfg, "train")


def test_given_teacher_vars_are_refused_with_an_ema_teacher():
  cfg = _ema_config()
  with pytest.raises(JaxdistillError, match="state's average"):
    run_lib.build_run(cfg, data=False, teacher_vars={"params": {}})


@pytest.mark.slow
def test_resumed_ema_run_is_bitwise_the_uninterrupted_one(tmp_path):
  # configs/self_distill.py at its test size: 6 steps uninterrupted against a run resumed from
  # the reference's step-3 checkpoint; the logged losses and the final state, EMA included.
  import orbax.checkpoint as ocp

  from jaxdistill.config import load_config
  from jaxdistill.train import loop

  cfg = load_config(f"{ROOT}/configs/self_distill.py:test")
  cfg.optim.update(steps=6, warmup_steps=1)
  cfg.teacher.ema_warmup_steps = 4  # the resumed half crosses the end of the warmup
  cfg.eval.every = 0
  cfg.log.update(every=1, progress=False)
  cfg.ckpt.update(every=3, async_save=False)
  ref, resumed = tmp_path / "ref", tmp_path / "resumed"
  loop.train(cfg, str(ref))
  loop.train(cfg, str(resumed), resume_from=str(ref / "checkpoints" / "3"))
  rows = testing.metric_rows(ref)
  assert testing.metric_rows(resumed) == testing.metric_rows(ref, after=3) and len(rows) == 6
  assert [r["train/ema_decay"] for r in testing.metric_rows(ref)] == pytest.approx(
    [0, 0.225, 0.45, 0.675, 0.9, 0.9]
  )
  with ocp.StandardCheckpointer() as ckptr:
    a = ckptr.restore(str(resumed / "checkpoints" / "6" / "state"))
    b = ckptr.restore(str(ref / "checkpoints" / "6" / "state"))
  assert "ema_params" in a and jax.tree.leaves(a["ema_params"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(testing.host_array(x), testing.host_array(y))
  # The average is not the student: it lags it.
  s, e = jax.tree.leaves(a["params"]["student"]), jax.tree.leaves(a["ema_params"])
  assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(s, e))


@pytest.mark.parametrize(
  "change, key, words",
  [
    (dict(ema_decay=1.0), "teacher.ema_decay", "in (0, 1)"),
    (dict(ema_decay=0.0), "teacher.ema_decay", "in (0, 1)"),
    (dict(ema_decay=-0.5), "teacher.ema_decay", "in (0, 1)"),
    (dict(ema_warmup_steps=-1), "teacher.ema_warmup_steps", ">= 0"),
    (dict(d_model=48), "teacher.d_model", "an EMA teacher is the student's architecture"),
    (dict(num_layers=3), "teacher.num_layers", "an EMA teacher is the student's architecture"),
    (dict(vocab_size=128), "teacher.vocab_size", "an EMA teacher is the student's architecture"),
  ],
)
def test_bad_ema_settings_name_their_key(change, key, words):
  cfg = _ema_config()
  cfg.teacher.update(**change)
  with pytest.raises(ConfigError, match=r"^" + key.replace(".", r"\.")) as e:
    validate.validate(cfg)
  assert words in str(e.value)


def test_ema_teacher_refuses_an_ensemble_teacher_blocks_and_quantised_students():
  from jaxdistill import config as config_lib

  cfg = _ema_config()
  cfg.teachers = (config_lib.teacher_fields(source="random"),)
  with pytest.raises(ConfigError, match="^teachers"):
    validate.validate(cfg)
  cfg = _ema_config()
  cfg.student.init_layers = "last"
  with pytest.raises(ConfigError, match=r"^student\.init_layers"):
    validate.validate(cfg)
  cfg = _ema_config()
  cfg.student.policy = "p=f32,c=fp8,o=f32"
  with pytest.raises(ConfigError, match=r"^student\.policy"):
    validate.validate(cfg)


def test_the_self_distill_config_validates_at_both_sizes():
  from jaxdistill.config import load_config

  for arg in ("", ":test"):
    cfg = load_config(f"{ROOT}/configs/self_distill.py{arg}")
    validate.validate(cfg)
    assert cfg.teacher.source == "ema" and cfg.distill.logit.weight > 0
  with pytest.raises(ConfigError, match="--config"):
    load_config(f"{ROOT}/configs/self_distill.py:huge")


@pytest.mark.slow
def test_a_batchnorm_image_classifier_trains_with_its_ema_teacher():
  # configs/smoke_vision.py's ResNet student with its own EMA as the teacher (logit KD): the
  # teacher runs in inference mode on the student's running averages.
  from jaxdistill.config import load_config
  from jaxdistill.models import VISION_KEYS

  cfg = load_config(f"{ROOT}/configs/smoke_vision.py")
  for key in VISION_KEYS:
    cfg.teacher[key] = cfg.student[key]
  cfg.teacher.update(source="ema", ema_decay=0.5)
  for key in ("attention_transfer", "feature_map"):
    cfg.distill[key].weight = 0.0
  run = run_lib.build_run(cfg)
  assert "batch_stats" in ema_lib.teacher_vars(run.state)
  before = [np.asarray(a) for a in jax.tree.leaves(run.state.ema_params)]
  for _ in range(2):
    metrics = run.step(sharding_lib.shard_batch(next(run.data_iter), run.mesh))
    assert np.isfinite(float(metrics["train/loss"]))
  after = [np.asarray(a) for a in jax.tree.leaves(run.state.ema_params)]
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
