"""The optimizer of the student (and its projection heads): AdamW with global-norm clipping,
and its learning-rate schedule (linear warmup, then cosine or constant). ``train.step``
re-exports both (``train.step.make_optimizer``, ``train.step.lr_schedule``).
"""

from typing import Any

import jax
import optax


def lr_schedule(optim: Any) -> optax.Schedule:
  """Linear warmup to ``optim.lr``, then cosine (or constant) to lr * min_lr_ratio.

  With ``warmup_steps=0`` step 0 already trains at ``optim.lr`` (both kinds); with N > 0
  warmup steps, step 0 trains at 0 and step N at ``optim.lr``.
  """
  if optim.lr_schedule == "constant" and optim.warmup_steps == 0:
    # No warmup: a plain constant. (The joined schedule below would start at 0 for one step.)
    return optax.constant_schedule(optim.lr)
  if optim.lr_schedule == "constant":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, optim.lr, max(optim.warmup_steps, 1)),
        optax.constant_schedule(optim.lr),
      ],
      [max(optim.warmup_steps, 1)],
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.lr,
    warmup_steps=optim.warmup_steps,
    decay_steps=max(optim.steps, optim.warmup_steps + 1),
    end_value=optim.lr * optim.min_lr_ratio,
  )


def make_optimizer(optim: Any) -> optax.GradientTransformation:
  """AdamW (``optim.eps``: Adam's denominator epsilon) with global-norm clipping; no weight
  decay on vectors (norms)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
    optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
    optax.adamw(
      lr_schedule(optim),
      b1=optim.b1,
      b2=optim.b2,
      eps=optim.eps,
      weight_decay=optim.weight_decay,
      mask=decay_mask,
    ),
  )
