"""Exact-match accuracy of a decoder's greedy answers on a built-in task's held-out problems.

Per-token CE says how likely the reference solution is; a task with checkable answers asks the
question users care about: does the model, writing on its own, get the answer right? Each of
the first ``count`` held-out problems (``data.task_seed``) is prompted, the model writes
greedily until its end-of-text token or ``max_new_tokens``, and ``tasks.check`` compares the
stated answer with the true one.

  exact_match(module, variables, tokenizer, cfg, count) -> {"exact_match", "problems",
                                                            "answered", "samples"}
"""

from typing import Any

from jaxdistill.data import tasks
from jaxdistill.data import tokenizer as tok_lib
from jaxdistill.generate.sampler import Sampler

SAMPLES = 3  # completions kept in the result, to read


def exact_match(
  module: Any,
  variables: dict,
  tokenizer: Any,
  cfg: Any,
  count: int = 128,
  max_new_tokens: int = 0,
  batch_size: int = 64,
) -> dict[str, Any]:
  """Greedy exact match on the first ``count`` held-out problems of ``cfg.data.task``.

  Args:
    module, variables: a decoder and its variables.
    tokenizer: the run's tokenizer (its end-of-text stops a completion).
    cfg: the run's config (``data.task_seed``, ``data.seq_len``).
    count: problems (at most ``data.task_eval_problems``).
    max_new_tokens: 0 = up to the row length (``data.seq_len``) minus the prompt.
    batch_size: rows decoded together.
  Returns:
    {"exact_match": share of problems answered right, "problems": count, "answered": share
    whose completion states an answer at all, "samples": the first SAMPLES [prompt,
    completion] pairs}.
  """
  count = min(count, cfg.data.task_eval_problems)
  problems = tasks.problems(cfg.data.task_seed, "validation", count)
  prompts = [p.prompt for p in problems]
  longest = max(len(tokenizer.encode(p).ids) for p in prompts)
  room = min(cfg.data.seq_len, module.config.max_len) - longest
  new = max_new_tokens or max(room, 1)
  sampler = Sampler(module, variables, tokenizer, batch_size=batch_size)
  done = sampler.generate(prompts, max_new_tokens=new, stop_tokens=[tok_lib.eos_id(tokenizer)])
  right = [tasks.check(p.prompt, c.text) for p, c in zip(problems, done)]
  answered = [tasks.answer_of(c.text) is not None for c in done]
  return {
    "exact_match": sum(right) / count,
    "problems": count,
    "answered": sum(answered) / count,
    "samples": [[p.prompt, c.text] for p, c in list(zip(problems, done))[:SAMPLES]],
  }
