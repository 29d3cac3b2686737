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
the spec and listing the valid forms.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import jax
import jax.numpy as jnp

F32 = jnp.float32

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
  match = _SPEC_RE.match(spec) if isinstance(spec, str) else None
  if not match:
    raise _error(str(spec), "cannot parse")
  name, body = match.group(1), match.group(2)
  if name not in _SIGNATURES:
    raise _error(spec, f"unknown schedule {name!r}")
  args = _resolve_args(spec, name, _parse_args(spec, body), total_steps)
  base = float(base)

  if name == "constant":
    return lambda step: jnp.full((), base, F32)

  if name == "exp":
    decay, floor = args["decay"], args["min"]
    return lambda step: (base * jnp.exp(-decay * jnp.asarray(step, F32)) + floor).astype(F32)

  end, steps = args["end"], args["steps"]

  def progress(step) -> jax.Array:
    return jnp.clip(jnp.asarray(step, F32) / steps, 0.0, 1.0)

  if name == "linear":
    return lambda step: (base + (end - base) * progress(step)).astype(F32)
  # cosine: weight on base falls from 1 to 0 along half a cosine period.
  return lambda step: (end + (base - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress(step)))).astype(
    F32
  )
