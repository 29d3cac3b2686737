"""Model surgery: students made from a teacher's params.

``init_from_teacher`` builds a shallower student from a teacher of the same width: embeddings,
final norm and head copied, block j of the student = block ``layers[j]`` of the teacher
(DistilBERT: every other layer); ``select_layers`` turns a ``student.init_layers`` spec into
those teacher block indices. Both are pure functions of param pytrees (the decoder's and the
encoder's share the ``block_{i}`` naming), so they work on any model of ``models/``.
"""

from typing import Sequence


def select_layers(spec: str | Sequence[int], teacher_layers: int, student_layers: int):
  """Teacher block indices (0-based) that initialise the student's blocks.

  Args:
    spec: "every_other" (0, 2, 4, ... as DistilBERT), "last" (the last ``student_layers``),
      "uniform" (evenly spread, first and last included), or explicit "0,2,5" / a sequence.
    teacher_layers, student_layers: block counts.
  Returns:
    A tuple of ``student_layers`` increasing teacher block indices.
  Raises:
    ValueError: a spec that does not give exactly ``student_layers`` valid indices.
  """
  lt, ls = teacher_layers, student_layers
  if spec == "every_other":
    layers = tuple(range(0, lt, 2))[:ls]
  elif spec == "last":
    layers = tuple(range(lt - ls, lt))
  elif spec == "uniform":
    layers = tuple(round(j * (lt - 1) / max(ls - 1, 1)) for j in range(ls))
  else:
    try:
      items = spec.split(",") if isinstance(spec, str) else spec
      layers = tuple(int(x) for x in items)
    except ValueError:
      raise ValueError(
        f"layer selection {spec!r} must be every_other, last, uniform or a list like 0,2,4"
      ) from None
  if len(layers) != ls or any(not 0 <= i < lt for i in layers) or len(set(layers)) != ls:
    raise ValueError(
      f"layer selection {spec!r} gives teacher blocks {layers}; need {ls} distinct blocks "
      f"in [0, {lt - 1}]"
    )
  return layers


def init_from_teacher(teacher_params: dict, layers: Sequence[int]) -> dict:
  """Student params: the teacher's non-block params and blocks ``layers`` renumbered 0..n-1.

  Args:
    teacher_params: the teacher's params (same width, heads and vocabulary as the student).
    layers: teacher block indices, e.g. from ``select_layers``.
  Returns:
    The student's params (the teacher's arrays themselves: no copy, same shardings).
  """
  out = {k: v for k, v in teacher_params.items() if not k.startswith("block_")}
  for j, i in enumerate(layers):
    out[f"block_{j}"] = teacher_params[f"block_{i}"]
  return out
