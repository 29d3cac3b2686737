"""On-policy batches: the student writes the continuations its teacher then scores (GKD).

``distill.on_policy`` (Agarwal et al. 2024, "generalized knowledge distillation"): with
probability ``lmbda`` a step replaces its batch's continuations by the student's own samples,
inside the one jitted step, before the usual forwards. The teacher then scores the whole
sampled sequence in its ordinary forward, and the objective's logit term (``jsd`` with
``beta``: 0 forward KL, 1 reverse KL in the limit; ``reverse_kl``; ``kl``; or the
sampled-token ``sampled_reverse_kl`` that reads only the log-probabilities of the sampled
tokens) runs on the generated tokens only. With ``lmbda`` = 0 nothing here runs: the step is
exactly the token-level KD step.

A row of the batch keeps its prompt: ``prompt_tokens`` > 0 takes that many first tokens of each
row (a corpus), 0 takes each row's positions before its first weighted target (a prompt /
completion dataset whose prompt carries no loss). The student decodes up to
``max_new_tokens`` after it (``generate.decode``: a KV-cache prefill and a ``lax.while_loop``,
stopping a row at the data's end-of-text token), and the row becomes::

  inputs   prompt + sampled tokens, then zeros          (T positions)
  targets  inputs shifted left by one                   (the sampled tokens where weighted)
  weights  1 where the target is a sampled token, else 0 (no loss on the prompt)
  segment_ids 1 on the prompt and the sampled tokens, positions 0 .. T-1

Tokens that would fall past the row's T positions are dropped. The keys: the step's seed is
drawn from (``seed``, step), and row r's token t from (that seed, r, t) (``sampling.row_keys``),
with r the row's index in the GLOBAL batch: the samples do not depend on the mesh, and a
resumed run draws the same ones. Whether step s samples at all is drawn from (``seed``, s).

  make(student, cfg, stop_tokens, seed) -> rewrite(student_vars, batch, step) -> (batch, metrics)
  time_split(run, batch, repeats) -> {"perf/split_*": ...}

The step's time split (``time_split``; ``distill.on_policy.time_split`` repeats, at a run's
first step): the parts of one jitted step cannot be timed with host clocks, so three jitted
programs are timed on the same batch: the sampling alone, the teacher's forward alone on the
sampled rows, and the run's own step (a copy of its state, at a step whose coin samples).
The update (the student's forward and backward, the losses, the optimizer) is the step's time
less the two others.
"""

import statistics
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill import models
from jaxdistill.generate import decode as decode_lib
from jaxdistill.generate import sampling
from jaxdistill.parallel import sharding as sharding_lib

# Folded into the run's seed: the on-policy coin and sampling seeds are their own streams.
_COIN, _SAMPLE = 0x6B64, 0x5A4D


def prompt_lengths(batch: dict, prompt_tokens: int) -> jax.Array:
  """int32 [B]: each row's prompt length (>= 1).

  Args:
    batch: with ``weights`` [B, T] (the target at position t is token t + 1).
    prompt_tokens: > 0: that many (at most T - 1); 0: the positions up to and including the
      one whose target is the row's first weighted one (a row without any: 1).
  """
  weights_BxT = batch["weights"]
  t = weights_BxT.shape[1]
  if prompt_tokens > 0:
    return jnp.full((weights_BxT.shape[0],), min(prompt_tokens, t - 1), jnp.int32)
  first_B = jnp.argmax(weights_BxT > 0, axis=1).astype(jnp.int32)
  return jnp.where(jnp.any(weights_BxT > 0, axis=1), first_B + 1, 1)


def assemble(batch: dict, lengths_B: jax.Array, tokens_BxN: jax.Array, num_B: jax.Array) -> dict:
  """The on-policy rows (see the module docstring) from the prompts and the sampled tokens.

  Args:
    batch: the original batch (its other keys pass through; dtypes kept).
    lengths_B: int32 prompt lengths.
    tokens_BxN: int32 sampled tokens (valid: the first num_B of each row).
    num_B: int32 sampled tokens per row.
  """
  inputs_BxT = batch["inputs"]
  b, t = inputs_BxT.shape
  n = tokens_BxN.shape[1]
  pos_BxU = jnp.broadcast_to(jnp.arange(t + 1)[None, :], (b, t + 1))  # U = T + 1 positions
  gen_BxU = pos_BxU - lengths_B[:, None]  # index of the sampled token at each position
  is_gen_BxU = (gen_BxU >= 0) & (gen_BxU < num_B[:, None])
  sampled_BxU = jnp.take_along_axis(tokens_BxN, jnp.clip(gen_BxU, 0, n - 1), axis=1)
  prompt_BxU = jnp.pad(inputs_BxT, ((0, 0), (0, 1)))
  seq_BxU = jnp.where(
    pos_BxU < lengths_B[:, None], prompt_BxU, jnp.where(is_gen_BxU, sampled_BxU, 0)
  )
  valid_BxT = pos_BxU[:, :t] < (lengths_B + num_B)[:, None]
  out = dict(batch)
  out["inputs"] = seq_BxU[:, :t].astype(inputs_BxT.dtype)
  out["targets"] = seq_BxU[:, 1:].astype(batch["targets"].dtype)
  out["weights"] = is_gen_BxU[:, 1:].astype(batch["weights"].dtype)
  if "segment_ids" in batch:
    out["segment_ids"] = valid_BxT.astype(batch["segment_ids"].dtype)
  if "positions" in batch:
    out["positions"] = pos_BxU[:, :t].astype(batch["positions"].dtype)
  return out


