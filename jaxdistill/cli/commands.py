"""The ``jaxdistill`` command line (developer notes; users read ``DESCRIPTION`` via --help).

Thin: parse arguments, load and validate the config, call the library (``loop``,
``precompute``, ``quickstart``, ``eval_run``, ``embed``, ``report``, ``models.hf_export``,
``generate.job``).
JAX is imported only after the config is known good (a multi-process run initialises it
first). Errors a user can cause (``JaxdistillError``, and argparse's usage errors) print one
line ``error: ...`` and exit with status 2; anything else is a bug and keeps its traceback.
"""

import argparse
import os
import sys
from typing import Any, Sequence

from jaxdistill.cli import compile as cli_compile
from jaxdistill.cli import compress as cli_compress
from jaxdistill.cli import generate as cli_generate
from jaxdistill.cli import precompute as cli_precompute
from jaxdistill.errors import JaxdistillError
from jaxdistill.parallel import distributed

EXIT_USAGE = 2

DESCRIPTION = """\
Knowledge distillation for JAX: train a small student model to imitate a large frozen
teacher (its logits, attention and hidden states), on one CPU or a TPU / GPU cluster.
A run is described by a config file (Python, see configs/), given by path or by the name of
one jaxdistill ships (smoke, quickstart:distill, ...); any key can be overridden with
--config.SECTION.KEY=VALUE (one of the further teachers: --config.teachers[I].KEY=VALUE),
and rerunning the same command resumes a stopped run.

examples:
  jaxdistill quickstart --size test        the whole job, small, on a built-in corpus
  jaxdistill quickstart --task vision      the same with CNNs on the built-in digits
  jaxdistill train --config smoke --workdir runs/smoke       (or --config configs/smoke.py)
  jaxdistill precompute --config FILE --output DIR    teacher targets stored on disk
  jaxdistill embed --model DIR --input FILE --output FILE.npy
  jaxdistill eval --workdir runs/smoke --latency     student and teacher metrics, latency
  jaxdistill export --workdir runs/smoke --output DIR
  jaxdistill generate --workdir runs/kd --prompts FILE     completions from a run's student
  jaxdistill compile --config configs/llama70b_to_8b.py --topology v5p-128   pod preflight
  jaxdistill report runs/kd runs/ce --output reports/kd   table + curves of evaluated runs
  jaxdistill pipeline --config configs/progressive.py --workdir runs/prog   distil, prune, int8
  jaxdistill prune --workdir runs/kd --output runs/kd-pruned --targets d_ff=0.5,num_heads=0.75
  jaxdistill quantize --workdir runs/kd --output runs/kd-int8     post-training int8"""

EPILOG = "Mistakes print one line 'error: ...' and exit with status 2."


