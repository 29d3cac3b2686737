"""Several teachers: the ensemble targets against float64 NumPy references, the head terms that
use them, two identical teachers equal to one, feature terms naming their teacher, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill import config
from jaxdistill.config import validate
from jaxdistill.distill import ensemble, objective
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.parallel import precision, sharding
from jaxdistill.train import run as run_lib

B, T, V, TAU = 2, 8, 48, 2.0


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _kl_ref(p, q, w, tau):
  """tau^2 * sum_tokens w KL(p || q) / sum w, float64."""
  per = np.sum(p * (np.log(p) - np.log(q)), -1)
  return tau**2 * np.sum(w * per) / max(w.sum(), 1.0)


@pytest.fixture
def logits():
  rng = np.random.default_rng(0)
  return [rng.normal(size=(B, T, V)) * s for s in (1.0, 2.0, 0.5)]


# --- ensemble.py ------------------------------------------------------------------------


def test_mix_probs_is_the_weighted_average_of_softmaxes(logits):
  w = ensemble.normalise([1.0, 2.0, 1.0])
  mixed = ensemble.mix_logits([jnp.asarray(z, jnp.float32) for z in logits], w, TAU, "probs")
  want = sum(wk * _softmax(z / TAU) for wk, z in zip(w, logits))
  np.testing.assert_allclose(_softmax(np.asarray(mixed, np.float64) / TAU), want, rtol=1e-5)


def test_mix_logits_is_the_weighted_average_of_logits(logits):
  w = ensemble.normalise([3.0, 1.0, 0.0])
  mixed = ensemble.mix_logits([jnp.asarray(z, jnp.float32) for z in logits], w, TAU, "logits")
  np.testing.assert_allclose(mixed, 0.75 * logits[0] + 0.25 * logits[1], rtol=1e-5, atol=1e-5)


def test_zero_weight_teacher_drops_out_of_the_mixture(logits):
  w = ensemble.normalise([1.0, 0.0])
  mixed = ensemble.mix_logits([jnp.asarray(z, jnp.float32) for z in logits[:2]], w, TAU, "probs")
  np.testing.assert_allclose(_softmax(np.asarray(mixed) / TAU), _softmax(logits[0] / TAU), 1e-5)


def test_stacked_head_gives_the_averaged_logits():
  rng = np.random.default_rng(1)
  hs = [rng.normal(size=(6, d)).astype(np.float32) for d in (4, 7)]
  ws = [rng.normal(size=(d, V)).astype(np.float32) for d in (4, 7)]
  w = (0.25, 0.75)
  hidden, head = ensemble.stacked_head(
    [jnp.asarray(h) for h in hs], [jnp.asarray(x) for x in ws], w
  )
  assert hidden.shape == (6, 11) and head.shape == (11, V)
  want = sum(wk * h.astype(np.float64) @ x for wk, h, x in zip(w, hs, ws))
  np.testing.assert_allclose(np.asarray(hidden @ head, np.float64), want, rtol=1e-4, atol=1e-5)


def test_normalise_rejects_bad_weights():
  assert ensemble.normalise([2, 2]) == (0.5, 0.5)
  for bad in ([0.0, 0.0], [1.0, -1.0]):
    with pytest.raises(ValueError):
      ensemble.normalise(bad)


# --- The head terms against NumPy ---------------------------------------------------------


def _cfg(ensemble_kind="probs", fused=False, kind="kl", weights=(1.0, 3.0)):
  c = config.default_config()
  c.data.seq_len, c.data.batch_size, c.optim.steps = T, 4, 3
  c.student.vocab_size = c.teacher.vocab_size = V
  c.distill.temperature, c.distill.ensemble, c.distill.fused = TAU, ensemble_kind, fused
  c.distill.logit.kind, c.distill.ce.weight = kind, 0.0
  c.teacher.weight = weights[0]
  c.teachers = (config.teacher_fields(vocab_size=V, d_model=96, num_layers=3, weight=weights[1]),)
  return c


def _loss(c, s_logits, t_logits, wts):
  obj = objective.make_objective(c)
  s, ts = (
    {"logits": jnp.asarray(s_logits, jnp.float32)},
    tuple({"logits": jnp.asarray(z, jnp.float32)} for z in t_logits),
  )
  batch = {"targets": jnp.zeros((B, T), jnp.int32), "weights": jnp.asarray(wts, jnp.float32)}
  denom = jnp.maximum(batch["weights"].sum(), 1.0)
  return objective.compute_loss(obj, jnp.int32(0), {}, s, ts, batch, denom)


def _weights():
  w = np.ones((B, T))
  w[1, -3:] = 0.0
  return w


def test_dense_probs_ensemble_is_kl_to_the_mixture(logits):
  loss, metrics = _loss(_cfg("probs"), logits[2], logits[:2], _weights())
  p = 0.25 * _softmax(logits[0] / TAU) + 0.75 * _softmax(logits[1] / TAU)
  want = _kl_ref(p, _softmax(logits[2] / TAU), _weights(), TAU)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["distill/kl"]), want, rtol=1e-5)


def test_dense_logits_ensemble_is_kl_to_the_averaged_logits(logits):
  loss, _ = _loss(_cfg("logits"), logits[2], logits[:2], _weights())
  z = 0.25 * logits[0] + 0.75 * logits[1]
  want = _kl_ref(_softmax(z / TAU), _softmax(logits[2] / TAU), _weights(), TAU)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_losses_ensemble_is_the_average_of_kls_and_differs_from_the_mixture(logits):
  loss, metrics = _loss(_cfg("losses"), logits[2], logits[:2], _weights())
  q = _softmax(logits[2] / TAU)
  per = [_kl_ref(_softmax(z / TAU), q, _weights(), TAU) for z in logits[:2]]
  want = 0.25 * per[0] + 0.75 * per[1]
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["distill/kl/teacher_1"]), per[1], rtol=1e-5)
  mixture, _ = _loss(_cfg("probs"), logits[2], logits[:2], _weights())
  assert float(mixture) < float(loss) - 1e-3  # KL to the average < average of the KLs (Jensen)


def test_forward_kl_gradient_of_mixture_equals_losses_average(logits):
  """For forward KL the student's gradient is the same (q - sum_k w_k p_k); values differ."""
  grads = []
  for kind in ("probs", "losses"):
    c = _cfg(kind)
    f = lambda s: _loss(c, s, logits[:2], _weights())[0]  # noqa: E731
    grads.append(np.asarray(jax.grad(f)(jnp.asarray(logits[2], jnp.float32))))
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_fused_heads_match_the_dense_ones():
  """fused "logits" (stacked heads) and "losses" equal the dense head on the same logits."""
  rng = np.random.default_rng(2)
  dims = (64, 96, 128)  # student, teacher 0, teacher 1
  hidden = [rng.normal(size=(B, T, d)).astype(np.float32) for d in dims]
  heads = [(rng.normal(size=(d, V)) / np.sqrt(d)).astype(np.float32) for d in dims]
  wts = _weights()
  batch = {"targets": jnp.zeros((B, T), jnp.int32), "weights": jnp.asarray(wts, jnp.float32)}
  denom = jnp.asarray(wts.sum(), jnp.float32)
  for kind in ("logits", "losses"):
    values = []
    for fused in (True, False):
      obj = objective.make_objective(_cfg(kind, fused=fused))
      if fused:
        outs = [
          {"final_hidden": jnp.asarray(h), "head": jnp.asarray(w)} for h, w in zip(hidden, heads)
        ]
      else:
        outs = [{"logits": jnp.asarray(h) @ jnp.asarray(w)} for h, w in zip(hidden, heads)]
      loss, _ = objective.compute_loss(
        obj, jnp.int32(0), {}, outs[0], tuple(outs[1:]), batch, denom
      )
      values.append(float(loss))
    np.testing.assert_allclose(values[0], values[1], rtol=2e-5, err_msg=kind)