def samples_at(seed: int, lmbda: float, step) -> jax.Array:
  """bool: whether step ``step`` samples (drawn from (``seed``, step); always with lmbda >= 1).
  The step's own coin, usable outside it (``time_split`` looks for a sampling step)."""
  if lmbda >= 1:
    return jnp.bool_(True)
  coin = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _COIN), step)
  return jax.random.uniform(coin) < lmbda


def make_sample(student: nn.Module, cfg: Any, stop_tokens: tuple[int, ...], seed: int) -> Callable:
  """``sample(student_vars, batch, step) -> (on-policy batch, mean sampled tokens per row)``:
  the sampling of one step, whatever its coin (``make`` draws the coin around it)."""
  params = sampling.SamplingParams(temperature=float(cfg.temperature), top_k=int(cfg.top_k))
  n = int(cfg.max_new_tokens)
  decoder = decode_lib.Decoder(student, params, stop_tokens, n)
  prompt_tokens = int(cfg.prompt_tokens)

  def sample(student_vars, batch, step):
    b, t = batch["inputs"].shape
    lengths_B = prompt_lengths(batch, prompt_tokens)
    draw = jax.random.fold_in(jax.random.key(seed), _SAMPLE)
    step_seed = jax.random.randint(jax.random.fold_in(draw, step), (), 0, jnp.iinfo(jnp.int32).max)
    rows_B = jnp.arange(b, dtype=jnp.int32)  # global rows: the samples ignore the mesh
    # Prefill writes all T columns; each decode step one more slot of a running row.
    capacity = t + n
    state = decoder._prefill(student_vars, capacity, batch["inputs"], lengths_B, rows_B, step_seed)
    state = decoder._decode(student_vars, state, n - 1, step_seed)
    new = assemble(batch, lengths_B, state.tokens_BxN, jnp.minimum(state.num_B, t + 1 - lengths_B))
    return new, jnp.mean(state.num_B.astype(jnp.float32))

  return sample


def make(student: nn.Module, cfg: Any, stop_tokens: tuple[int, ...], seed: int) -> Callable | None:
  """The batch rewrite of ``distill.on_policy``, or None when ``lmbda`` is 0.

  Args:
    student: the student decoder (``transformer.Transformer``).
    cfg: the ``distill.on_policy`` section (lmbda, max_new_tokens, temperature, top_k,
      prompt_tokens).
    stop_tokens: ids that end a sampled continuation (the data's end-of-text; may be empty).
    seed: the run's seed.
  Returns:
    ``rewrite(student_vars, batch, step) -> (batch, metrics)``, traced inside the step:
    ``metrics`` has "on_policy/sampled" (1.0 when this step sampled) and
    "on_policy/new_tokens" (mean sampled tokens per row; 0 when it did not). Its attributes
    ``sample`` (``make_sample``'s, without the coin) and ``samples_at(step)`` (the coin, a
    bool array) serve ``time_split``.
  """
  lmbda = float(cfg.lmbda)
  if lmbda == 0:
    return None
  sample = make_sample(student, cfg, stop_tokens, seed)

  def rewrite(student_vars, batch, step):
    student_vars = jax.lax.stop_gradient(student_vars)
    if lmbda >= 1:
      new, mean_new = sample(student_vars, batch, step)
      return new, {"on_policy/sampled": jnp.float32(1), "on_policy/new_tokens": mean_new}
    use = samples_at(seed, lmbda, step)
    new, mean_new = jax.lax.cond(
      use,
      lambda bt: sample(student_vars, bt, step),
      lambda bt: (bt, jnp.float32(0)),
      batch,
    )
    return new, {"on_policy/sampled": use.astype(jnp.float32), "on_policy/new_tokens": mean_new}

  rewrite.sample = sample
  rewrite.samples_at = lambda step: samples_at(seed, lmbda, step)
  return rewrite


SPLIT_PARTS = ("sample", "teacher", "update")


def _sampling_step(rewrite: Callable, start: int, window: int = 1024) -> int:
  """The first step >= ``start`` whose coin samples (``rewrite.samples_at``)."""
  coins = jax.vmap(rewrite.samples_at)
  for first in range(start, start + 64 * window, window):
    hits = jax.device_get(coins(jnp.arange(first, first + window, dtype=jnp.int32)))
    if hits.any():
      return first + int(hits.argmax())
  raise ValueError(f"no step in [{start}, {start + 64 * window}) samples: is lmbda tiny?")


