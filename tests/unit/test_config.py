"""Config loading, overrides and every user mistake -> a ConfigError naming the key."""

import pytest
from conftest import ROOT

from jaxdistill import config as config_lib
from jaxdistill.config import validate
from jaxdistill.errors import ConfigError
from jaxdistill.parallel.sharding import mesh_shape

# _name.py files are shared helpers of other configs (e.g. _pod_shapes.py), not configs.
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
  """Each config loads and validates, by its path and by its name (the same config)."""
  if hasattr(config_lib.config_module(str(path)), "get_pipeline"):  # jaxdistill pipeline's
    from jaxdistill.compress import pipeline

    spec = pipeline.load(str(path))
    for stage in spec["stages"]:
      if "config" in stage:
        validate.validate(stage["config"])
    by_name = pipeline.load(path.stem)
    assert [s["name"] for s in by_name["stages"]] == [s["name"] for s in spec["stages"]]
    assert "jaxdistill pipeline --config" in path.read_text().split('"""')[1]
    return
  cfg = config_lib.load_config(str(path))
  validate.validate(cfg)
  assert cfg.optim.steps > 0
  by_name = config_lib.load_config(path.stem)
  assert by_name.to_json_best_effort(sort_keys=True) == cfg.to_json_best_effort(sort_keys=True)
  text = path.read_text()
  opening = text.split('"""')[1]  # a training config's command, or a shape-only one's compile
  assert "jaxdistill train --config" in opening or "jaxdistill compile --config" in opening, (
    "config must open with its command"
  )


def test_configs_by_name_resolve_to_the_shipped_files(tmp_path, monkeypatch):
  assert config_lib.names() == [p.stem for p in CONFIGS]
  smoke = str(ROOT / "configs" / "smoke.py")
  assert config_lib.resolve("smoke") == (smoke, ())
  recipe = str(ROOT / "configs" / "quickstart.py")
  assert config_lib.resolve("quickstart:distill,test") == (recipe, ("distill,test",))
  by_name = config_lib.load_config("quickstart:distill,test", [("optim.steps", "3")])
  by_path = config_lib.load_config(recipe + ":distill,test", [("optim.steps", "3")])
  assert by_name.to_json_best_effort() == by_path.to_json_best_effort()
  assert by_name.optim.steps == 3
  # A file given by path wins over a name: the name smoke is a file here.
  monkeypatch.chdir(tmp_path)
  (tmp_path / "smoke").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="not a Python file"):
    config_lib.load_config("smoke")
  for spec, words in [
    ("smok", ["no config named 'smok'", "known names: born_again, cnn_cifar10, ", "smoke"]),
    ("smok:test", ["no config named 'smok'"]),
    ("dir/smoke.py", ["no such file 'dir/smoke.py'", "smoke_vision"]),
  ]:
    with pytest.raises(ConfigError) as info:
      config_lib.load_config(spec)
    assert info.value.key == "--config" and "\n" not in str(info.value)
    for word in words:
      assert word in str(info.value), (spec, str(info.value))


def test_one_key_of_one_further_teacher_from_the_command_line():
  from jaxdistill.cli import commands as cli

  argv = ["--config.teachers[0].weight=3", "--config.teachers[0].path", "runs/b"]
  argv += ["--config.teachers[0].num_layers=5", "--config.teachers[0].source=workdir"]
  base = config_lib.load_config("ensemble:test")
  cfg = config_lib.load_config("ensemble:test", cli._split_overrides(argv))
  (t,) = cfg.teachers
  assert t["weight"] == 3.0 and isinstance(t["weight"], float)
  changed = dict(weight=3.0, path="runs/b", num_layers=5, source="workdir")
  assert t == dict(base.teachers[0], **changed) and t != base.teachers[0]
  assert cfg.teacher.to_dict() == base.teacher.to_dict()  # teacher 0: untouched
  assert config_lib.teachers_of(cfg)[1].num_layers == 5
  for spec, argv, key, words in [
    ("ensemble:test", ["--config.teachers[1].weight=2"], "teachers[1]", ["out of range", "1 "]),
    ("smoke", ["--config.teachers[0].weight=2"], "teachers[0]", ["0 further", "(none)"]),
    ("ensemble:test", ["--config.teachers[0].temperature=2"], None, ["unknown key", "weight"]),
    ("ensemble:test", ["--config.teachers[0].weight=x"], None, ["cannot use 'x'", "float"]),
    ("ensemble:test", ["--config.teachers[a].weight=2"], None, ["teachers[I].KEY"]),
    ("ensemble:test", ["--config.teachers[0]=2"], None, ["teachers[I].KEY"]),
    ("ensemble:test", ["--config.teachers.weight=2"], "teachers", ["teachers[I].KEY"]),
  ]:
    with pytest.raises(ConfigError) as info:
      config_lib.load_config(spec, cli._split_overrides(argv))
    assert info.value.key == (key or argv[0].split("=")[0][len("--config.") :])
    assert "\n" not in str(info.value)
    for word in words:
      assert word in str(info.value), (argv, str(info.value))


def test_a_bad_teacher_override_is_one_error_line_and_writes_nothing(tmp_path, capsys):
  from jaxdistill.cli import commands as cli

  workdir = tmp_path / "w"
  argv = ["train", "--config", "smoke", "--workdir", str(workdir)]
  assert cli.main(argv + ["--config.teachers[0].weight=2"]) == 2
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("error: teachers[0]: out of range") and not workdir.exists()


