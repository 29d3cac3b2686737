"""Dtype policies: which dtype params are stored in, compute runs in, outputs leave in.

A policy is written compactly in the config, in the style of DeepMind's jmp:
``"p=f32,c=bf16,o=f32"`` (params / compute / output). Missing parts default to
``p=f32``, ``c=p`` and ``o=c``. Whatever the policy, softmaxes, logsumexps and
losses are computed in float32 (the losses cast their inputs).

The teacher and the student each have their own policy (``teacher.policy``,
``student.policy``): a frozen teacher only runs forward, so it is the cheapest
place for low precision.

A student with float16 params or compute trains with dynamic loss scaling
(``optim.loss_scale=dynamic``): ``LossScale`` lives in the TrainState, the step
multiplies the loss by it before differentiating, divides the gradients by it,
halves it and skips the update on overflow, and doubles it after
``optim.loss_scale_period`` finite steps.

An FP8 student keeps delayed-scaling state (scales, amax histories) that its
training steps update. A frozen FP8 teacher has no steps: ``models.fp8.calibrate``
runs it forward on a few training batches, updating that state with Flax's own
rule, then ``freeze_fp8_scales`` (here) fixes every scale to its history's maximum
(static scaling: the kernel scales are then exact, the weights never change).
The teacher runs with these scales unchanged for the whole distillation.

An int8 student (``c=int8``, optionally ``a=asymmetric``) is distilled with its projection
matmuls fake-quantised by qwix (``models.quant``): weights per output channel, symmetric;
activations per tensor, symmetric or asymmetric, with static scales calibrated before step 1.
Everything else computes in the param dtype. FP8 and int8 are two matmul modes of one ``c=``
part: a spec naming both is an error.
"""

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

from jaxdistill.errors import ConfigError

DTYPES = {
  "f32": jnp.float32,
  "float32": jnp.float32,
  "bf16": jnp.bfloat16,
  "bfloat16": jnp.bfloat16,
  "f16": jnp.float16,
  "float16": jnp.float16,
}


@dataclasses.dataclass(frozen=True)
class Policy:
  """Param, compute and output dtypes of one model."""

  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32
  output_dtype: Any = jnp.float32
  # c=fp8: projection matmuls quantised (e4m3 forward, e5m2 gradients, delayed
  # scaling); compute_dtype (bf16) is everything else.
  fp8: bool = False
  # c=int8: projection matmuls fake-quantised to int8 while training (qwix QAT); "" = off,
  # else the activation scheme, "symmetric" or "asymmetric" (the a= part).
  int8: str = ""

  def __str__(self) -> str:
    name = lambda d: jnp.dtype(d).name
    compute = "fp8" if self.fp8 else "int8" if self.int8 else name(self.compute_dtype)
    out = f"p={name(self.param_dtype)},c={compute},o={name(self.output_dtype)}"
    return out + (f",a={self.int8}" if self.int8 else "")


# int8 activation schemes (the a= part of a c=int8 policy), with their short names.
INT8_ACTS = {"symmetric": "symmetric", "sym": "symmetric", "asymmetric": "asymmetric"}
INT8_ACTS["asym"] = "asymmetric"


def parse_policy(spec: str, key: str = "policy") -> Policy:
  """Parses ``"p=f32,c=bf16,o=f32"`` into a Policy.

  Args:
    spec: comma-separated ``p=``, ``c=``, ``o=`` parts with dtypes from
      ``f32``, ``bf16``, ``f16`` (long names accepted); ``c`` may also be
      ``fp8``: FP8 projection matmuls, everything else in bf16; or ``int8``:
      int8 fake-quantised projection matmuls (QAT), everything else in the param
      dtype, with ``a=symmetric`` (default) or ``a=asymmetric`` activations.
    key: the config key the spec came from, named in errors.

  Returns:
    The Policy.

  Raises:
    ConfigError: unknown or repeated part, unknown dtype, fp8 and int8 together, a= without
      c=int8.
  """
  parts, modes, act = {}, [], None
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in ("p", "c", "o", "a"):
      raise ConfigError(
        key,
        f"bad part {item!r} in {spec!r}; write e.g. "
        "'p=f32,c=bf16,o=f32' (p=params, c=compute, o=output)",
      )
    if name == "a":
      if value not in INT8_ACTS:
        raise ConfigError(key, f"a={value} in {spec!r}: choose a=symmetric or a=asymmetric")
      act = INT8_ACTS[value]
      continue
    if value in ("fp8", "int8"):
      if name != "c":
        raise ConfigError(
          key, f"{value} in {spec!r} is a matmul mode, not a storage dtype: write it as c={value}"
        )
      modes.append(value)
      if len(set(modes)) > 1:
        raise ConfigError(key, f"c=fp8 and c=int8 in {spec!r}: one model quantises one way")
      continue
    if value not in DTYPES:
      raise ConfigError(
        key, f"unknown dtype {value!r} in {spec!r}; choose from {sorted(set(DTYPES))}"
      )
    parts[name] = DTYPES[value]
  if act is not None and "int8" not in modes:
    raise ConfigError(key, f"a={act} in {spec!r} is int8's activation scheme: add c=int8")
  param = parts.get("p", jnp.float32)
  compute = jnp.bfloat16 if "fp8" in modes else param
  compute = parts.get("c", compute)
  int8 = (act or "symmetric") if "int8" in modes else ""
  return Policy(param, compute, parts.get("o", compute), "fp8" in modes, int8)