class _Parser(argparse.ArgumentParser):
  """argparse with its usage errors as one ``error: ...`` line (exit 2), like ours."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


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


def build_parser() -> argparse.ArgumentParser:
  """Every command and flag; ``main`` and tests/unit/test_docs.py parse with it (runs nothing)."""
  parser = _Parser(
    prog="jaxdistill",
    description=DESCRIPTION,
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
  train = sub.add_parser(
    "train",
    help="train or distil a model from a config file",
    epilog="Override any key with --config.SECTION.KEY=VALUE.",
  )
  train.add_argument("--config", required=True, help="config FILE[:ARG] or name (smoke[:ARG])")
  train.add_argument("--workdir", required=True, help="directory for metrics and params")
  train.add_argument(
    "--resume_from",
    default=None,
    help="a checkpoint STEP of this workdir (e.g. to skip a corrupted latest one), or another "
    "run's checkpoint directory (used when this workdir has none)",
  )
  distributed.add_flags(train)
  cli_precompute.add_parser(sub)
  quick = sub.add_parser(
    "quickstart",
    help="the main job: teacher -> KD student vs CE student on the built-in corpus, with a report",
  )
  quick.add_argument("--workdir", default=None, help="default: workdirs/quickstart-TIMESTAMP")
  quick.add_argument("--size", choices=("full", "test"), default="full", help="test: seconds")
  quick.add_argument(
    "--task",
    choices=("text", "vision", "arithmetic"),
    default="text",
    help="text: LMs on the built-in corpus; vision: CNNs on the built-in digits; arithmetic: "
    "token KD vs sequence KD vs on-policy on a task with checkable answers",
  )
  quick.add_argument("--cache_dir", default="", help="default: $JAXDISTILL_CACHE_DIR or ~/.cache")
  emb = sub.add_parser("embed", help="sentence embeddings (one per input line) from an encoder")
  emb.add_argument("--model", required=True, help="HF encoder dir or a distilled encoder workdir")
  emb.add_argument("--input", required=True, help="text file, one sentence per line")
  emb.add_argument("--output", required=True, help="float32 [n, d] array written with numpy.save")
  emb.add_argument("--batch_size", type=int, default=64, help="sentences per forward pass")
  ev = sub.add_parser(
    "eval",
    help="measure a finished run's student (and teacher) on its validation split or other data",
    epilog="Evaluate on other data with --config.data.KEY=VALUE (data.*, mesh.*, cache_dir).",
  )
  ev.add_argument("--workdir", required=True, help="the run's workdir")
  ev.add_argument("--step", type=int, default=None, help="a checkpointed step (default: final)")
  ev.add_argument("--name", default="", help="result name: WORKDIR/eval/NAME.json")
  ev.add_argument("--batches", type=int, default=0, help="validation batches (0 = whole split)")
  ev.add_argument("--latency", action="store_true", help="also time the forward and generation")
  ev.add_argument(
    "--teacher", default="", help="compare with this run's student instead of the run's teacher"
  )
  ev.add_argument("--batch_sizes", default="1,32", help="latency batch sizes: 1, a serving one")
  exp = sub.add_parser("export", help="a finished run's student as a Hugging Face model dir")
  exp.add_argument("--workdir", required=True, help="the run's workdir (final_params/)")
  exp.add_argument("--output", required=True, help="new directory: config.json, safetensors")
  rep = sub.add_parser(
    "report",
    help="a Markdown report with curves and a table comparing evaluated runs",
    epilog="Each run needs eval/NAME.json (jaxdistill eval --workdir W; --latency for latency).",
  )
  rep.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run workdirs, in table order")
  rep.add_argument("--output", required=True, help="new directory for report.md, .json and PNGs")
  rep.add_argument("--eval_name", default="validation", help="which W/eval/NAME.json to read")
  rep.add_argument("--names", default="", help="display names a,b,... (default: directory names)")
  cli_compress.add_parsers(sub)
  cli_generate.add_parser(sub)
  cli_compile.add_parser(sub)
  return parser


def _check_dir_flag(flag: str, path: str) -> None:
  """A directory flag whose path (or the ancestor it would be made in) is a file: an error.
  ``gs://`` paths are looked at through epath (``paths``)."""
  from jaxdistill import paths

  existing = paths.nearest_existing(path)
  if paths.exists(existing) and not paths.isdir(existing):
    raise JaxdistillError(f"{flag} {path!r} is no directory ({existing!r} is a file)")


def _embed(args) -> int:
  from jaxdistill.evaluation import embed

  emb_NxD = embed.run(args.model, args.input, args.output, batch_size=args.batch_size)
  print(f"done: {emb_NxD.shape[0]} embeddings of width {emb_NxD.shape[1]}; wrote {args.output}")
  return 0


def _export(args) -> int:
  from jaxdistill.evaluation import embed
  from jaxdistill.models import hf_export
  from jaxdistill.train import workdir as workdir_lib

  _check_dir_flag("--output", args.output)
  hfm, params = workdir_lib.load_workdir(args.workdir)
  # An encoder keeps the sentence length its workdir embeds with (``jaxdistill embed``).
  seq_len = embed.max_seq_length(args.workdir, hfm.config.max_len) if hfm.is_encoder else 0
  hf_export.export(params, hfm, args.output, tokenizer_dir=args.workdir, seq_len=seq_len)
  print(f"done: wrote a {hfm.model_type} model to {args.output}")
  return 0


def _eval(args, overrides) -> int:
  try:
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
  except ValueError:
    sizes = ()
  if not sizes or min(sizes) < 1:
    raise JaxdistillError(f"--batch_sizes {args.batch_sizes!r}: give positive integers, e.g. 1,32")
  if args.batches < 0:
    raise JaxdistillError(f"--batches {args.batches}: give 0 (the whole split) or more")
  from jaxdistill.evaluation import job as eval_run

  result = eval_run.evaluate_workdir(
    args.workdir,
    step=args.step,
    overrides=overrides,
    name=args.name,
    batches=args.batches,
    with_latency=args.latency,
    batch_sizes=sizes,
    teacher_dir=args.teacher,
  )
  print(eval_run.format_table(result))
  print(f"wrote {os.path.join(args.workdir, 'eval', result['name'] + '.json')}")
  return 0


