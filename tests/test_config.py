"""Config loading, overrides and every user mistake -> a ConfigError naming the key."""

import pytest

from jaxdistill import config as config_lib
from jaxdistill.errors import ConfigError
from jaxdistill.sharding import mesh_shape

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
  cfg = config_lib.load_config(str(path))
  assert cfg.optim.steps > 0
  text = path.read_text()
  assert "jaxdistill train --config" in text.split('"""')[1], "config must open with its command"


def _load(tmp_path, overrides=(), body="cfg = default_config()"):
  path = tmp_path / "c.py"
  path.write_text(
    f"from jaxdistill.config import default_config\ndef get_config():\n  {body}\n  return cfg\n"
  )
  return config_lib.load_config(str(path), list(overrides))


def _error(tmp_path, overrides=(), body="cfg = default_config()") -> ConfigError:
  with pytest.raises(ConfigError) as info:
    _load(tmp_path, overrides, body)
  return info.value


def test_overrides_parse_to_the_field_type(tmp_path):
  cfg = _load(
    tmp_path,
    [
      ("distill.temperature", "3"),
      ("optim.steps", "7"),
      ("student.tie_embeddings", "false"),
      ("distill.logit.kind", "jsd"),
    ],
  )
  assert cfg.distill.temperature == 3.0 and isinstance(cfg.distill.temperature, float)
  assert cfg.optim.steps == 7 and cfg.student.tie_embeddings is False
  assert cfg.distill.logit.kind == "jsd"


@pytest.mark.parametrize(
  "overrides,key,words",
  [
    ([("distill.temprature", "2")], "distill.temprature", "unknown key"),
    ([("nosection.x", "2")], "nosection", "no such section"),
    ([("optim.steps", "ten")], "optim.steps", "cannot use 'ten'"),
    ([("teacher.vocab_size", "128")], "teacher.vocab_size", "one vocabulary"),
    (
      [("distill.hidden.weight", "1"), ("distill.hidden.layer_map", "1:9")],
      "distill.hidden.layer_map",
      "9",
    ),
    (
      [("distill.attention.weight", "1"), ("distill.attention.layer_map", "5:1")],
      "distill.attention.layer_map",
      "5",
    ),
    (
      [("distill.hidden.weight", "1"), ("distill.hidden.project", "false")],
      "distill.hidden.project",
      "projection",
    ),
    (
      [("distill.attention.weight", "1"), ("teacher.num_heads", "8")],
      "distill.attention.weight",
      "head counts",
    ),
    ([("teacher.source", "none")], "distill.logit.weight", "no teacher"),
    ([("distill.attention.value_weight", "-0.5")], "distill.attention.value_weight", ">= 0"),
    ([("student.policy", "p=f32,c=fp7")], "student.policy", "unknown dtype"),
    ([("student.policy", "p=f16,c=f16")], "student.policy", "loss scaling"),
    ([("distill.temperature_schedule", "wobble(x=1)")], "distill.temperature_schedule", "wobble"),
    ([("data.seq_len", "4096")], "data.seq_len", "max_len"),
    ([("optim.grad_accum", "3")], "optim.grad_accum", "micro-batches"),
    ([("distill.logit.kind", "kl2")], "distill.logit.kind", "reverse_kl"),
    (
      [("teacher.source", "workdir"), ("teacher.path", "/nonexistent/dir")],
      "teacher.path",
      "not a directory",
    ),
    ([("student.num_heads", "3")], "student", "divisible"),
  ],
)
def test_bad_settings_name_their_key(tmp_path, overrides, key, words):
  err = _error(tmp_path, overrides)
  assert err.key == key, str(err)
  assert words in str(err)


def test_unknown_key_in_a_config_file(tmp_path):
  err = _error(tmp_path, body="cfg = default_config(); cfg.optim.stepz = 3")
  assert err.key == "optim.stepz"


def test_missing_file_and_missing_get_config(tmp_path):
  with pytest.raises(ConfigError, match="no such file"):
    config_lib.load_config(str(tmp_path / "nope.py"))
  path = tmp_path / "empty.py"
  path.write_text("x = 1\n")
  with pytest.raises(ConfigError, match="get_config"):
    config_lib.load_config(str(path))


@pytest.mark.parametrize(
  "sizes,devices,expected",
  [
    ({"data": -1, "fsdp": 1, "tensor": 1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": -1, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
  ],
)
def test_mesh_shape(sizes, devices, expected):
  assert mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize(
  "sizes,devices,key",
  [
    ({"data": 2, "fsdp": 2, "tensor": 1}, 8, "mesh"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, 8, "mesh.fsdp"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, 8, "mesh"),
  ],
)
def test_mesh_that_does_not_fit_is_an_error(sizes, devices, key):
  with pytest.raises(ConfigError) as info:
    mesh_shape(sizes, devices)
  assert info.value.key == key, str(info.value)
