"""Pair jaxdistill's distill step with params of your own: no config file, no data pipeline.

python examples/pair_step.py   (CPU, under a minute: step memory, then 3 losses)"""

import jax
import numpy as np

import jaxdistill
from jaxdistill import config, models
from jaxdistill.parallel import precision, sharding

cfg = config.default_config()
cfg.student.update(vocab_size=128, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=32)
cfg.teacher.update(vocab_size=128, d_model=64, num_layers=2, num_heads=2, d_ff=128, max_len=32)
cfg.distill.temperature, cfg.distill.ce.weight = 2.0, 0.5
cfg.data.update(batch_size=8, seq_len=32)
cfg.optim.update(lr=1e-2, warmup_steps=0)
rng = np.random.default_rng(0)


def hand_made(side: str) -> dict:
  """'Your' params: any arrays of the model's shapes (here small random NumPy numbers)."""
  model = models.build(cfg[side], precision.parse_policy(cfg[side].policy), side)
  shapes = models.abstract_variables(model, sharding.make_mesh(cfg.mesh), 32)["params"]
  return {"params": jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype), shapes)}


# Validates cfg; neither model is randomly initialised; no data iterator.
run = jaxdistill.build_run(
  cfg, data=False, student_vars=hand_made("student"), teacher_vars=hand_made("teacher")
)
tokens = rng.integers(0, 128, (8, 33), dtype=np.int32)
ones = np.ones((8, 32), np.int32)
local = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], weights=ones.astype(np.float32))
local.update(segment_ids=ones, positions=np.cumsum(ones, axis=1, dtype=np.int32) - 1)
batch = sharding.shard_batch(local, run.mesh)  # the layout: docs/architecture.md, "Batch format"
print("step temp memory:", run.compile(batch).memory_analysis().temp_size_in_bytes, "bytes")
for _ in range(3):
  print("loss", float(run.step(batch)["train/loss"]))