def _run_names(workdirs: list[str], names: str) -> dict[str, str]:
  """Display name -> workdir: --names, or each workdir's last path component."""
  if names:
    given = [n.strip() for n in names.split(",")]
    if len(given) != len(workdirs) or not all(given):
      raise JaxdistillError(
        f"--names gives {len(given)} name(s) for {len(workdirs)} workdir(s); pass one per run"
      )
  else:
    given = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(given)) != len(given):
    twice = sorted({n for n in given if given.count(n) > 1})
    raise JaxdistillError(f"two runs are named {twice[0]!r}; pass --names a,b,...")
  return dict(zip(given, workdirs))


def _report(args) -> int:
  from jaxdistill.report import write as report

  _check_dir_flag("--output", args.output)
  result = report.write(_run_names(args.workdirs, args.names), args.output, args.eval_name)
  print(result["table"])
  print(result["pareto_note"])
  print("wrote " + ", ".join(result["files"].values()))
  return 0


def _quickstart(args) -> int:
  import time

  from jaxdistill import quickstart

  workdir = args.workdir or os.path.join("workdirs", time.strftime("quickstart-%Y%m%d-%H%M%S"))
  _check_dir_flag("--workdir", workdir)
  if args.cache_dir:
    _check_dir_flag("--cache_dir", args.cache_dir)
  try:
    if args.task == "arithmetic":
      from jaxdistill import task_quickstart

      task_quickstart.run(workdir, size=args.size, cache_dir=args.cache_dir)
      return 0
    quickstart.run(workdir, size=args.size, cache_dir=args.cache_dir, task=args.task)
  except quickstart.Interrupted as e:
    print(
      f"interrupted: a checkpoint is saved in {e}; run the same command with "
      f"--workdir {workdir} to resume"
    )
  return 0


def _load_config(path: str, overrides) -> Any:
  """The config file with its overrides, validated (``validate.validate``: every check)."""
  from jaxdistill import config as config_lib
  from jaxdistill.config import validate

  cfg = config_lib.load_config(path, overrides)
  validate.validate(cfg)
  return cfg


def _train(args, overrides) -> int:
  cfg = _load_config(args.config, overrides)
  # Before any other JAX call; a no-op for a single process.
  plan = distributed.initialize_from_args(args)
  if plan.source != "none":
    distributed.quiet_unless_primary()
    if distributed.is_primary():
      print(distributed.summary_line(plan), flush=True)
  from jaxdistill.train import loop  # imports jax: only after the config is known good

  summary = loop.train(cfg, args.workdir, resume_from=args.resume_from)
  if not distributed.is_primary():  # the job's messages come from process 0 only
    return 0
  if summary["preempted"]:
    print(
      f"preempted: saved a checkpoint at step {summary['last_step']} in {args.workdir}; "
      "run the same command again to resume"
    )
    return 0
  if summary["first_loss"] is None:
    print(f"nothing to do: {args.workdir} is already at step {summary['last_step']}")
    return 0
  unit = "images" if "images_per_s" in summary else "tokens"
  print(
    f"done: {summary['steps']} steps, loss {summary['first_loss']:.4f} -> "
    f"{summary['final_loss']:.4f}, {summary['median_step_s'] * 1e3:.1f} ms/step, "
    f"{summary[unit + '_per_s']:,.0f} {unit}/s; wrote "
    f"{os.path.join(args.workdir, 'metrics.jsonl')}"
  )
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  from jaxdistill.preflight import tpu_env

  tpu_env.cpu_only_default()  # libtpu installed on a CPU-only host: no TPU start attempt
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  try:
    overrides = _split_overrides(extra)
    if args.command == "quickstart":
      if overrides:
        raise JaxdistillError("quickstart takes no --config overrides; see configs/lm_*.py")
      return _quickstart(args)
    if args.command == "train":
      return _train(args, overrides)
    if args.command == "eval":
      return _eval(args, overrides)
    if args.command == "report":
      if overrides:
        raise JaxdistillError("report takes no --config overrides")
      return _report(args)
    if args.command in ("embed", "export"):
      if overrides:
        raise JaxdistillError(f"{args.command} takes no --config overrides")
      return _export(args) if args.command == "export" else _embed(args)
    if args.command == "precompute":
      return cli_precompute.command(args, overrides)
    if args.command == "generate":
      return cli_generate.command(args, overrides)
    if args.command == "compile":
      return cli_compile.command(args, overrides)
    if args.command in cli_compress.COMMANDS:
      return cli_compress.COMMANDS[args.command](args, overrides)
  except JaxdistillError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_USAGE
  return 0


if __name__ == "__main__":
  sys.exit(main())
