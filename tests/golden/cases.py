"""Golden runs: per-step metrics and final-param fingerprints of small runs, recorded once.

The layout redesign (issue 14) promised "behaviour unchanged": these runs were recorded
(``python tests/golden/cases.py --write``) and ``tests/integration/test_golden.py`` checks that
today's code reproduces every number within float32 rounding (the tolerances and why they are
what they are: that test's docstring). Metrics are stored as float reprs; params as a
fingerprint per leaf (float64 sum, sum of magnitudes, root of the sum of squares, and a dot
product with a fixed +-1 pattern: a change to any part of a leaf moves at least one of them).

Not bit for bit: XLA compiles different CPU code for different processors (AVX2 vs AVX-512
vectorise reductions differently), so float32 sums differ in their last bits between machines.
Bit-for-bit equality is kept where it is physics on one machine: a resumed run against an
uninterrupted one (tests/e2e/test_checkpoint.py) and the same case run twice in one process
(``test_golden.py``).

If a test fails after a change that is meant to alter numerics (a new default, a reordered
sum), say so in the commit, re-record with ``--write`` and check the diff of
``tests/golden/golden.json`` is what you expect. If the change was meant to be a pure
refactor, the failure is a bug. ``--dump FILE`` writes the same record elsewhere (to compare
machines or instruction sets: ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``).

Each case is a function returning a validated config and the devices to run on; ``run_case``
drives it through the public library API.
"""

import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(HERE, "golden.json")
BERT = os.path.join(ROOT, "tests", "fixtures", "hf", "bert_tiny")


def _tiny():
  # A frozen copy of conftest's ``tiny_config`` (and test_cache's): the golden records must not
  # move when someone edits a shared fixture, so this one is never shared.
  from jaxdistill.config import default_config

  cfg = default_config()
  cfg.student.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)
  cfg.teacher.update(
    source="random", vocab_size=64, d_model=48, num_layers=3, num_heads=2, d_ff=96, max_len=16
  )
  cfg.distill.temperature = 2.0
  cfg.distill.logit.weight = 0.5
  cfg.distill.ce.weight = 0.5
  cfg.distill.attention.update(weight=0.2, value_weight=0.2)
  cfg.distill.hidden.update(weight=0.3, layer_map="uniform")
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(batch_size=8, seq_len=16, pad_fraction=0.5)
  cfg.log.progress = False
  return cfg


