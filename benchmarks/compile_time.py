"""Compile time of the training step, unrolled vs scanned blocks, and remat's temporary memory.

  python benchmarks/compile_time.py [--layers 8,32,80] [--timeout 300] [--output PATH]

1. For each depth in ``--layers`` and each layout (``student.scan_layers`` false / true): the
   real training step (``train.run.build_run(cfg, data=False, create_state=False)``, CE-only
   student, no teacher; d_model 128, 4 heads, d_ff 512, seq 128, batch 2, f32) is lowered and
   compiled for an abstract batch; ``lower`` and ``compile`` are timed separately, with the
   compiled step's temporary bytes. Each row runs in a fresh subprocess (nothing cached
   between rows; the persistent compilation cache is off) killed after ``--timeout`` seconds
   (reported as a timeout).
2. Remat: ``memory_analysis().temp_size_in_bytes`` of the compiled forward + backward of the
   CE loss of a 4-layer, d_model 256, seq 512, batch 4 decoder for remat none / full / dots,
   unrolled and scanned (as ``tests/unit/test_scan_layers.py`` asserts).

Prints Markdown tables, writes the JSON (date, machine, jax version, ``compile`` and
``remat`` rows).
"""

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def _step_row(layers: int, scan: bool) -> dict:
  """Lower and compile the training step of a ``layers``-deep student (in this process)."""
  import jax
  import numpy as np

  jax.config.update("jax_enable_compilation_cache", False)
  from jaxdistill import config as config_lib
  from jaxdistill.parallel import sharding
  from jaxdistill.train import run as run_lib

  cfg = config_lib.default_config()
  cfg.student.update(
    vocab_size=256, d_model=128, num_heads=4, d_ff=512, max_len=128, num_layers=layers
  )
  cfg.student.scan_layers = scan
  cfg.teacher.source = "none"
  for key in ("logit", "attention", "hidden"):
    cfg.distill[key].weight = 0.0
  cfg.distill.attention.value_weight = 0.0
  cfg.distill.ce.weight = 1.0
  cfg.data.update(batch_size=2, seq_len=128)
  cfg.log.progress = False
  run = run_lib.build_run(cfg, devices=jax.devices()[:1], create_state=False, data=False)
  shape = (2, 128)
  local = dict(
    inputs=np.zeros(shape, np.int32),
    targets=np.zeros(shape, np.int32),
    weights=np.ones(shape, np.float32),
    segment_ids=np.ones(shape, np.int32),
    positions=np.tile(np.arange(128, dtype=np.int32), (2, 1)),
  )
  batch = sharding.shard_batch(local, run.mesh)
  with sharding.rules_context(run.mesh):
    start = time.perf_counter()
    lowered = run.step_fn.lower(run.state, run.teacher_vars, batch)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  return dict(layers=layers, scan_layers=scan, lower_s=lower_s, compile_s=compile_s, temp=temp)


def _remat_rows() -> list[dict]:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from jaxdistill.models.transformer import Transformer, TransformerConfig

  base = TransformerConfig(
    vocab_size=256, d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=512
  )
  rows = []
  for scan in (False, True):
    for remat in ("none", "full", "dots"):
      model = Transformer(dataclasses.replace(base, remat=remat, scan_layers=scan))

      def loss(params, tokens, model=model):
        logits = model.apply({"params": params}, tokens)["logits"]
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

      tokens = jax.ShapeDtypeStruct((4, 512), jnp.int32)
      params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens))["params"]
      compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes
      rows.append(dict(scan_layers=scan, remat=remat, temp=temp))
  return rows


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="8,32,80")
  parser.add_argument("--timeout", type=float, default=300.0, help="seconds per row")
  parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "compile_time.json"))
  parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # "L,scan": one row, as JSON
  args = parser.parse_args()
  if args.row:
    layers, scan = args.row.split(",")
    print(json.dumps(_step_row(int(layers), scan == "1")), flush=True)
    return
  import jax

  result = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": {
      "nproc": os.cpu_count(),
      "cpu": _cpu_model(),
      "python": platform.python_version(),
      "loadavg": os.getloadavg(),
    },
    "jax": jax.__version__,
    "compile": [],
  }
  print("| layers | layout | lower s | compile s | total s | step temp MiB |")
  print("|---:|---|---:|---:|---:|---:|")
  for layers in (int(x) for x in args.layers.split(",")):
    for scan in (False, True):
      cmd = [sys.executable, os.path.abspath(__file__), "--row", f"{layers},{int(scan)}"]
      layout = "scanned" if scan else "unrolled"
      try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        row = json.loads(done.stdout.strip().splitlines()[-1])
      except subprocess.TimeoutExpired:
        row = dict(layers=layers, scan_layers=scan, timeout_s=args.timeout)
        print(f"| {layers} | {layout} | > {args.timeout:.0f} s (stopped) | | | |", flush=True)
        result["compile"].append(row)
        continue
      except (IndexError, ValueError):
        raise SystemExit(f"row {layers},{layout} failed:\n{done.stderr[-3000:]}") from None
      result["compile"].append(row)
      total = row["lower_s"] + row["compile_s"]
      print(
        f"| {layers} | {layout} | {row['lower_s']:.2f} | {row['compile_s']:.2f} | {total:.2f} "
        f"| {row['temp'] / 2**20:.1f} |",
        flush=True,
      )
  result["remat"] = _remat_rows()
  print("\n| layout | remat | grad temp MiB |\n|---|---|---:|")
  for row in result["remat"]:
    layout = "scanned" if row["scan_layers"] else "unrolled"
    print(f"| {layout} | {row['remat']} | {row['temp'] / 2**20:.1f} |")
  result["machine"]["loadavg_end"] = os.getloadavg()
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
