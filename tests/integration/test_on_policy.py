"""On-policy distillation (distill.on_policy): the rows the step builds, the step against a hand-
assembled token-KD step, mesh invariance of the samples, the step's time split, a resumed run
against an uninterrupted one, and the config's refusals."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testing

from jaxdistill.config import validate
from jaxdistill.errors import ConfigError
from jaxdistill.generate import Sampler
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.train import on_policy
from jaxdistill.train import run as run_lib


def test_rows_keep_the_prompt_and_weigh_only_sampled_tokens():
  # Row 0: a prompt of 2 (its first weighted target is at position 1); row 1: no weights (1).
  batch = {
    "inputs": jnp.array([[5, 6, 7, 8, 9, 4], [3, 3, 3, 3, 3, 3]], jnp.int32),
    "targets": jnp.array([[6, 7, 8, 9, 4, 0], [3, 3, 3, 3, 3, 0]], jnp.int32),
    "weights": jnp.array([[0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]], jnp.float32),
    "segment_ids": jnp.ones((2, 6), jnp.int32),
    "positions": jnp.zeros((2, 6), jnp.int32),
  }
  lengths = on_policy.prompt_lengths(batch, 0)
  np.testing.assert_array_equal(lengths, [2, 1])
  np.testing.assert_array_equal(on_policy.prompt_lengths(batch, 9), [5, 5])  # at most T - 1
  sampled = jnp.array([[11, 12, 13], [21, 22, 23]], jnp.int32)
  out = on_policy.assemble(batch, lengths, sampled, jnp.array([2, 3], jnp.int32))
  np.testing.assert_array_equal(out["inputs"], [[5, 6, 11, 12, 0, 0], [3, 21, 22, 23, 0, 0]])
  np.testing.assert_array_equal(out["targets"], [[6, 11, 12, 0, 0, 0], [21, 22, 23, 0, 0, 0]])
  # Only targets that are sampled tokens carry loss: never a prompt token.
  np.testing.assert_array_equal(out["weights"], [[0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(out["positions"], [list(range(6))] * 2)
  assert all(out[k].dtype == batch[k].dtype for k in batch)
  # A sample running past the row's T positions is cut: the last target is its 5th token.
  long = on_policy.assemble(
    batch, jnp.array([2, 1]), jnp.arange(10)[None].repeat(2, 0) + 40, jnp.array([5, 5])
  )
  np.testing.assert_array_equal(long["targets"][0], [6, 40, 41, 42, 43, 44])
  np.testing.assert_array_equal(long["weights"][0], [0, 1, 1, 1, 1, 1])


def _config(**on_policy_keys):
  cfg = testing.tiny_config()
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.distill.logit.kind = "jsd"
  cfg.distill.on_policy.update(lmbda=1.0, max_new_tokens=6, prompt_tokens=4, **on_policy_keys)
  return cfg


def _build(cfg, devices=None):
  student = run_lib.model_of(cfg, "student")
  teacher = run_lib.model_of(cfg, "teacher")
  return run_lib.build_run(
    cfg,
    devices=devices or jax.devices()[:1],
    student_vars=testing.host_variables(student, 0),
    teacher_vars=testing.host_variables(teacher, 1),
    data=False,
  )


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  inputs = rng.integers(1, cfg.student.vocab_size, (b, t)).astype(np.int32)
  return {
    "inputs": inputs,
    "targets": np.roll(inputs, -1, axis=1),
    "weights": np.ones((b, t), np.float32),
    "segment_ids": np.ones((b, t), np.int32),
    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
  }


@pytest.mark.slow
def test_greedy_on_policy_step_is_the_kd_step_on_the_students_own_rows():
  # temperature 0: the step's samples are the student's greedy continuations, which the
  # Sampler gives independently; the KD step (lmbda 0) on rows assembled from them by hand
  # must then train exactly as the on-policy step.
  cfg = _config(temperature=0.0)
  cfg.optim.warmup_steps = 0  # the update is not zero: the params below compare real steps
  run = _build(cfg)
  batch = _batch(cfg)
  student_vars = {"params": jax.device_get(run.state.params["student"])}
  sampler = Sampler(run.student, student_vars)
  prompts = [row[:4].tolist() for row in batch["inputs"]]
  done = sampler.generate(prompts, max_new_tokens=6, stop_tokens=())
  tokens = np.array([c.token_ids for c in done], np.int32)
  mesh = run.mesh
  on = run.step(sharding_lib.shard_batch(batch, mesh))
  assert float(on["on_policy/sampled"]) == 1.0 and float(on["on_policy/new_tokens"]) == 6.0

  kd_cfg = cfg.copy_and_resolve_references()
  kd_cfg.distill.on_policy.lmbda = 0.0
  kd = _build(kd_cfg)
  hand = on_policy.assemble(
    {k: jnp.asarray(v) for k, v in batch.items()},
    jnp.full((len(prompts),), 4, jnp.int32),
    jnp.asarray(tokens),
    jnp.full((len(prompts),), 6, jnp.int32),
  )
  off = kd.step(sharding_lib.shard_batch(jax.device_get(hand), kd.mesh))
  assert "on_policy/sampled" not in off
  for key in ("train/loss", "distill/jsd", "task/ce", "train/grad_norm"):
    np.testing.assert_allclose(float(on[key]), float(off[key]), rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(kd.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _samples(cfg, mesh_shape):
  data, fsdp, tensor = mesh_shape
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
  run = _build(cfg, jax.devices()[: data * fsdp * tensor])
  rewrite = on_policy.make(run.student, cfg.distill.on_policy, (), cfg.seed)
  student_vars = {"params": run.state.params["student"]}
  batch = sharding_lib.shard_batch(_batch(cfg), run.mesh)
  with sharding_lib.rules_context(run.mesh):
    out, _ = jax.jit(rewrite)(student_vars, batch, jnp.int32(3))
  return jax.device_get(out)


@pytest.mark.slow
def test_samples_do_not_depend_on_the_mesh():
  cfg = _config(temperature=1.0)
  one = _samples(cfg, (8, 1, 1))
  other = _samples(cfg, (4, 1, 2))
  for key in ("inputs", "targets", "weights"):
    np.testing.assert_array_equal(one[key], other[key], err_msg=key)
  assert one["weights"].sum() == 6 * cfg.data.batch_size  # every row sampled its 6 tokens


@pytest.mark.slow
def test_sampled_token_reverse_kl_trains_the_student_only_on_its_samples():
  cfg = _config(temperature=1.0)
  cfg.distill.logit.kind = "sampled_reverse_kl"
  cfg.distill.ce.weight = 0.0
  cfg.optim.warmup_steps = 0  # step 0 trains at the full learning rate
  run = _build(cfg)
  before = jax.device_get(run.state.params["student"])
  metrics = run.step(sharding_lib.shard_batch(_batch(cfg), run.mesh))
  assert np.isfinite(float(metrics["distill/sampled_reverse_kl"]))
  assert float(metrics["perf/valid_tokens"]) == 6 * cfg.data.batch_size
  assert float(metrics["train/grad_norm"]) > 0
  after = jax.device_get(run.state.params["student"])
  moved = [
    not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))
  ]
  assert any(moved)


@pytest.mark.slow
def test_the_baseline_and_clip_reach_the_step():
  """distill.on_policy.baseline / signal_clip shape the sampled-token signal inside the step:
  its rms shrinks with the batch baseline and stays within the clip."""
  rms = {}
  for baseline, clip in (("none", 0.0), ("batch", 0.0), ("batch", 0.05)):
    cfg = _config(temperature=1.0, baseline=baseline, signal_clip=clip)
    cfg.distill.logit.kind = "sampled_reverse_kl"
    cfg.distill.ce.weight = 0.0
    run = _build(cfg)
    metrics = run.step(sharding_lib.shard_batch(_batch(cfg), run.mesh))
    rms[baseline, clip] = float(metrics["distill/sampled_reverse_kl_signal_rms"])
  assert rms["batch", 0.0] < rms["none", 0.0]
  assert 0 < rms["batch", 0.05] <= 0.05 + 1e-6


def test_split_shares_sum_to_one_and_update_is_the_rest():
  out = on_policy.split_shares(0.2, 0.1, 0.5)
  assert out["perf/split_step_s"] == 0.5
  np.testing.assert_allclose(out["perf/split_update_s"], 0.2)
  np.testing.assert_allclose(
    [out[f"perf/split_{p}"] for p in on_policy.SPLIT_PARTS], [0.4, 0.2, 0.4]
  )
  # Clock noise: a step timed faster than its parts leaves no negative update.
  noisy = on_policy.split_shares(0.3, 0.3, 0.5)
  assert noisy["perf/split_update_s"] == 0.0
  assert sum(noisy[f"perf/split_{p}"] for p in on_policy.SPLIT_PARTS) == pytest.approx(1.0)


@pytest.mark.slow
def test_time_split_of_a_run_leaves_its_state_alone():
  cfg = _config(temperature=1.0)
  cfg.distill.on_policy.lmbda = 0.5
  run = _build(cfg)
  batch = sharding_lib.shard_batch(_batch(cfg), run.mesh)
  host = lambda s: jax.device_get((s.params, s.opt_state, s.step, jax.random.key_data(s.rng)))
  before = host(run.state)
  split = on_policy.time_split(run, batch, repeats=2)
  parts = [split[f"perf/split_{p}"] for p in on_policy.SPLIT_PARTS]
  assert all(0 <= share <= 1 for share in parts) and sum(parts) == pytest.approx(1.0)
  assert split["perf/split_sample_s"] > 0 and split["perf/split_teacher_s"] > 0
  assert split["perf/split_step_s"] > 0
  # The timed step ran on a donated copy: the run's own state is as it was.
  after = host(run.state)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


ROOT = pathlib.Path(__file__).resolve().parents[2]


def _rows(workdir, after=0):
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [
    {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows if r["step"] > after
  ]


@pytest.mark.slow
def test_resumed_on_policy_run_is_bitwise_the_uninterrupted_one(tmp_path):
  # configs/on_policy.py's GKD at its test size (lmbda 0.5, task rows, end-of-text stops), with
  # a random teacher (re-created alike on resume) instead of a pretrained one: 6 steps
  # uninterrupted, against a run resumed from the reference's step-3 checkpoint.
  from jaxdistill.config import load_config
  from jaxdistill.train import loop

  import orbax.checkpoint as ocp

  cfg = load_config(f"{ROOT}/configs/on_policy.py:gkd,test")
  cfg.teacher.source = "random"
  cfg.optim.update(steps=6, warmup_steps=1)
  cfg.eval.every = 0
  cfg.log.update(every=1, progress=False)
  cfg.ckpt.update(every=3, async_save=False)
  cfg.distill.on_policy.time_split = 1
  coins = [bool(on_policy.samples_at(cfg.seed, cfg.distill.on_policy.lmbda, s)) for s in range(6)]
  assert any(coins[:3]) and any(coins[3:]), coins  # both halves sample
  ref, resumed = tmp_path / "ref", tmp_path / "resumed"
  summary = loop.train(cfg, str(ref))
  loop.train(cfg, str(resumed), resume_from=str(ref / "checkpoints" / "3"))
  assert _rows(resumed) == _rows(ref, after=3) and len(_rows(ref)) == 6
  sampled = [r["on_policy/sampled"] for r in _rows(ref)]
  assert sampled == [float(c) for c in coins]
  with ocp.StandardCheckpointer() as ckptr:
    a = ckptr.restore(str(resumed / "final_params"))
    b = ckptr.restore(str(ref / "final_params"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The step's time split is in the run's logged throughput: every row, and the summary.
  first = json.loads((ref / "metrics.jsonl").read_text().splitlines()[0])
  shares = [first[f"perf/split_{p}"] for p in on_policy.SPLIT_PARTS]
  assert sum(shares) == pytest.approx(1.0) and first["perf/split_step_s"] > 0
  split = summary["on_policy_split"]
  assert sum(split[p] for p in on_policy.SPLIT_PARTS) == pytest.approx(1.0)
  assert {f"{p}_s" for p in on_policy.SPLIT_PARTS} < set(split)


@pytest.mark.parametrize(
  "change, key",
  [
    (dict(lmbda=1.5), "distill.on_policy.lmbda"),
    (dict(lmbda=-0.1), "distill.on_policy.lmbda"),
    (dict(max_new_tokens=0), "distill.on_policy.max_new_tokens"),
    (dict(prompt_tokens=16), "distill.on_policy.prompt_tokens"),
    (dict(time_split=-1), "distill.on_policy.time_split"),
    (dict(baseline="mean"), "distill.on_policy.baseline"),
    (dict(signal_clip=-1.0), "distill.on_policy.signal_clip"),
    (dict(kind="sampled_reverse_kl", lmbda=0.5), "distill.logit.kind"),
    (dict(encoder_teacher=True), "distill.on_policy.lmbda"),
    (dict(vocab=True), "teacher.vocab_size"),
    (dict(no_teacher=True), "distill.on_policy.lmbda"),
  ],
)
def test_bad_on_policy_settings_name_their_key(change, key):
  cfg = _config()
  change = dict(change)
  if change.pop("kind", None):
    cfg.distill.logit.kind = "sampled_reverse_kl"
  if change.pop("encoder_teacher", False):
    cfg.teacher.encoder = True
  if change.pop("vocab", False):
    cfg.teacher.vocab_size = cfg.student.vocab_size + 1
    cfg.distill.logit.weight = 0.0  # the logit check would name the vocabularies first
  if change.pop("no_teacher", False):
    cfg.teacher.source = "none"
    cfg.distill.update(logit=dict(kind="kl", weight=0.0, schedule="constant", beta=0.5))
  cfg.distill.on_policy.update(**change)
  with pytest.raises(ConfigError) as e:
    validate.validate(cfg)
  assert e.value.key == key, str(e.value)
