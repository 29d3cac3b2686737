"""TensorBoard event files (metrics.TensorBoardWriter and the loop's use of it), read back here
without TensorFlow: a TFRecord reader of this file's own (length, masked CRC-32C, data, masked
CRC-32C) parsing tensorboardX's Event protos."""

import glob
import math
import os
import struct

import jax
import numpy as np
import pytest

from jaxdistill.train import metrics as metrics_lib

# --- an independent reader ---------------------------------------------------------------


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path: str):
  """The records of a TFRecord file, both CRCs checked."""
  with open(path, "rb") as f:
    blob = f.read()
  at = 0
  while at < len(blob):
    header = blob[at : at + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", blob[at + 8 : at + 12])
    assert length_crc == _masked(header), f"bad length CRC in {path} at {at}"
    data = blob[at + 12 : at + 12 + length]
    (data_crc,) = struct.unpack("<I", blob[at + 12 + length : at + 16 + length])
    assert data_crc == _masked(data), f"bad data CRC in {path} at {at}"
    yield data
    at += 16 + length


def read_events(logdir: str):
  """(scalars {(tag, step): value}, images {(tag, step): Summary.Image}) of every event file."""
  from tensorboardX.proto.event_pb2 import Event

  scalars, images = {}, {}
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  assert files, f"no event files in {logdir}"
  for path in files:
    for record in _records(path):
      event = Event.FromString(record)
      for value in event.summary.value:
        if value.HasField("image"):
          images[(value.tag, event.step)] = value.image
        else:
          scalars[(value.tag, event.step)] = value.simple_value
  return scalars, images


def test_crc32c_known_answer():
  assert _crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


# --- the writer ------------------------------------------------------------------------------


def _png(tmp_path, width=40, height=30):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig = plt.figure(figsize=(width / 10, height / 10), dpi=10)
  path = str(tmp_path / "x.png")
  fig.savefig(path)
  plt.close(fig)
  return path


def test_writer_scalars_and_image(tmp_path):
  logdir = str(tmp_path / "tb")
  writer = metrics_lib.TensorBoardWriter(logdir)
  writer.write({"step": 1, "a": np.float32(0.25), "b": 3, "name": "text", "c": np.array(1.5)})
  writer.write({"step": 7, "a": jax.numpy.asarray(-2.0), "nan": float("nan")})
  png = _png(tmp_path)
  writer.add_image("curves/x", png, 7)
  writer.close()
  scalars, images = read_events(logdir)
  nan = scalars.pop(("nan", 7))
  assert math.isnan(nan)
  assert scalars == {("a", 1): 0.25, ("b", 1): 3.0, ("c", 1): 1.5, ("a", 7): -2.0}
  (key,) = images
  assert key == ("curves/x", 7)
  image = images[key]
  assert (image.width, image.height, image.colorspace) == (40, 30, 4)  # matplotlib: RGBA
  with open(png, "rb") as f:
    assert image.encoded_image_string == f.read()


def test_resumed_writer_purges_the_steps_it_rewrites(tmp_path):
  # A run resumed from step 4: TensorBoard drops the older files' events from step 5 on (a
  # SessionLog START at the purge step), as truncate_metrics drops metrics.jsonl's rows.
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  logdir = str(tmp_path / "tb")
  writer = metrics_lib.TensorBoardWriter(logdir, purge_step=5)
  writer.write({"step": 5, "a": 1.0})
  writer.close()
  (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  events = [Event.FromString(r) for r in _records(path)]
  starts = [e.step for e in events if e.session_log.status == SessionLog.START]
  assert starts == [5]


def test_png_size_reads_the_header(tmp_path):
  with open(_png(tmp_path, 50, 20), "rb") as f:
    assert metrics_lib.png_size(f.read()) == (50, 20, 4)
  with pytest.raises(ValueError, match="not a PNG"):
    metrics_lib.png_size(b"GIF89a" + bytes(40))


def test_plot_loss_curve(tmp_path):
  rows = [{"step": s, "train/loss": 4.0 / s} for s in range(1, 6)] + [{"step": 5, "eval/loss": 1}]
  path = str(tmp_path / "c.png")
  assert metrics_lib.plot_loss_curve(rows, path)
  with open(path, "rb") as f:
    assert metrics_lib.png_size(f.read())[:2] == (600, 400)
  assert not metrics_lib.plot_loss_curve([{"step": 1, "train/loss": "nan"}], str(tmp_path / "n"))
  assert not os.path.exists(tmp_path / "n")


def test_importing_metrics_does_not_import_tensorboardx():
  import subprocess
  import sys

  code = "import sys, jaxdistill.train.metrics; print('tensorboardX' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


# --- the loop ---------------------------------------------------------------------------------


def _train(cfg, workdir):
  from jaxdistill.train import loop

  cfg.distill.attention.update(weight=0.0, value_weight=0.0)  # KD + CE: a quicker compile
  cfg.distill.hidden.weight = 0.0
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.log.every = 1
  return loop.train(cfg, str(workdir), devices=jax.devices()[:1])


@pytest.mark.slow
def test_train_writes_the_metrics_rows_to_tensorboard(tiny_config, tmp_path):
  _train(tiny_config, tmp_path / "run")
  rows = metrics_lib.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3]
  scalars, images = read_events(str(tmp_path / "run" / "tensorboard"))
  expected = {
    (k, r["step"]): v
    for r in rows
    for k, v in r.items()
    if k != "step" and isinstance(v, (int, float))
  }
  assert len(expected) > 3 * 8  # losses, weights, perf, lr ... each step
  assert set(scalars) == set(expected)
  for key, value in expected.items():
    assert scalars[key] == np.float32(value), key
  assert list(images) == [("curves/loss", 3)]
  assert images[("curves/loss", 3)].encoded_image_string[:4] == b"\x89PNG"


@pytest.mark.slow
def test_tensorboard_off_writes_no_event_files(tiny_config, tmp_path):
  cfg = tiny_config
  cfg.teacher.source = "none"  # the smallest run: the student alone, one step
  cfg.distill.ce.weight, cfg.distill.logit.weight = 1.0, 0.0
  cfg.optim.steps = 1
  cfg.log.tensorboard = False
  _train(cfg, tmp_path / "run")
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
  assert not os.path.exists(tmp_path / "run" / "tensorboard")


def test_log_tensorboard_is_a_boolean(tiny_config):
  from jaxdistill import config
  from jaxdistill.config import validate
  from jaxdistill.errors import ConfigError

  assert config.default_config().log.tensorboard is True
  config.apply_override(tiny_config, "log.tensorboard", "false")
  assert tiny_config.log.tensorboard is False
  validate.validate(tiny_config)
  with tiny_config.log.ignore_type():
    tiny_config.log.tensorboard = "no"
  with pytest.raises(ConfigError, match="log.tensorboard: must be true or false"):
    validate.validate(tiny_config)
