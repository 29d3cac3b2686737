"""Layer maps: which student layer is matched with which teacher layer by the feature losses.

Layers are hidden-state indices: 0 = the embeddings, i = the output of block i (1..L). The
objective's attention terms read the attention of the block that produced hidden state i,
i.e. block i - 1 (0-based). A map is a config string (``distill.attention.layer_map``,
``distill.hidden.layer_map``) parsed into (student_layer, teacher_layer) pairs.
"""

import re

_PAIR_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_LAST_K_RE = re.compile(r"^\s*last\s*:\s*(-?\d+)\s*$")
_LAYER_MAP_FORMS = '"uniform", "last", "last:K", or explicit pairs like "1:2,2:4"'


def _check_layer(index: int, num_layers: int, side: str, spec: str) -> None:
  if not 0 <= index <= num_layers:
    raise ValueError(
      f"layer_map({spec!r}): {side} layer {index} out of range; valid "
      f"{side} layers are 0..{num_layers} (0 = embeddings)"
    )


def layer_map(
  spec: str, num_student_layers: int, num_teacher_layers: int
) -> tuple[tuple[int, int], ...]:
  """Parse a (student_layer, teacher_layer) map; layers are 1..L, 0 = embeddings.

  Specs:
    "uniform": (s, round(s * L_T / L_S)) for s = 1..L_S, rounding halves UP (not
      Python's banker's rounding) and never below teacher layer 1; the last
      student layer maps to the last teacher layer.
    "last": ((L_S, L_T),).
    "last:K": the last K student layers paired in order with the last K teacher
      layers, 1 <= K <= min(L_S, L_T).
    "s:t,s:t,...": explicit pairs; 0 (embeddings) is allowed on either side.

  Returns:
    Tuple of (student_layer, teacher_layer) pairs. Raises ValueError naming the
    bad layer and the valid range, or listing the valid forms.
  """
  l_s, l_t = int(num_student_layers), int(num_teacher_layers)
  if l_s < 1 or l_t < 1:
    raise ValueError(f"layer counts must be >= 1, got student {l_s}, teacher {l_t}")
  text = spec.strip()
  if text == "uniform":
    # floor(x + 1/2) in integers: (2 s L_T + L_S) // (2 L_S).
    return tuple((s, max(1, (2 * s * l_t + l_s) // (2 * l_s))) for s in range(1, l_s + 1))
  if text == "last":
    return ((l_s, l_t),)
  match = _LAST_K_RE.match(text)
  if match:
    k = int(match.group(1))
    if not 1 <= k <= min(l_s, l_t):
      raise ValueError(
        f"layer_map({spec!r}): K={k} out of range; valid K is "
        f"1..{min(l_s, l_t)} (student {l_s} layers, teacher {l_t})"
      )
    return tuple((l_s - k + i, l_t - k + i) for i in range(1, k + 1))
  pairs = []
  for item in text.split(","):
    match = _PAIR_RE.match(item)
    if not match:
      raise ValueError(f"cannot parse layer map {spec!r}; valid forms: {_LAYER_MAP_FORMS}")
    s, t = int(match.group(1)), int(match.group(2))
    _check_layer(s, l_s, "student", spec)
    _check_layer(t, l_t, "teacher", spec)
    pairs.append((s, t))
  return tuple(pairs)
