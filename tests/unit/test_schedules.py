import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # noqa: E702,E501

"""Tests for jaxdistill.distill.schedules against closed forms computed in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.distill.schedules import VALID_FORMS, parse_schedule, value_range

TOTAL = 1000
STEPS = [0, 1, 123, 250, 500, 750, 999, 1000, 1500]


def np_linear(step, base, end, n):
  frac = np.clip(step / n, 0.0, 1.0)
  return base * (1 - frac) + end * frac


def np_cosine(step, base, end, n):
  frac = np.clip(step / n, 0.0, 1.0)
  return end + (base - end) * (np.cos(np.pi * frac) + 1.0) / 2.0


CASES = [
  ("constant", 2.0, lambda t: 2.0),
  ("constant()", 0.7, lambda t: 0.7),
  ("linear(end=0.1)", 2.0, lambda t: np_linear(t, 2.0, 0.1, TOTAL)),
  ("linear(end=0.1, steps=500)", 2.0, lambda t: np_linear(t, 2.0, 0.1, 500)),
  (" linear( steps = 250 , end = 4 ) ", 1.0, lambda t: np_linear(t, 1.0, 4.0, 250)),
  ("cosine(end=0.1)", 2.0, lambda t: np_cosine(t, 2.0, 0.1, TOTAL)),
  ("cosine(end=1e-1, steps=600)", 3.0, lambda t: np_cosine(t, 3.0, 0.1, 600)),
  ("exp(decay=0.01, min=1.0)", 4.0, lambda t: 4.0 * np.exp(-0.01 * t) + 1.0),
  ("exp(decay=0.002)", 4.0, lambda t: 4.0 * np.exp(-0.002 * t)),
]


@pytest.mark.parametrize("spec,base,closed_form", CASES, ids=[c[0] for c in CASES])
def test_values_match_closed_form_eager_and_jit(spec, base, closed_form):
  schedule = parse_schedule(spec, base, TOTAL)
  jitted = jax.jit(schedule)
  expected = np.array([closed_form(float(t)) for t in STEPS], np.float64)
  eager = np.array([float(schedule(t)) for t in STEPS])
  traced = np.array([float(jitted(jnp.asarray(t, jnp.int32))) for t in STEPS])
  np.testing.assert_allclose(eager, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-6)
  out = jitted(jnp.asarray(3, jnp.int32))
  assert out.dtype == jnp.float32 and out.shape == ()


def test_endpoints():
  lin = parse_schedule("linear(end=0.5, steps=10)", 2.0, TOTAL)
  cos = parse_schedule("cosine(end=0.5, steps=10)", 2.0, TOTAL)
  for schedule in (lin, cos):
    assert float(schedule(0)) == pytest.approx(2.0)
    assert float(schedule(10)) == pytest.approx(0.5)
    assert float(schedule(10_000)) == pytest.approx(0.5)  # holds the end value
  # Cosine is halfway at the midpoint, like linear.
  assert float(cos(5)) == pytest.approx(1.25, rel=1e-6)
  # exp starts at base + min (T_max + T_min) and tends to min.
  exp = parse_schedule("exp(decay=0.1, min=1.0)", 3.0, TOTAL)
  assert float(exp(0)) == pytest.approx(4.0)
  assert float(exp(10_000)) == pytest.approx(1.0)


def test_schedule_over_a_vector_of_steps_under_jit():
  schedule = parse_schedule("cosine(end=0.0, steps=100)", 1.0, TOTAL)
  steps = jnp.arange(0, 200, 7)
  out = jax.jit(jax.vmap(schedule))(steps)
  expected = np_cosine(np.arange(0, 200, 7).astype(np.float64), 1.0, 0.0, 100)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


BAD_SPECS = [
  "",
  "   ",
  "warmup",
  "linear",  # missing end
  "linear()",
  "cosine(steps=5)",
  "exp(min=1.0)",  # missing decay
  "linear(end=abc)",
  "linear(end=nan)",
  "linear(end=inf)",
  "linear(end=0.1, start=2)",
  "constant(x=1)",
  "linear(end=0.1, end=0.2)",
  "linear(end=0.1, steps=0)",
  "linear(end=0.1, steps=2.5)",
  "linear(end=0.1",
  "linear(end=0.1))",
  "linear(end 0.1)",
  "__import__('os').system('true')",
  "exp(decay=1e-2; min=1)",
]


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_parse_errors_quote_spec_and_list_forms(spec):
  with pytest.raises(ValueError) as info:
    parse_schedule(spec, 1.0, TOTAL)
  message = str(info.value)
  assert repr(spec) in message
  for form in VALID_FORMS:
    assert form in message


def test_default_steps_need_positive_total():
  with pytest.raises(ValueError, match="steps"):
    parse_schedule("linear(end=0.0)", 1.0, 0)
  # An explicit steps makes total_steps irrelevant.
  assert float(parse_schedule("linear(end=0.0, steps=4)", 1.0, 0)(2)) == pytest.approx(0.5)


# --- value_range: a schedule's extremes over a run, for config validation -------------------


@pytest.mark.parametrize("spec,base,closed_form", CASES, ids=[c[0] for c in CASES])
def test_value_range_equals_the_extremes_of_every_step(spec, base, closed_form):
  schedule = jax.jit(jax.vmap(parse_schedule(spec, base, TOTAL)))
  values = np.asarray(schedule(jnp.arange(TOTAL + 1)))
  lo, hi, at_lo, at_hi = value_range(spec, base, TOTAL)
  np.testing.assert_allclose([lo, hi], [values.min(), values.max()], rtol=1e-6)
  np.testing.assert_allclose([values[at_lo], values[at_hi]], [lo, hi], rtol=1e-6)


@pytest.mark.slow
def test_value_range_finds_what_a_run_would_reach():
  # The example: the temperature crosses zero mid-run and ends at -1.
  assert value_range("linear(end=-1)", 1.0, 100) == (-1.0, 1.0, 100, 0)
  # Only the run's steps count: this one would reach -1 only at step 200.
  lo, hi, _, _ = value_range("linear(end=-1, steps=200)", 1.0, 100)
  assert lo == pytest.approx(0.0, abs=1e-6) and hi == 1.0
  # float32 as training computes it: 1 + (1e-9 - 1) * 1 is exactly 0 there.
  assert value_range("linear(end=1e-9)", 1.0, 10)[0] == 0.0
  assert value_range("constant", -0.5, 10)[:2] == (-0.5, -0.5)
  # A growing exp overflows float32: reported, not hidden.
  assert value_range("exp(decay=-1)", 1.0, 200)[1] == float("inf")
  # Long runs: an even spread of steps (both ends included) stands in for every step.
  assert value_range("cosine(end=0.25)", 2.0, 10**8)[:2] == pytest.approx((0.25, 2.0))


def test_value_range_rejects_a_bad_spec_like_parse_schedule():
  with pytest.raises(ValueError, match="valid forms"):
    value_range("linear(end=x)", 1.0, 10)
