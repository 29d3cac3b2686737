"""The ``jaxdistill generate`` command: its flags and the call of ``generate.job.run``.

Kept apart from ``cli.commands`` (which registers it through ``add_parser`` and dispatches to
``command``) so each file stays small. Flags map one to one onto ``generate.job.Request``.
"""

import argparse

from jaxdistill.errors import JaxdistillError

EPILOG = """\
examples:
  jaxdistill generate --workdir runs/kd --prompts prompts.txt --max_new_tokens 64
  jaxdistill generate --model hf/gpt2 --prompts p.txt --temperature 0.8 --top_p 0.95 --num_samples 4
  jaxdistill generate --workdir runs/kd --from_data 32 --output out.jsonl   (rerun to resume)

A killed --output run restarted with the same arguments appends only the missing rows."""


def add_parser(sub) -> None:
  """Adds the generate subcommand to ``sub`` (argparse subparsers)."""
  gen = sub.add_parser(
    "generate",
    help="sample completions of prompts from a run's student or teacher, or an HF model",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  src = gen.add_argument_group("model (exactly one of --workdir, --model)")
  src.add_argument("--workdir", default="", help="a finished run (its student by default)")
  src.add_argument("--which", choices=("student", "teacher"), default="student")
  src.add_argument(
    "--model", default="", help="a Hugging Face model dir, or a config name/file (random init)"
  )
  src.add_argument("--draft", default="", help="speculative decoding: a run whose student drafts")
  src.add_argument("--draft_k", type=int, default=4, help="draft tokens per target forward")
  src.add_argument(
    "--speedup", action="store_true", help="with --draft: also time the target alone (4 runs)"
  )
  src.add_argument("--sharded", action="store_true", help="run on the config's mesh (all devices)")
  pro = gen.add_argument_group("prompts (exactly one of --prompts, --from_data)")
  pro.add_argument("--prompts", default="", help="text file, one prompt a line (blanks skipped)")
  pro.add_argument("--from_data", type=int, default=0, help="N prompts cut from the eval data")
  pro.add_argument("--prompt_tokens", type=int, default=16, help="--from_data prompt length")
  smp = gen.add_argument_group("sampling (default: greedy)")
  smp.add_argument("--max_new_tokens", type=int, default=64)
  smp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  smp.add_argument("--top_k", type=int, default=0, help="0 = all tokens")
  smp.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (1 = all)")
  smp.add_argument("--min_p", type=float, default=0.0, help="min prob relative to the top token")
  smp.add_argument("--repetition_penalty", type=float, default=1.0, help="1 = off")
  smp.add_argument("--seed", type=int, default=0)
  smp.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
  smp.add_argument(
    "--stop",
    action="append",
    default=None,
    help="a stop token (string or id; repeat the flag for more); default: end-of-text",
  )
  out = gen.add_argument_group("output")
  out.add_argument("--batch_size", type=int, default=8, help="rows decoded together")
  out.add_argument("--logprobs", action="store_true", help="each token's log-probability")
  out.add_argument("--output", default="", help="FILE.jsonl (resumable); default: print")


def command(args, overrides) -> int:
  if overrides:
    raise JaxdistillError("generate takes no --config overrides")
  from jaxdistill.generate import job

  fields = {f: getattr(args, f) for f in job.Request.__dataclass_fields__ if hasattr(args, f)}
  fields["stop"] = tuple(args.stop) if args.stop is not None else None
  job.run(job.Request(**fields))
  return 0
