"""The prompts of ``precompute --generate``: a file, a built-in task, or cut from a corpus.

``precompute.generate.prompts_from``:

  file   ``prompts_file``, one prompt a line (texts)
  task   the first ``prompts`` training problems of ``data.task`` (texts)
  data   the first ``prompt_tokens`` tokens of each of the first ``prompts`` training rows of
         ``data.source`` (a text corpus, e.g. the built-in stdlib) whose first document holds
         that many tokens: the teacher continues real text (sequence-level KD on a corpus).
         Token ids, not texts: a text decoded and encoded again need not give the same
         tokens, and the student must train on exactly the ids the teacher continued.
  auto   file when ``prompts_file`` is set, else task (the behaviour before the key existed)

The rows are the global training stream of the seeded shuffle (process 0 of 1), so every
writer process sees the same prompts whatever the process count, and validation rows never
become prompts.
"""

from typing import Any

from jaxdistill import paths
from jaxdistill.data import sources, tasks
from jaxdistill.errors import ConfigError

SOURCES = ("auto", "file", "task", "data")
CORPORA = tuple(s for s in sources.TEXT_SOURCES if s != "task")


def source(cfg: Any) -> str:
  """The prompt source ``prompts_from`` resolves to: file, task or data."""
  g = cfg.precompute.generate
  if g.prompts_from == "auto":
    return "file" if g.prompts_file else "task"
  return g.prompts_from


def check(cfg: Any) -> None:
  """``prompts_from``, ``prompts_file`` and ``prompt_tokens`` against ``data``.

  Raises:
    ConfigError: naming the key.
  """
  g = cfg.precompute.generate
  if g.prompts_from not in SOURCES:
    raise ConfigError(
      "precompute.generate.prompts_from", f"unknown {g.prompts_from!r}; choose from {SOURCES}"
    )
  pt = g.prompt_tokens
  if isinstance(pt, bool) or not isinstance(pt, int) or not 1 <= pt < cfg.data.seq_len:
    raise ConfigError(
      "precompute.generate.prompt_tokens",
      f"must be an int in [1, data.seq_len={cfg.data.seq_len}), got {pt!r}",
    )
  kind = source(cfg)
  if kind == "file" and not g.prompts_file:
    raise ConfigError("precompute.generate.prompts_file", "is empty; give one prompt a line")
  if kind == "task" and cfg.data.source != "task":
    raise ConfigError(
      "precompute.generate.prompts_file",
      "is empty and data.source is not a task: give a prompts file (one prompt a line), or "
      "prompts_from=data to cut prompts from the corpus",
    )
  if kind == "data" and cfg.data.source not in CORPORA:
    raise ConfigError(
      "precompute.generate.prompts_from",
      f"'data' cuts prompts from a text corpus; data.source={cfg.data.source!r} is not one "
      "(a task: prompts_from=task)",
    )


def prompts(cfg: Any) -> list:
  """The prompts: texts (file, task) or token-id lists (data); see the module docstring.

  Raises:
    ConfigError: a missing or empty file, or a corpus with too few rows of ``prompt_tokens``.
  """
  g = cfg.precompute.generate
  kind = source(cfg)
  if kind == "task":
    return [p.prompt for p in tasks.problems(cfg.data.task_seed, "train", g.prompts)]
  if kind == "data":
    return from_rows(cfg, g.prompts, g.prompt_tokens)
  if not paths.isfile(g.prompts_file):
    raise ConfigError("precompute.generate.prompts_file", f"no such file {g.prompts_file!r}")
  lines = [line.rstrip("\n") for line in paths.read_text(g.prompts_file).splitlines()]
  found = [line for line in lines if line.strip()]
  if not found:
    raise ConfigError("precompute.generate.prompts_file", f"{g.prompts_file!r} holds no prompt")
  return found


def from_rows(cfg: Any, count: int, length: int, max_batches: int = 100_000) -> list[list[int]]:
  """The first ``length`` token ids of the first ``count`` global training rows whose first
  document has at least ``length`` tokens.

  Args:
    cfg: the config (a text ``data.source``).
    count: prompts wanted.
    length: tokens each.
    max_batches: stop looking after this many batches (an endless stream of short documents).
  Returns:
    ``count`` lists of ``length`` ints.
  Raises:
    ConfigError: fewer rows qualify.
  """
  from jaxdistill import data as data_lib

  out: list[list[int]] = []
  stream = data_lib.make_iterator(cfg, "train", process_index=0, process_count=1)
  for _, batch in zip(range(max_batches), stream):
    seg_BxT = batch.get("segment_ids")
    for b, row in enumerate(batch["inputs"]):
      head = seg_BxT[b][:length] if seg_BxT is not None else None
      if head is not None and (head[0] == 0 or (head != head[0]).any()):
        continue  # padding, or a document shorter than the prompt
      out.append([int(t) for t in row[:length]])
      if len(out) == count:
        return out
  raise ConfigError(
    "precompute.generate.prompts",
    f"only {len(out)} training rows open with a {length}-token document; lower "
    "precompute.generate.prompts or prompt_tokens",
  )
