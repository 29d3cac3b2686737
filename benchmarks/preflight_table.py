"""The real-size preflight table: three KD pairs on five TPU slices, compiled on this CPU.

  python benchmarks/preflight_table.py [--configs a,b] [--topologies v5e-64,...] [--output P]

For each config (``configs/llama70b_to_8b.py``, ``configs/llama8b_to_1b.py``,
``configs/qwen7b_to_05b.py``: scanned blocks, full remat, FSDP over every chip) and each
topology, one row per chip of batch (``data.batch_size`` = the chip count), ``jaxdistill compile
--json`` runs in a fresh process (libtpu compiles ahead of time; one process per row keeps
memory bounded). Each row: the verdict, GiB per chip against HBM, roofline step time and its
terms, tokens/s and MFU bounds, collective bytes, compile time; and what a precomputed top-k
teacher cache would cost instead of the teacher in the step (4k + 4 bytes per token at
``precompute.k``, disk for 1B tokens). Prints a Markdown table, writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = ("llama70b_to_8b", "llama8b_to_1b", "qwen7b_to_05b")
TOPOLOGIES = ("v5e-64", "v5e-256", "v5p-128", "v6e-64", "v6e-256")
CHIPS = {"v5e-64": 64, "v5e-256": 256, "v5p-128": 64, "v6e-64": 64, "v6e-256": 256}
TOPK = 32  # precompute.k's default


def row(config: str, topology: str) -> dict:
  chips = CHIPS[topology]
  cmd = [sys.executable, "-m", "jaxdistill.cli", "compile", "--json"]
  cmd += ["--config", os.path.join(ROOT, "configs", config + ".py"), "--topology", topology]
  cmd += [f"--config.data.batch_size={chips}"]
  start = time.perf_counter()
  proc = subprocess.run(
    cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )
  wall = time.perf_counter() - start
  if proc.returncode not in (0, 1):
    return dict(
      config=config, topology=topology, error=proc.stderr.strip().splitlines()[-1:], wall_s=wall
    )
  r = json.loads(proc.stdout)
  per_token = 4 * TOPK + 4
  return dict(
    config=config,
    topology=topology,
    chips=chips,
    fits=r["fits"],
    gib_per_chip=r["total_bytes"] / 2**30,
    hbm_gib=r["hbm_bytes"] / 2**30,
    step_s=r["step_s"],
    compute_s=r["compute_s"],
    hbm_s=r["hbm_s"],
    ici_s=r["ici_s"],
    tokens_per_s=r["tokens_per_s"],
    mfu=r["mfu"],
    collective_gib=sum(c["bytes_sent"] for c in r["collectives"].values()) / 2**30,
    compile_s=r["compile_s"],
    wall_s=wall,
    error=r["error"],
    cache_bytes_per_token=per_token,
    cache_tb_per_1b_tokens=per_token * 1e9 / 1e12,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--output", default="preflight_table.json")
  args = parser.parse_args()
  rows = []
  print("| config | slice | fits | GiB/chip (HBM) | step s (compute / HBM / ICI) ", end="")
  print("| tok/s | MFU | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for config in args.configs.split(","):
    for topology in args.topologies.split(","):
      r = row(config, topology)
      rows.append(r)
      if "fits" not in r:
        print(f"| {config} | {topology} | error: {r['error']} | | | | | |", flush=True)
      else:
        print(
          f"| {config} | {topology} | {'yes' if r['fits'] else 'no'} | {r['gib_per_chip']:.1f} "
          f"({r['hbm_gib']:.1f}) | {r['step_s']:.2f} ({r['compute_s']:.2f} / {r['hbm_s']:.2f} / "
          f"{r['ici_s']:.2f}) | {r['tokens_per_s']:,.0f} | {r['mfu']:.0%} | {r['compile_s']:.0f} |",
          flush=True,
        )
      with open(args.output, "w") as f:
        json.dump(
          dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), rows=rows), f, indent=1
        )
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
