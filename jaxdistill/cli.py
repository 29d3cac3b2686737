"""The ``jaxdistill`` command. Thin: parse arguments, load the config, call the library.

  jaxdistill train --config FILE [--config.KEY=VALUE ...] --workdir DIR

Errors a user can cause print one line ``error: ...`` and exit with status 2.
"""

import argparse
import os
import sys
from typing import Sequence

from jaxdistill.errors import JaxdistillError

EXIT_USAGE = 2


def _split_overrides(extra: Sequence[str]) -> list[tuple[str, str]]:
  """``--config.a.b=v`` / ``--config.a.b v`` -> [("a.b", "v")]."""
  out, i = [], 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith("--config."):
      raise JaxdistillError(
        f"unknown argument {arg!r}; overrides look like --config.distill.temperature=2.0"
      )
    key, sep, value = arg[len("--config.") :].partition("=")
    if not sep:
      if i + 1 >= len(extra):
        raise JaxdistillError(f"{arg} needs a value, e.g. {arg}=VALUE")
      value, i = extra[i + 1], i + 1
    out.append((key, value))
    i += 1
  return out


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxdistill", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  train = sub.add_parser(
    "train",
    help="train or distil a model from a config file",
    epilog="Override any key with --config.SECTION.KEY=VALUE.",
  )
  train.add_argument("--config", required=True, help="Python config file (configs/*.py)")
  train.add_argument("--workdir", required=True, help="directory for metrics and params")
  return parser


def _train(args, overrides) -> int:
  from jaxdistill import config as config_lib

  cfg = config_lib.load_config(args.config, overrides)
  from jaxdistill import loop  # imports jax: only after the config is known good

  summary = loop.train(cfg, args.workdir)
  print(
    f"done: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
    f"{summary['final_loss']:.4f}, {summary['median_step_s'] * 1e3:.1f} ms/step, "
    f"{summary['tokens_per_s']:,.0f} tokens/s; wrote "
    f"{os.path.join(args.workdir, 'metrics.jsonl')}"
  )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, extra = parser.parse_known_args(argv)
  try:
    overrides = _split_overrides(extra)
    if args.command == "train":
      return _train(args, overrides)
  except JaxdistillError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  return 0


if __name__ == "__main__":
  sys.exit(main())