def _median_seconds(fn: Callable, make_args: Callable[[], tuple], repeats: int, clock) -> float:
  """The median wall time of ``fn(*make_args())`` over ``repeats`` runs after one untimed run
  (its compile); the arguments are made and ready before each clock starts."""
  times = []
  for _ in range(repeats + 1):
    args = jax.block_until_ready(make_args())
    t0 = clock()
    jax.block_until_ready(fn(*args))
    times.append(clock() - t0)
  return statistics.median(times[1:])


def split_shares(sample_s: float, teacher_s: float, step_s: float) -> dict[str, float]:
  """The split's metrics from the three timings: seconds of each part ("update" is the step
  less the two others, at least 0) and their shares of the parts' sum (1 in total).

  Returns:
    {"perf/split_step_s", "perf/split_<part>_s", "perf/split_<part>"} for each SPLIT_PARTS.
  """
  seconds = {"sample": sample_s, "teacher": teacher_s}
  seconds["update"] = max(step_s - sample_s - teacher_s, 0.0)
  total = sum(seconds.values()) or 1.0
  out = {"perf/split_step_s": step_s}
  for part in SPLIT_PARTS:
    out[f"perf/split_{part}_s"] = seconds[part]
    out[f"perf/split_{part}"] = seconds[part] / total
  return out


def time_split(run: Any, batch: dict, repeats: int = 3, clock=time.perf_counter) -> dict:
  """The time split of one on-policy (sampling) step of ``run`` on ``batch``.

  Times, each the median of ``repeats`` runs after a first untimed one: ``sample`` (the
  step's sampling, jitted alone), ``teacher`` (the teacher's forward on the sampled rows as the
  objective requests it, jitted alone; with ``optim.grad_accum`` micro-batch by micro-batch as
  in the step; with the fused head the teacher's vocabulary projection runs in the loss, so
  under update) and the run's own jitted step on a copy of its state set to a step whose coin
  samples (the step's compile is the run's: nothing new compiles for it; the copy is donated,
  so the run's state and its data stream are untouched and a timed run trains bitwise as an
  untimed one). Memory: one more copy of the train state while it runs.

  Args:
    run: a ``train.run.Run`` with ``distill.on_policy.lmbda`` > 0 (``run.on_policy`` set).
    batch: a global batch (``sharding.shard_batch``), e.g. the run's first.
    repeats: timed runs of each program (>= 1).
    clock: the host clock.
  Returns:
    ``split_shares``'s metrics (``perf/``: timing-dependent, left out of run comparisons).
  """
  rewrite = run.on_policy
  if rewrite is None:
    raise ValueError("time_split needs an on-policy run (distill.on_policy.lmbda > 0)")
  from jaxdistill.train import step as train_lib  # step.py's micro-batch split

  repeats = max(int(repeats), 1)
  state = run.state
  module, teacher_vars = run.teachers[0]
  request = run.objective.teacher_request()
  accum = int(run.cfg.optim.grad_accum)

  def teacher_forward(variables, b):
    def one(micro):
      out = models.apply(module, variables, micro, **request)
      return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out))

    if accum == 1:
      return one(b)
    return jnp.sum(jax.lax.map(one, train_lib._micro_batches(b, accum)))

  sample_fn, teacher_fn = jax.jit(rewrite.sample), jax.jit(teacher_forward)
  with sharding_lib.rules_context(run.mesh):
    at = _sampling_step(rewrite, int(jax.device_get(state.step)))
    step_of = lambda: jax.device_put(jnp.asarray(at, state.step.dtype), state.step.sharding)  # noqa: E731
    student_vars = {"params": state.params["student"], **(state.model_state or {})}
    sampled, _ = sample_fn(student_vars, batch, step_of())
    sample_s = _median_seconds(sample_fn, lambda: (student_vars, batch, step_of()), repeats, clock)
    teacher_s = _median_seconds(teacher_fn, lambda: (teacher_vars, sampled), repeats, clock)

    def state_copy():
      copy = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
      return copy.replace(step=step_of()), teacher_vars, batch

    step_s = _median_seconds(run.step_fn, state_copy, repeats, clock)
  return split_shares(sample_s, teacher_s, step_s)


def first_step_split(run: Any, keep: Callable[[dict], None]) -> Callable | None:
  """``loop.run_steps``' ``first_step`` hook of a run whose split is on (lmbda > 0 and
  ``distill.on_policy.time_split`` > 0; else None): times the split on the first batch, hands
  the metrics to ``keep`` and prints them (process 0)."""
  repeats = run.cfg.distill.on_policy.time_split
  if run.on_policy is None or not repeats:
    return None

  def hook(batch: dict) -> None:
    split = time_split(run, batch, repeats)
    keep(split)
    if jax.process_index() == 0:
      shares = ", ".join(f"{p} {split[f'perf/split_{p}']:.0%}" for p in SPLIT_PARTS)
      print(f"on-policy step {split['perf/split_step_s']:.3g}s: {shares}", flush=True)

  return hook
