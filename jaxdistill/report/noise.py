"""The noise of what reports compare: quality measured on a finite validation split, latency
timed on a shared machine. Pure arithmetic on what the evaluation JSON records.

  standard_error(values, weights)   of a metric over its evaluated batches
  factor(df), bound(values, w)      the 95% bound: Student's t quantile x the standard error
  difference(a, b, key, higher)     two models' difference in a metric, with its standard error
  outcome(diff)                     "won" / "tie" / "lost": a tie within the 95% bound
  latency_spread(stats)             half the interquartile range of one timed forward
  share(values, spreads, groups)    one latency per identical architecture

Why batches are the units: ``evaluate.evaluate`` records each batch's weight (valid tokens,
images or sentences) and its own mean of each metric (``batch_<metric>``). Tokens of one
document are not independent of each other, so a standard error over tokens would understate
the noise; batches of a shuffled split are close to independent draws.
"""

import math
import statistics
from typing import Hashable, Sequence

# Two-sided 95%: a difference beyond the bound is one chance in twenty for two equal models.
LEVEL = 0.95


def factor(df: int | None) -> float:
  """Standard errors in the 95% bound: Student's t quantile for ``df`` degrees of freedom
  (a standard error from B batches has B - 1; few batches measure it poorly, hence more than
  the normal's 1.96: 12.7 for 2 batches, 3.18 for 4, 2.0 for 60); None: the normal's."""
  from scipy import stats  # (a dependency of jax) only where a report is made

  q = 0.5 + LEVEL / 2
  return float(stats.norm.ppf(q) if df is None else stats.t.ppf(q, df))


def bound(values: Sequence[float] | None, weights: Sequence[float] | None) -> float | None:
  """The 95% half-width of a metric measured over batches: ``factor(B - 1)`` standard errors
  (``standard_error``); None without at least two batches."""
  se = standard_error(values, weights) if values and weights else None
  return None if se is None else factor(len(values) - 1) * se


def standard_error(values: Sequence[float], weights: Sequence[float]) -> float | None:
  """The standard error of the weighted mean of per-batch means (batches as the units).

  The metric is sum_b w_b v_b / W (W = sum_b w_b, the tokens or images); with batches as
  independent draws its variance is B / (B - 1) * sum_b (w_b (v_b - mean))^2 / W^2 (the
  ratio estimator's; for equal weights it is the familiar sd / sqrt(B)).

  Args:
    values: each batch's mean of the metric.
    weights: each batch's valid tokens / images / sentences.

  Returns:
    The standard error, or None with fewer than two batches (no spread to measure).
  """
  total, n = float(sum(weights)), len(values)
  if n < 2 or total <= 0 or len(weights) != n:
    return None
  mean = sum(w * v for v, w in zip(values, weights)) / total
  spread = sum((w * (v - mean)) ** 2 for v, w in zip(values, weights))
  return math.sqrt(n / (n - 1) * spread) / total


def difference(a: dict, b: dict, key: str, higher_is_better: bool) -> dict:
  """``a``'s advantage over ``b`` in metric ``key``, its standard error and 95% bound.

  Paired when both evaluations read the same batches (equal ``batch_weights``): the standard
  error of the per-batch differences, in which the batches' own difficulty cancels (B - 1
  degrees of freedom). Otherwise unpaired, sqrt(SE_a^2 + SE_b^2) (the fewer batches' degrees
  of freedom); for accuracy without per-batch records, the binomial error over images
  (independent examples; the normal quantile). With none of these, se and bound are None.

  Args:
    a, b: ``evaluate.evaluate`` metrics of two models.
    key: the metric, e.g. "val_loss" or "accuracy".
    higher_is_better: its direction.

  Returns:
    {"a", "b" (the metric's values), "advantage" (a - b, signed so that positive is a better),
    "se", "factor" (standard errors in the bound), "bound" (factor x se; None where se is),
    "basis" (how the error was measured, in words)}.
  """
  sign = 1.0 if higher_is_better else -1.0
  out = {"a": a[key], "b": b[key], "advantage": sign * (a[key] - b[key])}
  va, vb = a.get(f"batch_{key}"), b.get(f"batch_{key}")
  wa, wb = a.get("batch_weights"), b.get("batch_weights")
  se_a = standard_error(va, wa) if va and wa else None
  se_b = standard_error(vb, wb) if vb and wb else None
  if se_a is not None and vb and wa == wb and len(va) == len(vb):
    se, df = standard_error([x - y for x, y in zip(va, vb)], wa), len(wa) - 1
    basis = f"paired over {len(wa)} batches"
  elif se_a is not None and se_b is not None:
    se, df = math.hypot(se_a, se_b), min(len(va), len(vb)) - 1
    basis = f"unpaired, over {len(va)} and {len(vb)} batches"
  elif key == "accuracy" and a.get("images") and b.get("images"):
    var = lambda m: m["accuracy"] * (1 - m["accuracy"]) / m["images"]
    se, df, basis = math.sqrt(var(a) + var(b)), None, f"binomial over {a['images']:,} images"
  else:
    return dict(out, se=None, factor=None, bound=None, basis="not measured")
  k = factor(df)
  return dict(out, se=se, factor=k, bound=k * se, basis=basis)


def outcome(diff: dict) -> str:
  """The outcome for ``difference``'s ``a``: "won", "tie" or "lost"; a tie when
  |advantage| <= the 95% bound. Without a measured error (bound None) only an exact equality
  is a tie."""
  if abs(diff["advantage"]) <= (diff["bound"] or 0.0):
    return "tie"
  return "won" if diff["advantage"] > 0 else "lost"


def latency_spread(stats: dict) -> float | None:
  """Half the interquartile range of one timing (``latency.measure``'s dict, seconds): the
  noise of a median as the report reads it; None for a timing without quartiles (older JSON)."""
  if "p25_s" not in stats or "p75_s" not in stats:
    return None
  return (stats["p75_s"] - stats["p25_s"]) / 2


def share(
  values: Sequence[float | None],
  spreads: Sequence[float | None],
  groups: Sequence[Hashable | None],
) -> tuple[list[float | None], list[float | None]]:
  """One latency per identical architecture.

  Models of one group (the same shape and dtype, timed the same way) are the same program, so
  any difference between their timings is the machine's noise: each gets the median of the
  group's timings, and as spread the larger of the median of their own spreads and half the
  range of their timings (how far the machine drifted between the measurements). A model
  without a group (None) or without a value keeps its own.

  Args:
    values: each model's latency (None: not measured).
    spreads: each model's spread (None: not measured, read as 0).
    groups: each model's architecture key, or None.

  Returns:
    (values, spreads), one per model, in order.
  """
  members: dict = {}
  for i, (v, g) in enumerate(zip(values, groups)):
    if v is not None and g is not None:
      members.setdefault(g, []).append(i)
  out_v, out_s = list(values), [s or 0.0 for s in spreads]
  for idx in members.values():
    vs = [values[i] for i in idx]
    shared_v = statistics.median(vs)
    shared_s = max(statistics.median(out_s[i] for i in idx), (max(vs) - min(vs)) / 2)
    for i in idx:
      out_v[i], out_s[i] = shared_v, shared_s
  return out_v, out_s