# --- Runs ---------------------------------------------------------------------------------


# The runs' models: one block each, narrow (compiling their init and step is what these tests
# cost; nothing they check depends on depth or width).
SMALL = dict(d_model=32, num_layers=1, num_heads=2, d_ff=64)


def _run_cfg(kind, fused, n_teachers, logit_kind="kl"):
  c = config.default_config()
  c.student.update(**SMALL)
  c.teacher.update(**SMALL)
  c.distill.logit.kind, c.precompute.k = logit_kind, 16
  c.data.seq_len, c.data.batch_size, c.optim.steps, c.mesh.data = 16, 4, 3, 1
  c.distill.ensemble, c.distill.fused, c.distill.temperature = kind, fused, 2.0
  c.distill.hidden.weight = 0.5
  if n_teachers == 2:
    c.teacher.weight = 0.3
    c.teachers = (config.teacher_fields(weight=0.7, **SMALL),)
  return c


@pytest.mark.parametrize(
  "kind,fused,logit_kind",
  [
    ("probs", False, "kl"),
    pytest.param("logits", True, "kl", marks=pytest.mark.slow),
    pytest.param("losses", True, "kl", marks=pytest.mark.slow),
    # the sparse head: mixed per token chunk, and stacked heads
    pytest.param("probs", False, "topk_tail", marks=pytest.mark.slow),
    pytest.param("logits", False, "topk_renorm", marks=pytest.mark.slow),
  ],
)
def test_two_identical_teachers_equal_one(kind, fused, logit_kind):
  one = run_lib.build_run(_run_cfg(kind, fused, 1, logit_kind), devices=jax.devices()[:1])
  batch = sharding.shard_batch(next(one.data_iter), one.mesh)
  tv = one.teacher_vars
  two = run_lib.build_run(
    _run_cfg(kind, fused, 2, logit_kind),
    devices=jax.devices()[:1],
    teacher_vars=(tv, tv),
    data=False,
  )
  m1, m2 = one.step(batch), two.step(batch)
  np.testing.assert_allclose(float(m2["train/loss"]), float(m1["train/loss"]), rtol=1e-5)
  leaves = lambda r: jax.tree.leaves(jax.device_get(r.state.params))  # noqa: E731
  for a, b in zip(leaves(one), leaves(two)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  for _, variables in two.teachers:  # the teachers' variables are inputs: never donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(variables))


@pytest.mark.slow
def test_feature_term_reads_its_teacher():
  c = _run_cfg("probs", False, 2)
  c.teachers = (config.teacher_fields(d_model=96, num_heads=4, num_layers=2, weight=0.7),)
  c.distill.hidden.teacher = 1
  obj = objective.make_objective(c)
  assert [p.d_out for p in obj.projections] == [96] * len(obj.projections)
  hidden = next(t for t in obj.terms if t.name == "hidden")
  assert hidden.teacher_index == 1
  assert obj.teacher_request(0)["hidden_layers"] == ()
  assert obj.teacher_request(1)["hidden_layers"] == hidden.teacher.hidden
  run = run_lib.build_run(c, devices=jax.devices()[:1])
  metrics = run.step(sharding.shard_batch(next(run.data_iter), run.mesh))
  assert np.isfinite(float(metrics["distill/hidden"]))
  single = run_lib.build_run(_run_cfg("probs", False, 1), devices=jax.devices()[:1], data=False)
  assert run.flops.teacher > single.flops.teacher


@pytest.mark.parametrize(
  "change,key",
  [
    (lambda c: setattr(c.distill, "fused", True), "distill.ensemble"),
    (lambda c: setattr(c.distill, "ensemble", "median"), "distill.ensemble"),
    (lambda c: setattr(c.distill.hidden, "teacher", 2), "distill.hidden.teacher"),
    (
      lambda c: setattr(c, "teachers", (config.teacher_fields(source="cache"),)),
      "teachers[0].source",
    ),
    (lambda c: setattr(c, "teachers", (dict(d_modle=3),)), "teachers[0].d_modle"),
    (
      lambda c: setattr(c, "teachers", (config.teacher_fields(vocab_size=512),)),
      "teachers[0].vocab_size",
    ),
    (lambda c: setattr(c, "teachers", (config.teacher_fields(weight=-1.0),)), "teachers[0].weight"),
    (lambda c: setattr(c, "teachers", (config.teacher_fields(max_len=8),)), "data.seq_len"),
    (
      lambda c: setattr(c, "teachers", (config.teacher_fields(policy="p=f32,c=f99"),)),
      "teachers[0].policy",
    ),
    (lambda c: setattr(c.teacher, "source", "cache"), "teachers"),
  ],
)
def test_bad_ensembles_name_the_key(change, key):
  c = _run_cfg("probs", False, 2)
  change(c)
  with pytest.raises(ConfigError) as e:
    validate.validate(c)
  assert e.value.key == key, str(e.value)


def test_a_further_teachers_mesh_error_names_it():
  c = _run_cfg("probs", False, 2)
  c.teachers = (config.teacher_fields(num_heads=3, d_model=96),)
  with pytest.raises(ConfigError, match=r"teachers\[0\]\.num_heads"):
    validate.check_mesh(c, {"data": 1, "fsdp": 1, "tensor": 2})


def test_given_teacher_variables_must_be_one_per_teacher():
  one = run_lib.build_run(_run_cfg("probs", False, 1), devices=jax.devices()[:1], data=False)
  with pytest.raises(JaxdistillError, match="tuple of 2"):
    run_lib.build_run(
      _run_cfg("probs", False, 2),
      devices=jax.devices()[:1],
      teacher_vars=one.teacher_vars,
      data=False,
    )


# --- Precomputed ensemble targets ---------------------------------------------------------


@pytest.mark.slow
def test_precompute_stores_the_mixtures_top_k(tmp_path):
  """The cache of two teachers holds the top-k of sum_k w_k softmax(z_k / tau) (float64
  NumPy from each teacher's logits), records both teachers, and trains a student."""
  from array_record.python import array_record_module

  from jaxdistill import models
  from jaxdistill.data import cached
  from jaxdistill.precompute import text as precompute

  c = config.default_config()
  small = dict(vocab_size=64, num_layers=1, num_heads=2, d_ff=64, max_len=16)
  c.student.update(d_model=16, **small)
  c.teacher.update(d_model=32, weight=1.0, **small)
  c.teachers = (config.teacher_fields(d_model=48, weight=3.0, **small),)
  c.distill.update(temperature=2.0, ensemble="probs")
  c.distill.logit.kind = "topk_tail"
  c.data.update(batch_size=8, seq_len=16)
  c.precompute.update(targets="topk", k=8, logprob_dtype="f32", rows=8, rows_per_shard=8)
  c.log.progress = False
  validate.validate(c)
  out = tmp_path / "cache"
  teacher = precompute.build_teacher(c, str(out), devices=jax.devices()[:1])
  precompute.run(c, str(out), teacher=teacher)
  manifest = cached.read_manifest(str(out))
  assert manifest["teacher"]["ensemble"] == "probs"
  assert manifest["teacher"]["weights"] == [0.25, 0.75]
  assert len(manifest["teacher"]["teachers"]) == 2
  reader = array_record_module.ArrayRecordReader(cached.shard_path(str(out), 0))
  layout = cached.Layout(**manifest["layout"])
  records = [cached.decode(layout, r) for r in reader.read_all()]
  reader.close()
  batch = precompute._host_batch(list(precompute.row_stream(c)), 8)
  p = 0.0
  for k, params in enumerate(teacher.params):
    section = config.teachers_of(c)[k]
    model = models.build(section, precision.parse_policy(section.policy), "t")
    forward = jax.jit(lambda p, b, m=model: models.apply(m, {"params": p}, b)["logits"])
    z = np.asarray(forward(params, batch), np.float64)  # one program, not op by op
    p = p + (0.25, 0.75)[k] * _softmax(z / 2.0)
  logp = np.log(p)
  for i, record in enumerate(records):
    ids = record["teacher_topk_ids"]
    want = np.take_along_axis(logp[i], ids, -1)
    np.testing.assert_allclose(record["teacher_topk_logp"], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(want[:, 0], logp[i].max(-1), rtol=1e-6)  # the top entry
  student = c.copy_and_resolve_references()
  student.teacher.update(source="cache", path=str(out))
  student.teachers = ()
  student.optim.steps = 1
  run = run_lib.build_run(student, devices=jax.devices()[:1])
  metrics = run.step(sharding.shard_batch(next(run.data_iter), run.mesh))
  assert np.isfinite(float(metrics["distill/topk_tail"]))


def test_precompute_refuses_a_losses_ensemble():
  from jaxdistill.precompute import text as precompute

  c = _run_cfg("losses", True, 2)
  with pytest.raises(ConfigError, match="distill.ensemble"):
    precompute.check_config(c)


@pytest.mark.slow
def test_ensemble_config_pretrains_both_teachers_and_resumes(tmp_path):
  """`jaxdistill train --config configs/ensemble.py:test`: teacher 0 in W/teacher, teacher 1
  in W/teacher_1 (its own seed, so the two differ), the student distilled from both; a rerun
  trains nothing again."""
  import json

  from conftest import ROOT

  from jaxdistill.cli import commands as cli

  workdir = tmp_path / "ensemble"
  argv = ["train", "--config", f"{ROOT}/configs/ensemble.py:test", "--workdir", str(workdir)]
  # One-block teachers (the recipe's have 2): compiling their steps is most of the test's time.
  argv += ["--config.teacher.num_layers=1", "--config.teachers[0].num_layers=1"]
  assert cli.main(argv) == 0
  for name in ("teacher", "teacher_1"):
    assert (workdir / name / "final_params").is_dir()
  losses = [
    json.loads((workdir / name / "summary.json").read_text())["final_loss"]
    for name in ("teacher", "teacher_1")
  ]
  assert losses[0] != losses[1]  # two seeds, two teachers
  summary = json.loads((workdir / "summary.json").read_text())
  one = json.loads((workdir / "teacher" / "summary.json").read_text())["student_params"]
  assert summary["teacher_params"] == 2 * one
  assert cli.main(argv) == 0  # finished: resumes at the end, retrains neither teacher


@pytest.mark.slow
def test_image_classifier_ensemble_runs_and_names_feature_teachers():
  """Two ResNet teachers (BatchNorm, inference mode) of different widths: "probs" over class
  logits, the feature map read from teacher 1 through a projection to its channels."""
  from conftest import ROOT

  from jaxdistill.config import load_config

  c = load_config(str(ROOT / "configs" / "smoke_vision.py"))
  c.optim.steps, c.mesh.data = 2, 1
  c.teacher.depth = 8  # ResNet-8 (the smallest) instead of the smoke config's ResNet-14
  image = dict(num_classes=10, image_size=16, image_channels=3)
  c.teachers = (config.teacher_fields(source="random", arch="wrn", depth=10, widen=2, **image),)
  c.distill.feature_map.teacher = 1
  validate.validate(c)
  obj = objective.make_objective(c)
  widths = {p.d_out for p in obj.projections}
  assert widths == {128}, widths  # teacher 1's last stage: 64 channels x widen 2 (WRN-10-2)
  # Variables filled on the host (BatchNorm means 0, variances 1): the random inits of three
  # ResNets would be most of the test's compiles; the step and its losses are what is tested.
  from testing import host_variables

  from jaxdistill.train import teacher as teacher_lib

  teachers = tuple(
    host_variables(run_lib.model_of(teacher_lib.view(c, k), "teacher"), seed=k) for k in (0, 1)
  )
  student = host_variables(run_lib.model_of(c, "student"), seed=2)
  run = run_lib.build_run(c, devices=jax.devices()[:1], student_vars=student, teacher_vars=teachers)
  metrics = run.step(sharding.shard_batch(next(run.data_iter), run.mesh))
  assert all(np.isfinite(float(metrics[k])) for k in ("distill/kl", "distill/feature_map"))
