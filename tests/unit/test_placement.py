"""Teacher placement (``teacher.rules``, jaxdistill/parallel/placement.py): the rules parse and are
validated against the mesh; a step with the teacher's own rules computes what the step with
the student's rules computes, and its compiled per-device memory moves by exactly the
teacher's bytes per device."""

import jax
import numpy as np
import pytest

from jaxdistill import models
from jaxdistill.errors import ConfigError
from jaxdistill.evaluation import latency
from jaxdistill.parallel import placement, sharding
from jaxdistill.train import loop
from jaxdistill.train import step as train
from jaxdistill.train import teacher as teacher_lib

_STEPS: dict = {}


def _step(cfg, rules: str):
  """(argument bytes per device of the compiled step, teacher bytes per device, metrics,
  student params after one step) with the teacher placed by ``rules`` on the 2x2x2 mesh.

  One run (the student's rules) is built per session; every placement re-places its teacher
  (``teacher.rules`` through ``models.variable_shardings``) and compiles the step for it: the
  same step function, the same state and batch, only the teacher's shardings differ. (Not
  donated, so every placement steps from the same state.)
  """
  if not _STEPS:
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    cfg.distill.attention.update(weight=0.0, value_weight=0.0)  # logits + hidden states
    run = loop.build_run(cfg)
    step = train.make_distill_step(
      run.objective, run.student, run.teacher, train.make_optimizer(cfg.optim)
    )
    batch = sharding.shard_batch(next(run.data_iter), run.mesh)
    _STEPS["run"] = run, step, batch
  run, step, batch = _STEPS["run"]
  if rules not in _STEPS:
    cfg = run.cfg.copy_and_resolve_references()
    cfg.teacher.rules = rules
    table = teacher_lib.rules(cfg, run.teacher, run.mesh)
    shardings = models.variable_shardings(run.teacher, run.mesh, cfg.data.seq_len, table)
    teacher_vars = jax.device_put(run.teacher_vars, shardings)
    state_shardings = jax.tree.map(lambda a: a.sharding, run.state)
    fn = jax.jit(
      step,
      in_shardings=(state_shardings, shardings, sharding.batch_sharding(run.mesh)),
      out_shardings=(state_shardings, sharding.replicated(run.mesh)),
    )
    with sharding.rules_context(run.mesh):
      compiled = fn.lower(run.state, teacher_vars, batch).compile()
    state, metrics = compiled(run.state, teacher_vars, batch)
    teacher_bytes = sum(
      int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
      for a in jax.tree.leaves(teacher_vars)
    )
    memory = latency.memory_of(compiled)["argument_bytes"]
    _STEPS[rules] = memory, teacher_bytes, jax.device_get(metrics), jax.device_get(state.params)
  return _STEPS[rules]


def test_presets_parse_onto_the_students_table():
  assert placement.parse_rules("student") is None  # the default: the very same program
  assert placement.parse_rules("") is None
  tensor = dict(placement.parse_rules("tensor"))
  assert tensor["heads"] == tensor["mlp"] == "tensor" and tensor["embed"] is None
  assert tensor["vocab"] is None and tensor["act_vocab"] == "tensor"  # activations: student's
  assert dict(placement.parse_rules("fsdp"))["embed"] == ("data", "fsdp")
  assert all(
    v is None for k, v in placement.parse_rules("replicated") if k in placement.PARAM_NAMES
  )
  custom = dict(placement.parse_rules("tensor, embed=fsdp, vocab=data+tensor"))
  assert custom["embed"] == "fsdp" and custom["vocab"] == ("data", "tensor")
  assert dict(placement.parse_rules("mlp=none"))["embed"] == "fsdp"  # overrides on the student's


@pytest.mark.parametrize(
  "spec,match",
  [
    ("tensr", "unknown preset 'tensr'"),
    ("embed=model", "'model' is not a mesh axis"),
    ("act_heads=none", "an activation name"),
    ("heads=tensor+tensor", "names a mesh axis twice"),
    ("mlp=tensor,fsdp", "only the first item may be a preset"),
    ("weights=tensor", "'weights' is unknown"),
  ],
)
def test_bad_rules_are_one_line_errors_naming_the_key(spec, match):
  with pytest.raises(ConfigError, match=match) as e:
    placement.parse_rules(spec)
  assert str(e.value).startswith("teacher.rules") and "\n" not in str(e.value)


def test_rules_that_do_not_split_the_teacher_fail_before_anything_runs(tiny_config):
  cfg = tiny_config
  cfg.teacher.update(d_model=36, rules="fsdp")  # 36 does not split over data*fsdp = 8
  cfg.mesh.update(data=8, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match=r"embed=36\) over data\*fsdp=8 devices") as e:
    loop.build_run(cfg, data=False)
  assert str(e.value).startswith("teacher.rules") and "\n" not in str(e.value)
  cfg.teacher.rules = "bogus"
  with pytest.raises(ConfigError, match="teacher.rules: unknown preset 'bogus'"):
    loop.build_run(cfg, data=False)  # validate() already: no model is built


@pytest.mark.slow  # 4 compiles of the step: ~15 s alone, a minute on a loaded machine
@pytest.mark.parametrize("rules", ["tensor", "fsdp", "replicated"])
def test_teacher_rules_compute_the_same_step(tiny_config, rules):
  _, _, want, want_params = _step(tiny_config, "student")
  _, _, got, got_params = _step(tiny_config, rules)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(got_params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # shares the compiles above
def test_compiled_memory_moves_by_the_teachers_bytes_per_device(tiny_config):
  """On 2x2x2 the student's rules split the teacher's matrices 4 ways (embed over fsdp,
  heads / MLP / vocab over tensor), fsdp 8 ways, tensor only its heads and MLP 2 ways,
  replicated not at all; the compiled step's arguments differ by exactly the teacher's bytes
  per device (the state and the batch are the same)."""
  runs = {r: _step(tiny_config, r)[:2] for r in ("student", "tensor", "fsdp", "replicated")}
  teacher = {r: t for r, (_, t) in runs.items()}
  assert teacher["fsdp"] < teacher["student"] < teacher["tensor"] < teacher["replicated"]
  assert teacher["fsdp"] < teacher["replicated"] / 7  # matrices 8 ways, norms 4 ways
  base_args, base_teacher = runs["student"]
  for r, (args, t) in runs.items():
    assert args - base_args == t - base_teacher, r
