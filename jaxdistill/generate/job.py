"""``jaxdistill generate``: completions of prompts from a finished run, a Hugging Face model or a
built-in config, printed or written to a resumable .jsonl file.

  run(Request(...))    the whole command; returns a summary

The model comes from ``generate.load`` (a run's student or teacher, a Hugging Face directory,
a config's random init); prompts and stop tokens are checked by ``generate.prompts``; rows are
written by ``generate.output`` (request order, fsync per batch, resumed on restart). Prompts
run in batches of whole prompts (``batch_size`` rows): batch k always holds the same prompts,
and rows draw keys from (seed, row, step) (``Sampler(prompt_offset=)``), so a restarted run
regenerates exactly the rows it had not written. ``--draft`` hands the batches to
``generate.speculative`` (imported only then).
"""

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable

from jaxdistill import paths
from jaxdistill.errors import JaxdistillError
from jaxdistill.generate import output
from jaxdistill.generate import prompts as prompts_lib
from jaxdistill.generate.load import Loaded, check_same_tokenizer, load_model
from jaxdistill.generate.sampler import Completion, Sampler


@dataclasses.dataclass(frozen=True)
class Request:
  """The arguments of ``jaxdistill generate`` (the CLI's flags, same names; see there)."""

  workdir: str = ""
  model: str = ""
  which: str = "student"
  prompts: str = ""
  from_data: int = 0
  prompt_tokens: int = 16
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  seed: int = 0
  num_samples: int = 1
  stop: tuple[str, ...] | None = None
  batch_size: int = 8
  logprobs: bool = False
  output: str = ""
  draft: str = ""
  draft_k: int = 4
  speedup: bool = False
  sharded: bool = False


def check_request(req: Request) -> None:
  """Counts and the model / prompt sources, before anything is loaded."""
  if bool(req.workdir) == bool(req.model):
    raise JaxdistillError(
      "give exactly one model: --workdir W (a finished run) or --model M (a Hugging Face "
      "directory or a config name)"
    )
  if bool(req.prompts) == bool(req.from_data):
    raise JaxdistillError("give exactly one of --prompts FILE (one a line) or --from_data N")
  for flag in ("max_new_tokens", "num_samples", "batch_size", "prompt_tokens", "draft_k"):
    if getattr(req, flag) < 1:
      raise JaxdistillError(f"--{flag} {getattr(req, flag)}: give 1 or more")
  if req.from_data < 0:
    raise JaxdistillError(f"--from_data {req.from_data}: give the number of prompts (1 or more)")
  if req.which not in ("student", "teacher"):
    raise JaxdistillError(f"--which {req.which!r}: choose student or teacher")
  if req.which == "teacher" and not req.workdir:
    raise JaxdistillError("--which teacher needs --workdir (a run that knows its teacher)")


# --- the run ---------------------------------------------------------------------------------


def _prompts(req: Request, loaded: Loaded) -> tuple[list[str], list[list[int]]]:
  if req.from_data:
    if loaded.cfg is None:
      raise JaxdistillError(
        "--from_data needs a run or a config (its eval data); a Hugging Face directory has "
        "none: pass --prompts FILE"
      )
    found = prompts_lib.from_data(loaded.cfg, req.from_data, req.prompt_tokens, loaded.tokenizer)
  else:
    found = prompts_lib.from_file(req.prompts, loaded.tokenizer)
  texts, ids, where = found
  prompts_lib.check(ids, where, loaded.module.config)
  return texts, ids


def _settings(req: Request, ids: list[list[int]], sampling: Any, stops) -> dict:
  """What decides the rows' content (the --output sidecar's hash); not the batch size."""
  where = lambda p: paths.abspath(p) if p and paths.exists(p) else p  # noqa: E731
  return {
    "model": {"workdir": where(req.workdir), "model": where(req.model), "which": req.which},
    "draft": {"workdir": where(req.draft), "k": req.draft_k} if req.draft else None,
    "prompts": hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16],
    "num_prompts": len(ids),
    "max_new_tokens": req.max_new_tokens,
    "sampling": dataclasses.asdict(sampling),
    "seed": req.seed,
    "num_samples": req.num_samples,
    "stop": list(stops),
    "logprobs": req.logprobs,
  }


