"""Shared pieces of the tests: tiny model sections, configs, and variables filled on the host.

Shapes are chosen to be cheap to compile, with enough structure for the property a test
checks (several heads, more than one layer where layer maps matter). A test that needs a
special shape (a width that does not divide a mesh axis, a pruned head count) still says so
itself. The golden cases (tests/golden/cases.py) keep their own frozen copy on purpose: their
records must not move when a shared section changes.
"""

# A language model small enough to compile in about a second: the student side.
TINY_LM = dict(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32, max_len=16)
# Its teacher: twice as wide (so hidden-state losses need a projection).
TINY_LM_TEACHER = dict(TINY_LM, d_model=32, d_ff=64)
# Two layers each, the teacher deeper and wider: every feature loss and layer map has work.
SMALL_LM = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16)
SMALL_LM_TEACHER = dict(SMALL_LM, d_model=48, num_layers=3, d_ff=96)


def tiny_config():
  """A small all-losses config (f32, random teacher) for in-process step tests."""
  from jaxdistill.config import default_config

  cfg = default_config()
  cfg.student.update(SMALL_LM)
  cfg.teacher.update(source="random", **SMALL_LM_TEACHER)
  cfg.distill.temperature = 2.0
  cfg.distill.logit.weight = 0.5
  cfg.distill.ce.weight = 0.5
  cfg.distill.attention.update(weight=0.2, value_weight=0.2)
  cfg.distill.hidden.update(weight=0.3, layer_map="uniform")
  cfg.optim.update(steps=3, lr=1e-2, warmup_steps=1)
  cfg.data.update(batch_size=8, seq_len=16, pad_fraction=0.5)
  cfg.log.progress = False
  return cfg


def host_variables(module, seed=0):
  """``module``'s variables filled on the host, so that no random init compiles (on CPU the
  slowest program of a small run; ``build_run(student_vars=, teacher_vars=)`` takes these):
  kernels and embeddings ~ N(0, 1 / fan_in), scales and BatchNorm variances 1, all else
  (biases, means, a QAT model's scales) 0."""
  import flax.linen as nn
  import jax
  import numpy as np

  from jaxdistill import models

  rng = np.random.default_rng(seed)
  init = lambda r: models.init_variables(module, r, 0)  # noqa: E731
  shapes = nn.unbox(jax.eval_shape(init, jax.random.key(0)))

  def fill(path, a):
    name = path[-1].key
    if name in ("kernel", "embedding"):
      std = 1 / np.sqrt(np.prod(a.shape[:-1]))
      return rng.normal(0.0, std, a.shape).astype(a.dtype)
    return np.full(a.shape, 1 if name in ("scale", "var") else 0, a.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def keep_even(prompt: str, completion: str) -> bool:
  """A verifier for ``precompute.generate.verifier`` tests: keeps completions of even length."""
  del prompt
  return len(completion) % 2 == 0


def metric_rows(workdir, after=0):
  """A run's metrics.jsonl rows after step ``after``, without the timing (``perf/``) keys:
  what a resumed run must log exactly like the uninterrupted one."""
  import json

  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [
    {k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows if r["step"] > after
  ]


def host_array(x):
  """A restored checkpoint leaf as a NumPy array (a PRNG key as its key data)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)