def check_trainable(policy: Policy, key: str, loss_scaling: bool = False) -> None:
  """Rejects policies a trained model cannot use.

  float16 gradients underflow (and overflow) without dynamic loss scaling;
  bf16 has float32's exponent range and needs none.

  Args:
    policy: the trained model's policy.
    key: the config key of the policy, named in errors.
    loss_scaling: whether dynamic loss scaling is on (``optim.loss_scale``).
  """
  if jnp.float16 in (policy.param_dtype, policy.compute_dtype) and not loss_scaling:
    raise ConfigError(
      key,
      "float16 training needs dynamic loss scaling: set optim.loss_scale=dynamic, "
      "or use bf16 (e.g. 'p=f32,c=bf16,o=f32'), which needs none",
    )


LOSS_SCALES = ("none", "dynamic")


@flax.struct.dataclass
class LossScale:
  """Dynamic loss-scaling state (part of the TrainState, checkpointed).

  Attributes:
    scale: float32 scalar the loss is multiplied by before differentiation.
    good_steps: int32 scalar, finite steps since the scale last changed.
  """

  scale: jax.Array
  good_steps: jax.Array


def init_loss_scale(optim: Any) -> LossScale | None:
  """The initial LossScale of ``optim.loss_scale`` ("none" gives None: no scaling)."""
  if optim.loss_scale != "dynamic":
    return None
  return LossScale(
    scale=jnp.asarray(optim.loss_scale_init, jnp.float32), good_steps=jnp.zeros((), jnp.int32)
  )


def update_loss_scale(ls: LossScale, finite: jax.Array, period: int) -> LossScale:
  """Halves the scale on overflow; doubles it after ``period`` finite steps in a row.

  Args:
    ls: the state used for this step.
    finite: bool scalar, whether this step's loss and gradients were finite.
    period: finite steps after which the scale doubles.

  Returns:
    The next state. The scale stays within [1, 2**24] so it never reaches 0
    or inf (2**24 times a float16 gradient overflows float32 only past 1e38).
  """
  grown = ls.good_steps + 1 >= period
  scale = jnp.where(finite, jnp.where(grown, ls.scale * 2.0, ls.scale), ls.scale * 0.5)
  good = jnp.where(finite & ~grown, ls.good_steps + 1, 0)
  return LossScale(scale=jnp.clip(scale, 1.0, 2.0**24), good_steps=good.astype(jnp.int32))


# --- FP8 scales of a frozen model --------------------------------------------------------

# (scale, amax history, FP8 dtype) of each tensor a Flax FP8 op quantises.
_FP8_TENSORS = (
  ("input_scale", "input_amax_history", jnp.float8_e4m3fn),
  ("kernel_scale", "kernel_amax_history", jnp.float8_e4m3fn),
  ("output_grad_scale", "output_grad_amax_history", jnp.float8_e5m2),
)


def freeze_fp8_scales(fp8_state: Any) -> Any:
  """Sets every FP8 scale to the one its amax history implies (Flax's ``compute_scale``).

  The FP8 ops compute the scale they use from the history's maximum on every
  call; with a history that never changes again (a frozen model) the stored
  scale then equals the scale in use, so the state reads as what it does.

  Args:
    fp8_state: the ``_overwrite_with_gradient`` collection (nested dicts whose
      leaf dicts hold ``*_scale`` [1] and ``*_amax_history`` [H] float32).

  Returns:
    The same tree with the scales replaced.
  """
  if not isinstance(fp8_state, dict):
    return fp8_state
  if "kernel_amax_history" not in fp8_state:
    return {k: freeze_fp8_scales(v) for k, v in fp8_state.items()}
  out = dict(fp8_state)
  for scale, history, dtype in _FP8_TENSORS:
    fp8_max = fp8_ops.get_fp8_max(dtype, jnp.float32)
    out[scale] = fp8_ops.compute_scale(jnp.max(out[history], axis=0), out[scale], fp8_max)
  return out
