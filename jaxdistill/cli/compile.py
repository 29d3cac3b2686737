"""The ``jaxdistill compile`` command: pod preflight from this host.

Compiles a config's real distill step for a TPU topology (ahead of time, with libtpu: ``pip
install "jaxdistill[tpu]"``), a GPU cluster (an estimate from this host's compiler) or this CPU,
and prints whether it fits, its memory per device, FLOPs, collectives and roofline step time
(``jaxdistill.preflight``). ``--plan`` searches meshes, remat and micro-batching instead.
Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

import argparse
import json
import os
import sys

from jaxdistill.errors import JaxdistillError

EXIT_NO_FIT = 1

EPILOG = """\
examples:
  jaxdistill compile --config configs/llama70b_to_8b.py --topology v5p-128
  jaxdistill compile --config smoke --topology v5e:2x2 --mesh 2,1,2 --json
  jaxdistill compile --config configs/llama8b_to_1b.py --topology v5e-64 --plan
  jaxdistill compile --config smoke --topology h100:8        (an estimate: no GPU compile here)
  jaxdistill compile --config configs/llama8b_to_1b.py --topology v5e-8 --what generate \
      --gen_batch 8 --prompt_len 1024 --new_tokens 256       (the student's prefill and decode)

topologies: slice names v5p-128, v5e-64, v6e-256, v4-32 (v4/v5p count TensorCores, 2 per chip;
v5e/v6e chips), chip grids v5e:2x2, v5p:4x4x4, GPU clusters h100:8, h200:16, or cpu.
Exit status: 0 the step fits, 1 it does not, 2 bad input."""


def add_parser(sub) -> None:
  """Adds the compile subcommand to ``sub`` (argparse subparsers)."""
  p = sub.add_parser(
    "compile",
    help="pod preflight: compile the step for a TPU topology (or GPUs); fit, memory, roofline",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--config", required=True, help="config FILE[:ARG] or name")
  p.add_argument("--topology", required=True, help="v5p-128, v5e:2x2, h100:8, cpu, ...")
  p.add_argument("--mesh", default="", help="data,fsdp,tensor sizes (default: the config's)")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.add_argument("--plan", action="store_true", help="search meshes, remat, micro-batches")
  p.add_argument(
    "--what",
    choices=("step", "generate", "precompute"),
    default="step",
    help="step: the distill step; generate: the sampler's prefill and decode programs; "
    "precompute: the teacher's targets program (one data.batch_size batch)",
  )
  p.add_argument(
    "--which", choices=("student", "teacher"), default="student", help="generate's model"
  )
  p.add_argument("--gen_batch", type=int, default=8, help="generate: rows generated together")
  p.add_argument("--prompt_len", type=int, default=1024, help="generate: prompt tokens per row")
  p.add_argument("--new_tokens", type=int, default=256, help="generate: new tokens per row")
  p.add_argument("--top", type=int, default=5, help="--plan: how many fitting plans to print")
  p.add_argument(
    "--max_compiles", type=int, default=8, help="--plan: compile at most this many candidates"
  )


def parse_mesh(text: str) -> tuple[int, int, int] | None:
  """'2,4,1' -> (2, 4, 1); '' -> None."""
  if not text:
    return None
  try:
    sizes = tuple(int(x) for x in text.split(","))
  except ValueError:
    sizes = ()
  if len(sizes) != 3 or min(sizes) < 1:
    raise JaxdistillError(
      f"--mesh {text!r}: give three positive sizes data,fsdp,tensor, e.g. 8,8,1"
    )
  return sizes


def command(args, overrides) -> int:
  from jaxdistill.preflight import chips

  topology = None if args.topology == "cpu" else chips.parse_topology(args.topology)
  mesh = parse_mesh(args.mesh)
  if args.top < 1 or args.max_compiles < 1:
    raise JaxdistillError("--top and --max_compiles must be at least 1")
  for flag in ("gen_batch", "prompt_len", "new_tokens"):
    if getattr(args, flag) < 1:
      raise JaxdistillError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
  if args.plan and mesh is not None:
    raise JaxdistillError("--plan searches the mesh itself; drop --mesh")
  if args.plan and args.what != "step":
    raise JaxdistillError(f"--plan searches layouts of the distill step; drop --what {args.what}")
  if topology is not None and topology.chip.platform == "gpu":
    _force_cpu_devices(topology.num_chips)
  from jaxdistill import config as config_lib
  from jaxdistill.config import validate

  cfg = config_lib.load_config(args.config, overrides)
  validate.validate(cfg)
  from jaxdistill.preflight import compiler, plan

  if topology is None:
    topology = compiler.host_topology()
  if args.plan:
    result = plan.search(cfg, topology, top=args.top, max_compiles=args.max_compiles)
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.format())
    return 0 if result.best else EXIT_NO_FIT
  if args.what == "generate":
    from jaxdistill.preflight import generation

    reports = generation.compile_generation(
      cfg, topology, args.gen_batch, args.prompt_len, args.new_tokens, args.which, mesh
    )
  elif args.what == "precompute":
    from jaxdistill.preflight import precompute

    reports = (precompute.compile_precompute(cfg, topology, mesh),)
  else:
    reports = (compiler.compile_for(cfg, topology, mesh),)
  if args.json:
    out = [r.as_dict() for r in reports]
    print(json.dumps(out[0] if len(out) == 1 else out, indent=1))
  else:
    print("\n\n".join(r.format() for r in reports))
  return 0 if all(r.fits is not False for r in reports) else EXIT_NO_FIT


def _force_cpu_devices(n: int) -> None:
  """A GPU cluster's estimate compiles over n fake CPU devices: set before JAX starts."""
  if "jax" in sys.modules:
    return  # a library caller: compiler.devices_for says what to set if too few
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
