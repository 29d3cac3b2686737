"""Scalar schedules (temperature, loss weights) parsed from short spec strings.

Shape legend: every schedule maps a scalar step (Python int or traced integer) to a
float32 scalar; no tensor axes (B, T, V, H, K, D) appear here.

Valid forms (whitespace is ignored, argument order is free):

  constant                          -> base
  linear(end=X[, steps=N])          -> base to X linearly over N steps, then X
  cosine(end=X[, steps=N])          -> base to X on a half cosine over N steps, then X
  exp(decay=L[, min=M])             -> base * exp(-L * step) + M

N defaults to ``total_steps``. In ``exp`` the base is T_max in the annealing formula
T(t) = T_max * exp(-lambda * t) + T_min, so the value at step 0 is base + min (not
base) and tends to min; ``min`` defaults to 0.

Specs are parsed with regular expressions (never ``eval``); any unknown name,
unknown/duplicate/missing argument or non-numeric value raises ValueError quoting
the spec and listing the valid forms. ``value_range`` gives a schedule's smallest and
largest value over a run's steps, so a config can be checked before training (a
temperature must stay > 0, a loss weight >= 0, at every step).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

VALID_FORMS = (
  "constant",
  "linear(end=X[, steps=N])",
  "cosine(end=X[, steps=N])",
  "exp(decay=L[, min=M])",
)

# name -> (required arguments, optional arguments with defaults; None = total_steps)
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, float | None]]] = {
  "constant": ((), {}),
  "linear": (("end",), {"steps": None}),
  "cosine": (("end",), {"steps": None}),
  "exp": (("decay",), {"min": 0.0}),
}

_SPEC_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")
_ARG_RE = re.compile(r"^\s*([A-Za-z_]\w*)\s*=\s*(\S+)\s*$")
# Finite decimal numbers only: rejects "nan", "inf", "1_000", "0x10".
_NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _error(spec: str, why: str) -> ValueError:
  return ValueError(f"bad schedule {spec!r}: {why}; valid forms: {', '.join(VALID_FORMS)}")


def _parse_args(spec: str, body: str | None) -> dict[str, float]:
  """Parse "k=v, k=v" into floats; None or blank body -> {}."""
  args: dict[str, float] = {}
  if body is None or not body.strip():
    return args
  for item in body.split(","):
    match = _ARG_RE.match(item)
    if not match:
      raise _error(spec, f"cannot parse argument {item.strip()!r}")
    key, value = match.groups()
    if not _NUMBER_RE.match(value):
      raise _error(spec, f"argument {key}={value!r} is not a number")
    if key in args:
      raise _error(spec, f"argument {key!r} given twice")
    args[key] = float(value)
  return args


def _resolve_args(spec: str, name: str, args: dict[str, float], total_steps: int) -> dict:
  """Check names against the signature, fill defaults, validate `steps`."""
  required, optional = _SIGNATURES[name]
  unknown = sorted(set(args) - set(required) - set(optional))
  if unknown:
    raise _error(spec, f"unknown argument(s) {unknown} for {name}")
  missing = [key for key in required if key not in args]
  if missing:
    raise _error(spec, f"missing argument(s) {missing} for {name}")
  resolved = {**optional, **args}
  if "steps" in resolved:
    steps = resolved["steps"] if resolved["steps"] is not None else total_steps
    if steps != int(steps) or steps < 1:
      raise _error(spec, f"steps must be a positive integer, got {steps!r}")
    resolved["steps"] = int(steps)
  return resolved


def _parse(spec: str, total_steps: int) -> tuple[str, dict]:
  """(schedule name, resolved arguments) of a spec string; raises ValueError."""
  match = _SPEC_RE.match(spec) if isinstance(spec, str) else None
  if not match:
    raise _error(str(spec), "cannot parse")
  name, body = match.group(1), match.group(2)
  if name not in _SIGNATURES:
    raise _error(spec, f"unknown schedule {name!r}")
  return name, _resolve_args(spec, name, _parse_args(spec, body), total_steps)


def _formula(name: str, args: dict, base: float, xp) -> Callable:
  """The schedule as a function of the step, in float32 of the array module ``xp``.

  ``xp`` is ``jax.numpy`` for training and ``numpy`` for ``value_range`` (config validation
  must not start a JAX backend before ``jax.distributed.initialize``); both evaluate the
  same float32 operations.
  """
  f32 = xp.float32
  if name == "constant":
    return lambda step: xp.full((), base, f32)

  if name == "exp":
    decay, floor = args["decay"], args["min"]
    return lambda step: (base * xp.exp(-decay * xp.asarray(step, f32)) + floor).astype(f32)

  end, steps = args["end"], args["steps"]

  def progress(step):
    return xp.clip(xp.asarray(step, f32) / steps, 0.0, 1.0)

  if name == "linear":
    return lambda step: (base + (end - base) * progress(step)).astype(f32)
  # cosine: weight on base falls from 1 to 0 along half a cosine period.
  return lambda step: (end + (base - end) * 0.5 * (1.0 + xp.cos(math.pi * progress(step)))).astype(
    f32
  )


def parse_schedule(spec: str, base: float, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Build a jit-friendly schedule ``step -> float32 scalar`` from a spec string.

  Args:
    spec: one of `VALID_FORMS`, e.g. "cosine(end=1.0, steps=500)".
    base: value at step 0 (for "exp": T_max, see the module docstring).
    total_steps: default length N of "linear" / "cosine".

  Returns:
    A function of a scalar step (Python int or traced array) returning a float32
    scalar. Steps before 0 clamp to the start, steps after N hold the end value.

  Raises:
    ValueError quoting the spec and listing the valid forms.
  """
  name, args = _parse(spec, total_steps)
  return _formula(name, args, float(base), jnp)