def run(req: Request, echo: Callable[[str], None] = print) -> dict:
  """The ``generate`` command: load, check, generate, print or write (see the module doc).

  Returns:
    {"rows": rows made now, "skipped": rows already in --output, "tokens", "seconds"}, plus
    "acceptance_rate", "tokens_per_forward" and (with --speedup) "speedup" with --draft.
  """
  check_request(req)
  fields = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
  sampling = prompts_lib.sampling_params(**{f: getattr(req, f) for f in fields})
  loaded = load_model(req.workdir, req.model, req.which, req.sharded)
  for note in loaded.notes:
    echo(f"note: {note}")
  texts, ids = _prompts(req, loaded)
  stops = prompts_lib.stop_ids(req.stop, loaded.tokenizer, loaded.module.config.vocab_size)
  expected = [(p, s) for p in range(len(ids)) for s in range(req.num_samples)]
  start = 0
  if req.output:
    start = output.open_output(req.output, _settings(req, ids, sampling, stops), expected)
  if start == len(expected):
    echo(f"nothing to do: {req.output} already holds all {start} rows")
    return {"rows": 0, "skipped": start, "tokens": 0, "seconds": 0.0}
  kwargs = dict(max_new_tokens=req.max_new_tokens, sampling=sampling, seed=req.seed)
  kwargs.update(stop_tokens=stops)
  stats: list = []
  if req.draft:
    generate_fn = _speculative_fn(req, loaded, kwargs, stats)
  else:
    sampler = Sampler(
      loaded.module, loaded.variables, loaded.tokenizer, loaded.mesh, loaded.rules, req.batch_size
    )
    kwargs.update(num_samples=req.num_samples, logprobs=req.logprobs)
    generate_fn = lambda batch, p0: sampler.generate(batch, prompt_offset=p0, **kwargs)  # noqa: E731
  began, rows, tokens = time.perf_counter(), 0, 0
  per_batch = max(1, req.batch_size // req.num_samples)  # whole prompts per batch
  for p0 in range(0, len(ids), per_batch):
    if (p0 + per_batch) * req.num_samples <= start:
      continue  # already in --output
    done = [c for c in generate_fn(ids[p0 : p0 + per_batch], p0) if c.index >= start]
    made = [
      output.row(c, texts[c.index // req.num_samples], req.num_samples, req.logprobs) for c in done
    ]
    if req.output:
      output.append(req.output, made)
    for r in made if not req.output else ():
      echo(output.format_row(r, loaded.tokenizer is not None))
    rows, tokens = rows + len(made), tokens + sum(len(c.token_ids) for c in done)
  summary = {"rows": rows, "skipped": start, "tokens": tokens}
  summary["seconds"] = time.perf_counter() - began
  if stats:
    summary.update(_speculative_summary(stats))
    timed = f", speedup {summary['speedup']:.2f}x over the target alone" if req.speedup else ""
    echo(
      f"speculative: acceptance rate {summary['acceptance_rate']:.1%} (k={req.draft_k}), "
      f"{summary['tokens_per_forward']:.2f} tokens per target forward{timed}"
    )
  wrote = f"; wrote {req.output}" if req.output else ""
  wrote += f" ({start} rows were already there)" if start else ""
  echo(
    f"done: {rows} completion(s), {tokens} tokens in {summary['seconds']:.1f} s "
    f"({tokens / max(summary['seconds'], 1e-9):,.0f} tokens/s, compilation included){wrote}"
  )
  return summary


# --- speculative decoding (--draft) ----------------------------------------------------------


def _speculative_fn(req: Request, target: Loaded, kwargs: dict, stats: list) -> Callable:
  """``run``'s generate_fn through ``SpeculativeSampler``, the run ``--draft`` as draft."""
  from jaxdistill.generate.speculative import SpeculativeSampler

  draft = load_model(req.draft, "", "student", req.sharded, flag="--draft")
  check_same_tokenizer(target, draft, req.draft)
  sampler = SpeculativeSampler(
    target.module, target.variables, draft.module, draft.variables, target.tokenizer, k=req.draft_k
  )

  def generate_fn(batch, p0):
    repeated = [p for p in batch for _ in range(req.num_samples)]
    done, batch_stats = sampler.generate(repeated, **kwargs, speedup=req.speedup)
    stats.append(batch_stats)
    first = p0 * req.num_samples
    return [_with_index(c, first + j, req.logprobs) for j, c in enumerate(done)]

  return generate_fn


def _with_index(c: Any, index: int, logprobs: bool) -> Completion:
  return Completion(
    index=index,
    prompt=c.prompt,
    prompt_ids=list(c.prompt_ids),
    token_ids=list(c.token_ids),
    text=c.text,
    logprobs=getattr(c, "logprobs", None) if logprobs else None,
    stop_reason=c.stop_reason,
  )


def _speculative_summary(stats: list) -> dict:
  """The batches' accepted / proposed draft tokens, tokens per target forward and (when timed)
  the target-alone wall time over the speculative one, all pooled over batches."""
  total = lambda name: sum(getattr(s, name) for s in stats)  # noqa: E731
  out = {
    "acceptance_rate": total("accepted") / max(total("proposed"), 1),
    "tokens_per_forward": total("tokens") / max(total("target_forwards"), 1),
  }
  if all(s.target_seconds is not None for s in stats):
    out["speedup"] = total("target_seconds") / max(total("seconds"), 1e-9)
  return out
