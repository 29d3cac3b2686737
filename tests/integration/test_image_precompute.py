"""Precomputed class logits of image classifiers (jaxdistill/precompute/images.py,
data/cached_images.py): the stored logits are the teacher's inference-mode forward on the
un-augmented images, a student trained from them matches one trained with the online teacher
on the same batches, byte-identical resume, --verify, the CLI, and bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
import testing

from jaxdistill import data as data_lib
from jaxdistill import models
from jaxdistill.cli import commands as cli
from jaxdistill.config import default_config, validate
from jaxdistill.data import cache_writer, cached, cached_images, image_sources
from jaxdistill.distill import objective
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.evaluation import evaluate
from jaxdistill.parallel import precision, sharding
from jaxdistill.precompute import images as precompute_images
from jaxdistill.precompute import text as precompute
from jaxdistill.train import loop

# 3 synthetic classes: 3,000 training images of 8x8x3; shards of 1024, 1024, 952.
IMAGE = dict(num_classes=3, image_size=8, image_channels=3)
SHARDS = [1024, 1024, 952]
CONFIG_FILE = """
from jaxdistill.config import default_config


def get_config():
  cfg = default_config()
  image = dict(num_classes=3, image_size=8, image_channels=3)
  cfg.student.update(arch="cnn", cnn_channels="4,8", cnn_fc=16, **image)
  cfg.teacher.update(source="random", arch="cnn", cnn_channels="8,16", cnn_fc=32, **image)
  cfg.distill.temperature = 2.0
  cfg.distill.logit.update(kind="kl", weight=0.5)
  cfg.distill.ce.weight = 0.5
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(source="synthetic", batch_size=32, num_threads=1, prefetch=0)
  cfg.precompute.update(logprob_dtype="f32", rows_per_shard=1024)
  cfg.log.progress = False
  return cfg
"""


def _config(cache_dir, tmp_path=None):
  """The CNN pair of CONFIG_FILE (a random teacher), images built under ``cache_dir``."""
  cfg = default_config()
  cfg.student.update(arch="cnn", cnn_channels="4,8", cnn_fc=16, **IMAGE)
  cfg.teacher.update(source="random", arch="cnn", cnn_channels="8,16", cnn_fc=32, **IMAGE)
  cfg.distill.temperature = 2.0
  cfg.distill.logit.update(kind="kl", weight=0.5)
  cfg.distill.ce.weight = 0.5
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(source="synthetic", batch_size=32, num_threads=1, prefetch=0)
  cfg.precompute.update(logprob_dtype="f32", rows_per_shard=1024)
  cfg.log.progress = False
  cfg.cache_dir = cache_dir
  validate.validate(cfg)
  return cfg


def _from_cache(cfg, path, **changes):
  c = cfg.copy_and_resolve_references()
  c.teacher.update(source="cache", path=str(path))
  for key, value in changes.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _teacher_forward(cfg, variables, inputs_NxHxWxC, train=False):
  """The teacher model's logits [N, C] on already normalised inputs, in batches of 500 (not
  precompute's 32: the comparison does not depend on the batch composition)."""
  model = models.build(cfg.teacher, precision.parse_policy(cfg.teacher.policy, "t"), "teacher")
  fn = jax.jit(lambda v, x: models.apply(model, v, {"inputs": x}, train=train)["logits"])
  n = len(inputs_NxHxWxC)
  return np.concatenate(
    [np.asarray(fn(variables, inputs_NxHxWxC[i : i + 500])) for i in range(0, n, 500)]
  )


