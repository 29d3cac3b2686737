"""The built-in checkable task (data/tasks.py): its worked solutions, splits and checker."""

import pytest

from jaxdistill.data import tasks


def test_worked_solution_by_hand():
  assert tasks.worked_solution(347, 85) == "7+5=12 c1;4+8+1=13 c1;3+0+1=4 c0;=432\n"
  assert tasks.worked_solution(0, 0) == "0+0=0 c0;=0\n"
  assert tasks.worked_solution(95, 5) == "5+5=10 c1;9+0+1=10 c1;=100\n"


def test_checker_on_hand_written_cases():
  assert tasks.check("347+85=", "7+5=12 c1;4+8+1=13 c1;3+0+1=4 c0;=432\n")
  assert tasks.check("347+85=", "garbage;=432")  # only the final answer counts
  assert not tasks.check("347+85=", "7+5=12 c1;4+8+1=13 c1;3+0+1=4 c0;=431\n")
  assert not tasks.check("347+85=", "7+5=12 c1;4+8")  # cut off: no answer
  assert not tasks.check("2+2=", "4")  # no ";=": states no answer
  assert tasks.answer_of("1+1=2 c0;=2\nmore") == 2
  with pytest.raises(ValueError, match="not an arithmetic prompt"):
    tasks.check("hello", ";=3")


def test_problems_are_deterministic_correct_and_split():
  train = tasks.problems(0, "train", 300)
  assert train == tasks.problems(0, "train", 300)
  assert train != tasks.problems(1, "train", 300)
  held_out = tasks.problems(0, "validation", 100)
  pairs = lambda ps: {p.prompt for p in ps}  # noqa: E731
  assert not pairs(train) & pairs(held_out)
  for p in train[:50] + held_out[:50]:
    assert tasks.check(p.prompt, p.completion)
    a, b = map(int, p.prompt[:-1].split("+"))
    assert p.answer == a + b
  with pytest.raises(ValueError, match="split"):
    tasks.problem(0, "test", 0)