def _load(tmp_path, overrides=(), body="cfg = default_config()"):
  path = tmp_path / "c.py"
  path.write_text(
    f"from jaxdistill.config import default_config\ndef get_config():\n  {body}\n  return cfg\n"
  )
  cfg = config_lib.load_config(str(path), list(overrides))
  validate.validate(cfg)  # load_config only loads; every check is validate's
  return cfg


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
    (
      [
        ("teacher.source", "none"),
        ("distill.logit.weight", "0"),
        ("distill.attention.value_weight", "0.5"),
      ],
      "distill.attention.value_weight",
      "no teacher",
    ),
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


# --- issue 14: every schedule's whole range, optim.eps, the lr at step 0 ---------------------


def _validate(**changes):
  """validate.validate of default_config() with dotted-key changes."""
  from jaxdistill.config import validate

  cfg = config_lib.default_config()
  for key, value in changes.items():
    section, leaf = key.replace("__", ".").rsplit(".", 1)
    node = cfg
    for part in section.split("."):
      node = node[part]
    node[leaf] = value
  validate.validate(cfg)
  return cfg


@pytest.mark.parametrize(
  "changes,key,words",
  [
    # The example: accepted before, the run died mid-way with a non-finite loss.
    ({"distill__temperature_schedule": "linear(end=-1)"}, "distill.temperature_schedule", "-1"),
    ({"distill__temperature_schedule": "cosine(end=0)"}, "distill.temperature_schedule", "> 0"),
    ({"distill__ce__schedule": "linear(end=-0.5)"}, "distill.ce.schedule", ">= 0"),
    ({"distill__logit__schedule": "exp(decay=-100)"}, "distill.logit.schedule", "finite"),
    (
      {"distill__hidden__weight": 1.0, "distill__hidden__schedule": "linear(end=-1, steps=50)"},
      "distill.hidden.schedule",
      "step 50",
    ),
    ({"distill__attention__value_weight": -1.0}, "distill.attention.value_weight", ">= 0"),
    ({"optim__eps": 0.0}, "optim.eps", "> 0"),
  ],
)
def test_schedules_are_checked_over_the_whole_run(changes, key, words):
  with pytest.raises(ConfigError) as info:
    _validate(**changes)
  assert info.value.key == key and words in str(info.value), str(info.value)


def test_schedules_that_stay_in_range_are_accepted():
  _validate(
    distill__temperature_schedule="linear(end=0.5)",
    distill__ce__schedule="linear(end=0)",  # reaching 0 is fine for a weight
    distill__hidden__schedule="cosine(end=1)",  # from weight 0 up to 1
  )


def test_eps_default_is_optax_default_and_reaches_adam():
  import inspect

  import jax.numpy as jnp
  import optax

  from jaxdistill.train import step as train_lib

  optim = config_lib.default_config().optim
  assert optim.eps == inspect.signature(optax.adamw).parameters["eps"].default
  optim.update(lr_schedule="constant", warmup_steps=0, clip_norm=0.0, weight_decay=0.0, lr=1.0)
  grads = {"w": jnp.full((2, 2), 1e-3)}

  def first_update(eps):
    optim.eps = eps
    tx = train_lib.make_optimizer(optim)
    return float(tx.update(grads, tx.init(grads), grads)[0]["w"][0, 0])

  # Adam's first step is -lr * g / (|g| + eps): -1 with a tiny eps, about -1e-3 with eps=1.
  assert first_update(1e-8) == pytest.approx(-1.0, rel=1e-4)
  assert first_update(1.0) == pytest.approx(-1e-3, rel=1e-2)


@pytest.mark.parametrize("kind", ["constant", "cosine"])
def test_lr_at_step_0_without_warmup_is_the_configured_lr(kind):
  from jaxdistill.train import step as train_lib

  optim = config_lib.default_config().optim
  optim.update(lr_schedule=kind, warmup_steps=0, lr=3e-3)
  assert float(train_lib.lr_schedule(optim)(0)) == pytest.approx(3e-3)
  # With warmup, step 0 still trains at 0 and warmup_steps at lr (unchanged behaviour).
  optim.warmup_steps = 2
  schedule = train_lib.lr_schedule(optim)
  assert [float(schedule(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 1.5e-3, 3e-3])


@pytest.mark.slow
def test_one_constant_lr_step_without_warmup_changes_the_params(tiny_config):
  """End to end: before the fix step 0 ran at lr 0 and left every param unchanged."""
  import jax
  import numpy as np

  from jaxdistill.train import loop

  cfg = tiny_config
  cfg.teacher.source = "none"
  for key in ("logit", "attention", "hidden"):
    cfg.distill[key].weight = 0.0
  cfg.distill.attention.value_weight = 0.0
  cfg.optim.update(steps=1, lr_schedule="constant", warmup_steps=0)
  run = loop.build_run(cfg, devices=jax.devices()[:1])
  before = jax.tree.map(np.array, run.state.params)
  loop.run_steps(run, 1, lambda step, m, s: None)
  changed = jax.tree.leaves(
    jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before, run.state.params)
  )
  assert all(changed), f"{changed.count(False)} of {len(changed)} params did not move"