def smoke():
  """configs/smoke.py, 6 steps, 1 device (fused head, every feature loss, projections)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.optim.steps = 6
  cfg.log.progress = False
  return cfg, 1, 6


def dense_sharded_accum():
  """Dense logits (fused off), 2x2x2 mesh, 2 micro-batches, cosine hidden loss."""
  cfg = _tiny()
  cfg.distill.fused = False
  cfg.distill.hidden.kind = "cosine"
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  cfg.optim.grad_accum = 2
  return cfg, 8, 3


def fused_jsd_vocab_chunks():
  """Fused head with token and vocab chunks, JSD logit loss, 1x4x2 mesh."""
  cfg = _tiny()
  cfg.distill.logit.kind = "kl"
  cfg.distill.update(token_chunk=16, vocab_chunk=16)
  cfg.distill.temperature_schedule = "linear(end=1.0)"
  cfg.mesh.update(data=1, fsdp=4, tensor=2)
  return cfg, 8, 3


def online_topk():
  """Sparse top-k targets made in the step from the online teacher (topk_tail)."""
  cfg = _tiny()
  cfg.distill.logit.kind = "topk_tail"
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.precompute.k = 8
  cfg.mesh.update(data=2, fsdp=1, tensor=1)
  return cfg, 2, 3


def no_teacher_constant_lr():
  """CE only (how teachers are made), constant lr with warmup."""
  cfg = _tiny()
  cfg.teacher.source = "none"
  for key in ("logit", "attention", "hidden"):
    cfg.distill[key].weight = 0.0
  cfg.distill.attention.value_weight = 0.0
  cfg.optim.update(lr_schedule="constant", warmup_steps=2)
  return cfg, 1, 3


def fp16_loss_scale():
  cfg = _tiny()
  cfg.student.num_layers = cfg.teacher.num_layers = 1
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.student.policy = "p=f32,c=f16,o=f32"
  cfg.optim.update(loss_scale="dynamic", loss_scale_init=2.0**8, loss_scale_period=1)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  return cfg, 1, 3


def fp8_student_and_teacher():
  cfg = _tiny()
  cfg.student.num_layers = cfg.teacher.num_layers = 1
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.student.policy = "p=f32,c=fp8,o=f32"
  cfg.teacher.update(policy="p=f32,c=fp8,o=f32", fp8_calibration_batches=2)
  cfg.mesh.update(data=1, fsdp=2, tensor=2)
  return cfg, 4, 3


def cache_sampled():
  """A student trained from precomputed sampled + top-k targets (teacher.source='cache')."""
  import tempfile

  import jax

  from jaxdistill.config import validate
  from jaxdistill.precompute import text as precompute

  cfg = _tiny()
  cfg.student.update(d_model=16, num_layers=1, d_ff=32)
  cfg.teacher.update(d_model=32, num_layers=1, d_ff=64)
  cfg.distill.attention.update(weight=0.0, value_weight=0.0)
  cfg.distill.hidden.weight = 0.0
  cfg.distill.logit.kind = "sampled"
  cfg.precompute.update(targets="both", k=8, samples=6, logprob_dtype="f32", rows=24)
  cfg.precompute.rows_per_shard = 16
  out = tempfile.mkdtemp(prefix="jaxdistill-golden-cache-")
  teacher_cfg = cfg.copy_and_resolve_references()
  teacher_cfg.distill.logit.kind = "topk_tail"
  validate.validate(teacher_cfg)
  teacher = precompute.build_teacher(teacher_cfg, out, devices=jax.devices()[:2])
  precompute.run(teacher_cfg, out, teacher=teacher)
  cfg.teacher.update(source="cache", path=out)
  cfg.mesh.update(data=2, fsdp=1, tensor=1)
  return cfg, 2, 3


def encoder_hf():
  """The tiny BERT fixture as an hf teacher, its last block as the student, every encoder
  loss (attention, value relation, hidden, embedding cosine)."""
  from jaxdistill.config import default_config
  from jaxdistill.models import hf

  keys = hf.model_keys(BERT)
  cfg = default_config()
  cfg.teacher.update(source="hf", path=BERT, **keys)
  cfg.student.update(keys)
  cfg.student.update(num_layers=1, init_layers="last")
  cfg.distill.logit.weight = 0.0
  cfg.distill.attention.update(weight=1.0, value_weight=1.0)
  cfg.distill.hidden.update(weight=1.0, layer_map="last", project=False)
  cfg.distill.embedding.weight = 1.0
  cfg.data.update(batch_size=8, seq_len=12)
  cfg.optim.update(steps=3, lr=1e-3, warmup_steps=1)
  cfg.mesh.update(data=2, fsdp=1, tensor=1)
  cfg.log.progress = False
  return cfg, 2, 3


CASES = {
  f.__name__: f
  for f in (
    smoke,
    dense_sharded_accum,
    fused_jsd_vocab_chunks,
    online_topk,
    no_teacher_constant_lr,
    fp16_loss_scale,
    fp8_student_and_teacher,
    cache_sampled,
    encoder_hf,
  )
}


def params_hash(tree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes."""
  import jax
  import numpy as np

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def params_fingerprint(tree) -> dict[str, list[float]]:
  """Leaf path -> [sum, sum of |x|, sqrt(sum of squares), dot with a fixed +-1 pattern], float64.

  Unlike a hash of the bytes, these can be compared with a tolerance: float32 rounding moves
  them by about its own relative size, a real change (a different update, a swapped leaf, a
  sign) by far more.
  """
  import jax
  import numpy as np

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    a = np.asarray(leaf, np.float64).ravel()
    pattern = np.where(np.arange(a.size) * 2654435761 % 7 < 3, -1.0, 1.0)  # fixed, not random
    out[jax.tree_util.keystr(path)] = [
      float(a.sum()), float(np.abs(a).sum()), float(np.sqrt((a * a).sum())), float(a @ pattern)
    ]
  return out


def _clean(metrics: dict) -> dict:
  return {k: repr(float(v)) for k, v in sorted(metrics.items()) if not k.startswith("perf/")}


def run_case(name: str) -> dict:
  """Runs one case in-process.

  Returns:
    {"steps": [metrics as float reprs, one dict per step], "params": params_fingerprint,
     "sha256": params_hash (bit-for-bit, only meaningful on one machine)}.
  """
  import jax

  from jaxdistill.train import loop

  cfg, num_devices, steps = CASES[name]()
  # The loop's run builder validates the config itself; workdir-free, no checkpoint.
  run = loop.build_run(cfg, devices=jax.devices()[:num_devices])
  history = []
  loop.run_steps(run, steps, lambda step, m, s: history.append(_clean(m)))
  params = run.state.params
  return {"steps": history, "params": params_fingerprint(params), "sha256": params_hash(params)}


def _ensure_devices():
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
  _ensure_devices()
  sys.path.insert(0, ROOT)
  if "--write" in sys.argv:
    target = GOLDEN
  elif "--dump" in sys.argv[:-1]:
    target = sys.argv[sys.argv.index("--dump") + 1]
  else:
    sys.exit(
      "usage: python tests/golden/cases.py --write | --dump FILE  (re-records "
      "tests/golden/golden.json, or writes the same record to FILE)"
    )
  from jaxdistill.config import validate

  out = {}
  for case in CASES:
    cfg, _, _ = CASES[case]()
    validate.validate(cfg)
    out[case] = run_case(case)
    print(case, out[case]["steps"][-1].get("train/loss"), out[case]["sha256"][:12], flush=True)
  for record in out.values():
    del record["sha256"]  # a property of one machine's compiled code, not of the code
  with open(target, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1, sort_keys=True)
