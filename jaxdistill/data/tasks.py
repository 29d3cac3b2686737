"""Built-in tasks whose answers can be checked: multi-digit addition with a worked solution.

Distilling a generator needs a task where a sample is right or wrong, not only likely: the
verifier of teacher-written data (keep only samples whose answer checks) and the exact-match
accuracy of greedy answers both need one. ``arithmetic`` is small enough for two CPU cores:

  prompt      "347+85="
  completion  "5+7=12 c1;4+8+1=13 c1;3+0+1=4 c0;=432\\n"

The worked solution adds the digits column by column from the right, with the carry, so a
small model can learn the algorithm instead of memorising sums; the line ends with the answer
after ``=`` and a newline (the stop token). Problems are a pure function of (seed, split,
index): ``problem(seed, "train", i)`` is the same on every machine and process, and the
held-out split draws from a disjoint stream (a problem's split is a hash of its operands, so
no held-out problem appears in training).

  problem(seed, split, index) -> Problem(prompt, completion, answer)
  problems(seed, split, count) -> list[Problem]
  check(prompt, completion) -> bool    exact match of the final answer (the verifier)
  answer_of(completion) -> int | None  the final answer a completion states
"""

import dataclasses
import hashlib
import random
import re

SPLITS = ("train", "validation")
MIN_DIGITS, MAX_DIGITS = 1, 4
_PROMPT = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")
_ANSWER = re.compile(r";=(-?\d+)\s*(?:\n|$)")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem: the prompt, the reference completion and the true answer."""

  prompt: str
  completion: str
  answer: int


def worked_solution(a: int, b: int) -> str:
  """The column-by-column solution of a + b, ending with ";=<sum>\\n" (see the module doc)."""
  da, db = str(a)[::-1], str(b)[::-1]
  steps, carry = [], 0
  for i in range(max(len(da), len(db))):
    x = int(da[i]) if i < len(da) else 0
    y = int(db[i]) if i < len(db) else 0
    total = x + y + carry
    term = f"{x}+{y}" + (f"+{carry}" if carry else "")
    carry = total // 10
    steps.append(f"{term}={total} c{carry}")
  return ";".join(steps) + f";={a + b}\n"


def _split_of(a: int, b: int) -> str:
  """The split an operand pair belongs to: about 1 in 8 pairs is held out."""
  digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
  return "validation" if digest[0] % 8 == 0 else "train"


def problem(seed: int, split: str, index: int) -> Problem:
  """The ``index``-th problem of ``split`` (a pure function of its arguments).

  Args:
    seed: the task's seed.
    split: "train" or "validation".
    index: >= 0.
  Raises:
    ValueError: an unknown split or a negative index.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if index < 0:
    raise ValueError(f"index must be >= 0, got {index}")
  rng = random.Random(f"{seed}/{split}/{index}")
  while True:  # rejection: the pair must belong to the split (expected 1.1 or 8 draws)
    a = rng.randrange(10 ** rng.randint(MIN_DIGITS, MAX_DIGITS))
    b = rng.randrange(10 ** rng.randint(MIN_DIGITS, MAX_DIGITS))
    if _split_of(a, b) == split:
      return Problem(f"{a}+{b}=", worked_solution(a, b), a + b)


def problems(seed: int, split: str, count: int) -> list[Problem]:
  """The first ``count`` problems of ``split``."""
  return [problem(seed, split, i) for i in range(count)]


def answer_of(completion: str) -> int | None:
  """The final answer a completion states (after ";="), or None when it states none."""
  match = _ANSWER.search(completion)
  return int(match.group(1)) if match else None


def check(prompt: str, completion: str) -> bool:
  """Whether ``completion`` ends with the right answer to ``prompt`` (exact match).

  Only the final answer counts (a wrong intermediate step with a right answer passes: the
  check is what a user of the answer sees). A prompt that is not "<a>+<b>=" raises ValueError.
  """
  match = _PROMPT.match(prompt)
  if not match:
    raise ValueError(f"not an arithmetic prompt: {prompt!r}")
  stated = answer_of(completion)
  return stated is not None and stated == int(match.group(1)) + int(match.group(2))