def _normalised_training_images(cfg):
  """Every training image, normalised here by hand: (x / 255 - 0.5) / 0.5."""
  examples, _ = image_sources.open_images(cfg, "train", cfg.cache_dir)
  images, _ = image_sources.gather(examples, np.arange(len(examples)))
  return ((images.astype(np.float64) / 255.0 - 0.5) / 0.5).astype(np.float32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  cfg = _config(str(tmp_path_factory.mktemp("data")))
  out = tmp_path_factory.mktemp("logits")
  # Compiled once, shared by the tests; a 2-device mesh shards the teacher's rows.
  teacher = precompute_images.build_teacher(cfg, str(out), devices=jax.devices()[:2])
  result = precompute.run(cfg, str(out), teacher=teacher)
  assert result["complete"] and result["rows"] == 3000 and result["computed_rows"] == 3000
  return cfg, out, teacher


def _files(path):
  return {n: (path / n).read_bytes() for n in sorted(os.listdir(path)) if n != "teacher"}


def test_stored_logits_are_the_teachers_forward_on_unaugmented_images(cache):
  cfg, out, teacher = cache
  manifest = cached_images.read_manifest(str(out))
  assert manifest["kind"] == "image_logits" and manifest["num_classes"] == 3
  assert manifest["dtype"] == "float32" and manifest["rows"] == 3000
  assert [s["records"] for s in manifest["shards"]] == SHARDS
  assert (
    manifest["dataset"]["num_examples"] == 3000 and manifest["dataset"]["source"] == "synthetic"
  )
  assert os.path.getsize(cached_images.shard_path(str(out), 2)) == 952 * 3 * 4
  stored = cached_images.TeacherLogits(str(out), manifest).logits_NxC
  want = _teacher_forward(cfg, jax.device_get(teacher.variables), _normalised_training_images(cfg))
  np.testing.assert_allclose(
    stored.astype(np.float64), want.astype(np.float64), rtol=1e-5, atol=1e-5
  )
  # Not a constant: the examples' logits differ (a wrong gather above would be caught).
  assert np.abs(stored - stored.mean(axis=0)).mean() > 1e-2


def test_f16_storage_and_other_settings_in_the_same_output_are_refused(cache, tmp_path):
  cfg, out, teacher = cache
  c = cfg.copy_and_resolve_references()
  c.precompute.logprob_dtype = "f16"
  result = precompute.run(c, str(tmp_path / "f16"), teacher=teacher)
  assert result["complete"]
  manifest = cached_images.read_manifest(str(tmp_path / "f16"))
  assert manifest["dtype"] == "float16"
  assert os.path.getsize(cached_images.shard_path(str(tmp_path / "f16"), 0)) == 1024 * 3 * 2
  half = cached_images.TeacherLogits(str(tmp_path / "f16"), manifest).logits_NxC
  full = cached_images.TeacherLogits(str(out), cached_images.read_manifest(str(out))).logits_NxC
  np.testing.assert_array_equal(half, full.astype(np.float16))
  with pytest.raises(JaxdistillError, match=r"differ in \['dtype', 'logits_dtype'\]"):
    precompute.run(c, str(out), teacher=teacher)


def test_precompute_resumes_byte_identically_and_skips_finished_shards(cache, tmp_path):
  cfg, out, teacher = cache
  copy = tmp_path / "cache"
  shutil.copytree(out, copy)
  before = _files(copy)
  os.remove(cached_images.shard_path(str(copy), 1))  # killed while writing shard 1
  os.remove(os.path.join(copy, "shard-00001.json"))
  os.remove(os.path.join(copy, "manifest.json"))
  (copy / "shard-00001.logits.partial").write_bytes(b"half a shard")
  with pytest.raises(ConfigError, match="manifest.json"):
    cached_images.read_manifest(str(copy))
  result = precompute.run(cfg, str(copy), teacher=teacher)
  assert result["complete"] and result["computed_rows"] == 1024
  assert _files(copy) == before
  # The other half of two processes' work: nothing left to compute.
  assert precompute.run(cfg, str(copy), teacher=teacher, process=(1, 2))["computed_rows"] == 0


def test_verify_and_the_cli_messages(cache, tmp_path, capsys):
  cfg, out, _ = cache
  copy = tmp_path / "cache"
  shutil.copytree(out, copy)
  assert cli.main(["precompute", "--output", str(copy), "--verify"]) == 0
  assert "ok: 3 shards, 3000 rows" in capsys.readouterr().out
  path = cached_images.shard_path(str(copy), 2)
  data = bytearray(open(path, "rb").read())
  data[7] ^= 1
  open(path, "wb").write(bytes(data))
  assert cli.main(["precompute", "--output", str(copy), "--verify"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert (
    len(err) == 1 and err[0].startswith("error: ") and "shard-00002.logits has sha256" in err[0]
  )
  # A shard cut short (with a manifest that believes it): not a whole number of rows.
  with open(path, "wb") as f:
    f.write(bytes(data[:-2]))
  manifest = json.loads((copy / "manifest.json").read_text())
  manifest["shards"][2]["sha256"] = cached.sha256_file(path)
  (copy / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(JaxdistillError, match="no whole number of rows"):
    cache_writer.verify(str(copy))


@pytest.mark.slow
def test_cli_precompute_then_train_from_the_cache(tmp_path, capsys):
  config = tmp_path / "cnn.py"
  config.write_text(CONFIG_FILE)
  common = ["--config", str(config), f"--config.cache_dir={tmp_path / 'data'}"]
  common.append("--config.log.every=1")
  out = str(tmp_path / "logits")
  assert cli.main(["precompute", *common, "--output", out]) == 0
  assert "done: 3000 rows in 3 shard(s)" in capsys.readouterr().out
  assert cli.main(["precompute", *common, "--output", out]) == 0
  assert "nothing to compute" in capsys.readouterr().out
  cache = ["--config.teacher.source=cache", f"--config.teacher.path={out}"]
  workdir = str(tmp_path / "run")
  assert cli.main(["train", *common, *cache, "--workdir", workdir]) == 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
  assert all("distill/kl" in r for r in rows if "train/loss" in r)
  # Augmentation with a cache: one line naming the key, nothing written.
  bad = str(tmp_path / "bad")
  assert cli.main(["train", *common, *cache, "--config.data.flip=True", "--workdir", bad]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: data.flip") and not os.path.exists(bad)


@pytest.mark.slow  # builds and compiles a whole run
def test_student_from_the_cache_matches_the_online_teacher(cache):
  cfg, out, teacher = cache
  online, from_cache = cfg.copy_and_resolve_references(), _from_cache(cfg, out)
  validate.validate(from_cache)
  obj = objective.make_objective(from_cache)
  assert not obj.uses_teacher and [t.name for t in obj.terms] == ["dense"]
  # The same rows, and the stored logits of each row's example (the stream's shuffled order,
  # not the position: example indices are gathered).
  a, b = data_lib.make_iterator(online), data_lib.make_iterator(from_cache)
  variables = jax.device_get(teacher.variables)
  for _ in range(2):
    x, y = next(a), next(b)
    assert set(y) == set(x) | {"teacher_logits"}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
    want = _teacher_forward(cfg, variables, x["inputs"])
    np.testing.assert_allclose(y["teacher_logits"], want, rtol=1e-5, atol=1e-5)
  histories = []
  for c, given in ((online, variables), (from_cache, None)):  # the fixture's teacher, not a new one
    run = loop.build_run(c, devices=jax.devices()[:1], teacher_vars=given)
    history = []
    loop.run_steps(run, 3, lambda step, m, s: history.append(jax.device_get(m)))
    histories.append((history, jax.device_get(run.state.params["student"])))
  (h_online, p_online), (h_cache, p_cache) = histories
  for step, (m1, m2) in enumerate(zip(h_online, h_cache)):
    for key in ("train/loss", "task/ce", "distill/kl"):
      np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, err_msg=f"step {step + 1} {key}")
  assert h_cache[0]["distill/kl"] > 1e-3  # the KL term is live, not trivially equal
  for x1, x2 in zip(jax.tree.leaves(p_online), jax.tree.leaves(p_cache)):
    np.testing.assert_allclose(x2, x1, rtol=1e-4, atol=1e-5)


def test_iterator_with_a_cache_resumes_exactly(cache):
  cfg, out, _ = cache
  c = _from_cache(cfg, out)
  it = data_lib.make_iterator(c)
  next(it), next(it)
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = data_lib.make_iterator(c)
  again.set_state(json.loads(json.dumps(state)))
  for x, y in zip(want, [next(again) for _ in range(2)]):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize(
  "key,value", [("crop_padding", 2), ("flip", True), ("mixup", 0.2), ("cutmix", 1.0)]
)
def test_augmentation_with_a_cache_is_refused(cache, key, value):
  cfg, out, _ = cache
  with pytest.raises(ConfigError, match=f"^data.{key}: .*un-augmented"):
    validate.validate(_from_cache(cfg, out, **{f"data__{key}": value}))


def test_logit_kinds_and_feature_losses_with_an_image_cache(cache, tmp_path):
  cfg, out, _ = cache
  # Raw logits: any temperature (the cache was made with distill.temperature 2).
  validate.validate(_from_cache(cfg, out, distill__temperature=1.0))
  for kind in ("kl", "reverse_kl", "jsd"):
    c = _from_cache(cfg, out)
    c.distill.logit.kind = kind
    validate.validate(c)
  c = _from_cache(cfg, out)
  c.distill.logit.kind = "topk_tail"
  with pytest.raises(ConfigError, match="^distill.logit.kind: an image model's cache"):
    validate.validate(c)
  c = _from_cache(cfg, out)
  c.distill.logit.weight = 0.0
  with pytest.raises(ConfigError, match="^distill.logit.kind"):
    validate.validate(c)
  for section in ("attention_transfer", "feature_map"):
    c = _from_cache(cfg, out)
    c.distill[section].weight = 1.0
    with pytest.raises(ConfigError, match=f"^distill.{section}.weight: .*no teacher feature maps"):
      validate.validate(c)
  # A language model's cache still needs a sparse kind.
  lm = default_config()
  lm.teacher.update(source="cache", path=str(tmp_path))
  lm.distill.logit.update(kind="kl", weight=1.0)
  for key in ("attention", "hidden"):
    lm.distill[key].weight = 0.0
  lm.distill.attention.value_weight = 0.0
  with pytest.raises(ConfigError, match="^distill.logit.kind: a cache needs a sparse kind"):
    validate.validate(lm)


def test_a_cache_of_other_data_or_classes_is_refused(cache, tmp_path):
  cfg, out, _ = cache
  other_images = _from_cache(cfg, out)
  other_images.seed = 7  # synthetic images are drawn from the seed: same count, other pixels
  with pytest.raises(ConfigError, match="^teacher.path: .*other training images.*probe_sha256"):
    data_lib.check(other_images)
  four = _from_cache(cfg, out)
  four.student.num_classes = 4  # synthetic data of 4 classes: 4,000 images
  validate.validate(four)
  with pytest.raises(
    ConfigError, match="^student.num_classes: the cache .* has 3 but this config 4"
  ):
    data_lib.check(four)
  with pytest.raises(ConfigError, match="^student.num_classes"):
    data_lib.make_iterator(four)
  # A language model's cache for an image model, and the other way round.
  lm_cache = tmp_path / "lm"
  lm_cache.mkdir()
  (lm_cache / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": []}))
  with pytest.raises(ConfigError, match="^teacher.path: .*language model's token targets"):
    data_lib.check(_from_cache(cfg, lm_cache))
  lm = default_config()
  lm.student.update(testing.TINY_LM)
  lm.teacher.update(source="cache", path=str(out))
  lm.distill.logit.update(kind="topk_tail", weight=1.0)
  lm.data.update(batch_size=8, seq_len=16)
  with pytest.raises(ConfigError, match="^teacher.path: .*class logits"):
    data_lib.check(lm)


def test_precompute_keys_that_do_not_apply_to_images(cache, tmp_path):
  cfg, _, teacher = cache
  for key, value in (("temperature", 2.0), ("rows", 100)):
    c = cfg.copy_and_resolve_references()
    c.precompute[key] = value
    with pytest.raises(ConfigError, match=f"^precompute.{key}: must be 0 for an image model"):
      precompute.run(c, str(tmp_path / key), teacher=teacher)
    assert not (tmp_path / key).exists()
  c = cfg.copy_and_resolve_references()
  c.teacher.source = "none"
  with pytest.raises(ConfigError, match="^teacher.source"):
    precompute.run(c, str(tmp_path / "none"))


@pytest.mark.slow
def test_batchnorm_teacher_from_a_workdir_runs_in_inference_mode(tmp_path):
  """A ResNet teacher trained for 2 steps: its final_params hold {params, batch_stats}; the
  stored logits are its forward by the running statistics, not by each batch's."""
  cfg = _config(str(tmp_path / "data"))
  shape = dict(arch="resnet", depth=8, **IMAGE)
  teacher_run = cfg.copy_and_resolve_references()
  teacher_run.student.update(**shape)
  teacher_run.teacher.source = "none"
  teacher_run.distill.logit.weight = 0.0
  teacher_run.optim.steps = 2
  loop.train(teacher_run, str(tmp_path / "teacher"), devices=jax.devices()[:1])
  cfg.teacher.update(source="workdir", path=str(tmp_path / "teacher"), **shape)
  validate.validate(cfg)
  out = tmp_path / "logits"
  assert precompute.run(cfg, str(out), devices=jax.devices()[:2])["complete"]
  manifest = cached_images.read_manifest(str(out))
  assert manifest["teacher"]["source"] == "workdir" and "sha256" in manifest["teacher"]
  stored = cached_images.TeacherLogits(str(out), manifest).logits_NxC
  model = models.build(cfg.teacher, precision.parse_policy(cfg.teacher.policy, "t"), "teacher")
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  variables, _ = evaluate.load_variables(
    model, str(tmp_path / "teacher" / "final_params"), mesh, cfg.data.seq_len
  )
  assert set(variables) == {"params", "batch_stats"}
  variables = jax.device_get(variables)
  inputs = _normalised_training_images(cfg)
  want = _teacher_forward(cfg, variables, inputs)
  np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-4)
  by_batch = _teacher_forward(cfg, variables, inputs, train=True)
  assert np.abs(by_batch - want).max() > 1e-2  # the test can tell the two modes apart
