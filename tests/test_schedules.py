import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # noqa: E702,E501

"""Tests for jaxdistill.schedules against closed forms computed in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistill.schedules import VALID_FORMS, parse_schedule

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
