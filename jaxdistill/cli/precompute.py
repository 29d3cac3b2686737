"""The ``jaxdistill precompute`` command: its flags, the logit cache, --generate, --verify.

Kept apart from ``cli.commands`` (which registers it through ``add_parser`` and dispatches to
``command``) so each file stays small.
"""

from jaxdistill.errors import JaxdistillError
from jaxdistill.parallel import distributed


def add_parser(sub) -> None:
  """Adds the precompute subcommand to ``sub`` (argparse subparsers)."""
  pre = sub.add_parser(
    "precompute",
    help="run the teacher over the training split once and store sparse targets (a cache)",
    epilog="Override any key with --config.SECTION.KEY=VALUE (see the precompute section).",
  )
  pre.add_argument("--config", default=None, help="config file or name (not with --verify)")
  pre.add_argument("--output", required=True, help="cache directory (rerun to resume)")
  pre.add_argument("--verify", action="store_true", help="check a cache against its manifest")
  pre.add_argument(
    "--generate", action="store_true", help="the teacher writes a training set (sequence-level KD)"
  )
  pre.add_argument(
    "--num_samples", type=int, default=0, help="--generate: completions per prompt (0: config)"
  )
  pre.add_argument(
    "--topk",
    type=int,
    default=-1,
    help="--generate: also store the teacher's top-K log-probs at every completion token "
    "(-1: config precompute.generate.topk, 0: none)",
  )
  distributed.add_flags(pre)


def load_config(path: str, overrides):
  """The config file with its overrides, validated."""
  from jaxdistill import config as config_lib
  from jaxdistill.config import validate

  cfg = config_lib.load_config(path, overrides)
  validate.validate(cfg)
  return cfg


def _generate_data(args, overrides) -> int:
  """``precompute --generate``: the teacher writes the set (precompute/generated.py)."""
  from jaxdistill.precompute import generated

  if not args.config:
    raise JaxdistillError("precompute --generate needs --config FILE")
  if args.num_samples < 0:
    raise JaxdistillError(f"--num_samples {args.num_samples}: give 1 or more")
  if args.topk < -1:
    raise JaxdistillError(f"--topk {args.topk}: give 0 (none) or more")
  cfg = load_config(args.config, overrides)
  if args.num_samples:
    cfg.precompute.generate.samples = args.num_samples
  if args.topk >= 0:
    cfg.precompute.generate.topk = args.topk
  distributed.initialize_from_args(args)
  result = generated.run(cfg, args.output)
  if not result["complete"]:
    raise JaxdistillError(f"{args.output} is missing shards another process writes; rerun")
  if distributed.is_primary():
    drops = ", ".join(f"{k} {v}" for k, v in result["drops"].items() if v) or "none"
    print(
      f"done: {result['rows']} samples kept in {result['shards']} shard(s) "
      f"({result['written']} written now, {result['seconds']:.1f} s); dropped: {drops}; "
      f"wrote {args.output}/manifest.json"
    )
  return 0


def command(args, overrides) -> int:
  """Runs ``precompute`` (a cache, ``--generate``, or ``--verify`` of either)."""
  if args.verify or args.generate:
    from jaxdistill.precompute import generated

    if args.verify and generated.is_generated(args.output):
      result = generated.verify(args.output)
      print(
        f"ok: {result['shards']} shards, {result['rows']} rows match {args.output}/manifest.json"
      )
      return 0
    if args.generate:
      return _generate_data(args, overrides)
  if args.verify:
    from jaxdistill.precompute import text as precompute

    result = precompute.verify(args.output)
    print(f"ok: {result['shards']} shards, {result['rows']} rows match {args.output}/manifest.json")
    return 0
  if not args.config:
    raise JaxdistillError("precompute needs --config FILE (or --verify to check a cache)")
  cfg = load_config(args.config, overrides)
  plan = distributed.initialize_from_args(args)  # before any other JAX call
  if plan.source != "none":
    distributed.quiet_unless_primary()
  from jaxdistill.precompute import text as precompute

  result = precompute.run(cfg, args.output)
  if not result["complete"]:
    raise JaxdistillError(
      f"{args.output} is missing shards another process should have written; rerun to finish"
    )
  # Every process's rows: process 0 may have had nothing left while another had (a rerun).
  if distributed.is_primary() and result.get("job_computed_rows", result["computed_rows"]) == 0:
    print(
      f"nothing to compute: {args.output} already holds its {result['rows']} rows in "
      f"{result['shards']} shard(s) (manifest.json)"
    )
  elif distributed.is_primary():
    unit = "images" if "images" in result else "tokens"  # an image classifier's cache
    print(
      f"done: {result['rows']} rows in {result['shards']} shard(s) ({result['computed_rows']} "
      f"computed here, {result[unit] / max(result['seconds'], 1e-9):,.0f} {unit}/s); "
      f"wrote {args.output}/manifest.json"
    )
  return 0
