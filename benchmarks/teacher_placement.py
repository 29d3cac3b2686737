"""Teacher placement (``teacher.rules``, issue 18) on 8 fake CPU devices.

  python benchmarks/teacher_placement.py [--repeats 5] [--json PATH]

A teacher 8x the student (params), KL + CE through the fused head, [16, 64] token batches,
float32. For each mesh and each ``teacher.rules`` preset: the compiled step's per-device
memory (``memory_analysis``: temp, arguments, outputs and their total, donated buffers
counted once; the teacher's own bytes per device beside them) and its step time (median of
``--repeats`` steps after 2 warm-ups, the presets interleaved step by step so load on a
shared machine hits them alike). Meshes: data=8 (the
default, pure data parallelism: the student's rules replicate everything) and data=2 x fsdp=2
x tensor=2. One run is built per mesh (the student's rules); every preset places that run's
teacher by its rules (what ``build_run`` does with ``teacher.rules``) and jits the same step
through ``train.jit_distill_step``, so only the teacher's shardings differ.

Then FSDP: the student's params + optimizer state per device with fsdp=8 over 8 devices vs 1
device (ideal 0.125, target <= 0.15), from the state's shardings (nothing runs).

Prints a table; writes JSON (default /tmp/teacher_placement.json).
"""

import os

# 8 fake CPU devices: before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import models
from jaxdistill.config import default_config  # noqa: E402
from jaxdistill.evaluation import latency
from jaxdistill.parallel import sharding
from jaxdistill.train import loop
from jaxdistill.train import step as train  # noqa: E402
from jaxdistill.train import teacher as teacher_lib

MESHES = {"8x1x1": (8, 1, 1), "2x2x2": (2, 2, 2)}
RULES = {"8x1x1": ("student", "fsdp"), "2x2x2": ("student", "tensor", "fsdp", "replicated")}
MB = 1 << 20


def make_config(mesh: tuple[int, int, int]):
  """Student 2 x 128 (0.65M params), teacher 5 x 256 (5.5M: 8.4x), vocab 1024."""
  cfg = default_config()
  cfg.student.update(vocab_size=1024, d_model=128, num_layers=2, num_heads=4, d_ff=512, max_len=64)
  cfg.teacher.update(
    source="random", vocab_size=1024, d_model=256, num_layers=5, num_heads=4, d_ff=1024, max_len=64
  )
  cfg.distill.ce.weight = 0.5
  cfg.data.update(batch_size=16, seq_len=64)
  cfg.log.progress = False
  cfg.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  return cfg


def per_device_bytes(tree) -> int:
  """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs with shardings)."""
  return sum(
    int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(tree)
  )


def placements(mesh_name: str) -> tuple[dict, dict]:
  """{rules: (step fn, state, teacher_vars, batch)} for one mesh, and the sizes of the models."""
  cfg = make_config(MESHES[mesh_name])
  run = loop.build_run(cfg)
  step = train.make_distill_step(
    run.objective, run.student, run.teacher, train.make_optimizer(cfg.optim)
  )
  batch = sharding.shard_batch(next(run.data_iter), run.mesh)
  state_shardings = jax.tree.map(lambda a: a.sharding, run.state)
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=state_shardings)
  out = {}
  for rules in RULES[mesh_name]:
    cfg.teacher.rules = rules
    table = teacher_lib.rules(cfg, run.teacher, run.mesh)
    shardings = models.variable_shardings(run.teacher, run.mesh, cfg.data.seq_len, table)
    teacher_vars = jax.device_put(run.teacher_vars, shardings)
    fn = train.jit_distill_step(step, state_shardings, shardings, run.mesh)
    out[rules] = [fn, copy(run.state), teacher_vars, batch]  # each steps its own state
  sizes = {
    "student_params": latency.size({"params": run.state.params["student"]})["params"],
    "teacher_params": latency.size(run.teacher_vars)["params"],
  }
  return out, sizes


def measure(repeats: int) -> tuple[list[dict], dict]:
  """The rows of the placement table (every mesh and preset) and the models' sizes."""
  configs, rows, sizes = {}, {}, {}
  for mesh_name in MESHES:
    placed, sizes = placements(mesh_name)
    for rules, (fn, state, teacher_vars, batch) in placed.items():
      with sharding.rules_context(state.step.sharding.mesh):
        memory = latency.memory_of(fn.lower(state, teacher_vars, batch).compile())
      rows[mesh_name, rules] = dict(
        mesh=mesh_name,
        rules=rules,
        teacher_mb=per_device_bytes(teacher_vars) / MB,
        temp_mb=memory["temp_bytes"] / MB,
        argument_mb=memory["argument_bytes"] / MB,
        output_mb=memory["output_bytes"] / MB,
        total_mb=memory["total_bytes"] / MB,  # arguments + outputs + temp - donated
        times=[],
      )
      configs[mesh_name, rules] = [fn, state, teacher_vars, batch]
  for i in range(repeats + 2):  # interleaved: one step of every placement per round
    for key, c in configs.items():
      fn, state, teacher_vars, batch = c
      with sharding.rules_context(batch["inputs"].sharding.mesh):
        start = time.perf_counter()
        c[1], metrics = fn(state, teacher_vars, batch)
        jax.block_until_ready(metrics)
      if i >= 2:
        rows[key]["times"].append(time.perf_counter() - start)
  for row in rows.values():
    row["step_ms"] = 1000 * statistics.median(row.pop("times"))
  return list(rows.values()), sizes


def fsdp_ratio() -> dict:
  """Per-device bytes of the student's params + optimizer state: fsdp=8 on 8 devices vs 1."""
  out = {}
  for name, devices, mesh in (
    ("1 device", jax.devices()[:1], (1, 1, 1)),
    ("fsdp=8", None, (1, 8, 1)),
  ):
    cfg = make_config(mesh)
    cfg.teacher.source = "none"
    cfg.distill.update(ce=dict(weight=1.0))
    cfg.distill.logit.weight = 0.0
    run = loop.build_run(cfg, devices=devices, create_state=False, data=False)
    out[name] = per_device_bytes((run.state.params, run.state.opt_state))
  return dict(
    one_device_mb=out["1 device"] / MB,
    fsdp8_mb=out["fsdp=8"] / MB,
    ratio=out["fsdp=8"] / out["1 device"],
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default="/tmp/teacher_placement.json")
  args = parser.parse_args()
  start = time.perf_counter()
  rows, sizes = measure(args.repeats)
  fsdp = fsdp_ratio()
  s, t = sizes["student_params"], sizes["teacher_params"]
  print(f"student {s / 1e6:.2f}M params, teacher {t / 1e6:.2f}M ({t / s:.1f}x); MB per device")
  print(
    "| mesh | teacher.rules | teacher MB | temp MB | arguments MB | outputs MB | total MB", end=""
  )
  print(" | step ms |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['mesh']} | {r['rules']} | {r['teacher_mb']:.2f} | {r['temp_mb']:.2f} | "
      f"{r['argument_mb']:.2f} | {r['output_mb']:.2f} | {r['total_mb']:.2f} | {r['step_ms']:.0f} |"
    )
  print(
    f"FSDP student params + optimizer state per device: 1 device {fsdp['one_device_mb']:.3f} MB, "
    f"fsdp=8 {fsdp['fsdp8_mb']:.3f} MB, ratio {fsdp['ratio']:.4f} (ideal 0.125, target <= 0.15)"
  )
  wall = time.perf_counter() - start
  print(f"{wall:.0f} s")
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(dict(sizes=sizes, rows=rows, fsdp=fsdp, wall_s=wall), f, indent=1)


if __name__ == "__main__":
  main()