# Steps evaluated by value_range: every step up to this many, else this many evenly spread
# (every form is monotone in the step, so its extremes are at the ends either way).
_MAX_EVALUATED_STEPS = 1 << 22


def value_range(spec: str, base: float, total_steps: int) -> tuple[float, float, int, int]:
  """The smallest and largest value a schedule takes over steps 0..total_steps.

  Evaluated in float32 as training computes it (so ``linear(end=1e-9)`` from 1.0, which
  rounds to exactly 0 at its end, reports 0), at every step (over ``_MAX_EVALUATED_STEPS``
  steps: an even spread including both ends). With NumPy: no JAX backend is started.

  Args:
    spec: one of `VALID_FORMS`.
    base: the schedule's base value (see ``parse_schedule``).
    total_steps: the run's steps (``optim.steps``), >= 0.

  Returns:
    (min, max, step of the min, step of the max) as Python floats / ints; a non-finite
    value (``exp`` with a negative decay overflows) shows as inf or nan in them.

  Raises:
    ValueError quoting the spec and listing the valid forms.
  """
  name, args = _parse(spec, total_steps)
  fn = _formula(name, args, float(base), np)
  last = max(int(total_steps), 0)
  if last + 1 <= _MAX_EVALUATED_STEPS:
    steps_S = np.arange(last + 1)
  else:
    steps_S = np.unique(np.linspace(0, last, _MAX_EVALUATED_STEPS).round().astype(np.int64))
  with np.errstate(over="ignore", invalid="ignore"):
    values_S = np.broadcast_to(fn(steps_S), steps_S.shape)
  # nan compares false everywhere: report it as both extremes so no check passes it.
  if np.isnan(values_S).any():
    at = int(steps_S[np.isnan(values_S).argmax()])
    return math.nan, math.nan, at, at
  lo, hi = int(values_S.argmin()), int(values_S.argmax())
  return float(values_S[lo]), float(values_S[hi]), int(steps_S[lo]), int(steps_S[hi])
