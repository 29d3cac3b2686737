"""The compression commands of ``jaxdistill``: ``pipeline``, ``prune``, ``quantize``.

Kept apart from ``cli`` (which registers them through ``add_parsers`` and dispatches through
``COMMANDS``) so each file stays small. Like the rest of the CLI: parse, check what can be
checked without JAX, call the library (``pipeline``, ``prune_run``, ``quantize``), print one
summary line; a user's mistake is a ``JaxdistillError`` (one ``error:`` line, exit 2).
"""

import argparse
import os

from jaxdistill.errors import JaxdistillError


def add_parsers(sub) -> None:
  """Adds the pipeline / prune / quantize subcommands to ``sub`` (argparse subparsers)."""
  pipe = sub.add_parser(
    "pipeline",
    help="a progressive compression pipeline (distil, prune, quantise, export) with a report",
    epilog="Rerun the same command to resume; --config.SECTION.KEY=VALUE applies to every "
    "train / distil stage.",
  )
  pipe.add_argument(
    "--config",
    required=True,
    help="pipeline file or name, e.g. configs/progressive.py, progressive",
  )
  pipe.add_argument("--workdir", required=True, help="the pipeline's directory (stages inside)")
  prune = sub.add_parser("prune", help="structured pruning of a finished run into a new workdir")
  prune.add_argument("--workdir", required=True, help="a finished run (final_params/)")
  prune.add_argument("--output", required=True, help="new workdir for the smaller model")
  prune.add_argument(
    "--targets",
    required=True,
    help="what to keep, KEY=COUNT or KEY=FRACTION: num_heads, d_ff, d_model, num_layers, "
    "cnn_channels, cnn_fc (e.g. d_ff=0.5,num_heads=0.75)",
  )
  prune.add_argument("--method", choices=("activation", "gradient"), default="activation")
  prune.add_argument("--calibration_batches", type=int, default=8, help="training batches scored")
  quant = sub.add_parser(
    "quantize", help="post-training int8 quantisation of a finished run into a new workdir"
  )
  quant.add_argument("--workdir", required=True, help="a finished float run (final_params/)")
  quant.add_argument("--output", required=True, help="new workdir (int8/, config.json)")
  quant.add_argument("--act", choices=("symmetric", "asymmetric"), default="symmetric")
  quant.add_argument(
    "--calibration_batches", type=int, default=8, help="activation scales' batches"
  )


def parse_targets(text: str) -> dict:
  """``d_ff=0.5,num_heads=3`` -> {"d_ff": 0.5, "num_heads": 3} (ints stay ints: counts)."""
  targets = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    try:
      targets[key.strip()] = int(value) if value.strip().isdigit() else float(value)
    except ValueError:
      sep = ""
    if not sep or not key.strip():
      raise JaxdistillError(f"--targets {text!r}: write KEY=VALUE pairs, e.g. d_ff=0.5,num_heads=3")
  if not targets:
    raise JaxdistillError("--targets is empty; e.g. d_ff=0.5,num_heads=0.75")
  return targets


def _pipeline(args: argparse.Namespace, overrides) -> int:
  from jaxdistill.compress import pipeline

  state = pipeline.run(args.config, args.workdir, overrides)
  final = pipeline.final_stage(state)
  print(
    f"done: {len(state['stages'])} stages; final student {final['name']}: "
    f"{final['size']['params']:,} params, {final['size']['bytes']:,} bytes; wrote "
    f"{state['report']} and {os.path.join(args.workdir, pipeline.STATE_FILE)}"
  )
  return 0


def _prune(args: argparse.Namespace, overrides) -> int:
  if overrides:
    raise JaxdistillError("prune takes no --config overrides")
  targets = parse_targets(args.targets)
  from jaxdistill.compress import prune_job as prune_run

  record = prune_run.prune_workdir(
    args.workdir, args.output, targets, args.calibration_batches, args.method
  )
  print(
    f"done: {record['params_before']:,} -> {record['params_after']:,} params "
    f"({', '.join(f'{k}={v}' for k, v in record['changed'].items())}); wrote {args.output}"
  )
  return 0


def _quantize(args: argparse.Namespace, overrides) -> int:
  if overrides:
    raise JaxdistillError("quantize takes no --config overrides")
  from jaxdistill.compress import ptq as quantize

  quantize.ptq_workdir(args.workdir, args.output, args.calibration_batches, args.act)
  print(
    f"done: int8 model in {os.path.join(args.output, 'int8')}; evaluate it with "
    f"jaxdistill eval --workdir {args.output}"
  )
  return 0


COMMANDS = {"pipeline": _pipeline, "prune": _prune, "quantize": _quantize}
