"""The quickstart's teacher: a 4-layer LM trained from scratch on the built-in corpus.

  jaxdistill train --config configs/lm_teacher.py --workdir workdirs/lm_teacher

Data: the Python standard library of the running interpreter (sources + docstrings),
built into the cache dir on first use; a byte-level BPE of 8192 tokens trained on it.
Model: d256 / 4 layers / 4 heads / d_ff 1024, 6.29M params; 440 steps of 16 x 256 tokens,
lr 3e-3, 15% warmup, cosine. Validation CE every 40 steps (metrics.jsonl `eval/loss`).

Hardware: 2 idle CPU cores with jemalloc preloaded: 8 to 16 minutes (52 on a shared box,
BENCHMARKS.md). Measured: validation CE 3.675, 0.9 nats below the 2-layer student trained
on CE for 220 steps (configs/lm_baseline.py).
`jaxdistill quickstart` runs this same config and caches the result.
"""

from jaxdistill import quickstart


def get_config():
  return quickstart.teacher_config("full")
