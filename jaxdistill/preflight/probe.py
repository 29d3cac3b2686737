"""This host measured: the peaks a roofline for the CPU backend is drawn against.

A CPU has no datasheet figure a jitted XLA program reaches, so ``host_chip`` measures them in
the same process: float32 matmul FLOP/s (the training loop's CPU probe, at two sizes) and
read bandwidth (a jitted sum over a buffer much larger than the caches). The CPU roofline of
a small config set next to its measured step time is how the roofline model checks itself
(``benchmarks/preflight_honesty.py``): the bound must never be slower than the measured step.
"""

import time

from jaxdistill.preflight import chips as chips_lib


def _best_time(fn, repeats: int) -> float:
  import jax

  jax.block_until_ready(fn())  # compile and warm
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def matmul_flops() -> float:
  """Best float32 matmul FLOP/s of this host's first CPU device: the training loop's CPU peak
  probe (``train.throughput.time_matmul``), freshly measured (never its cache) at two sizes."""
  import jax.numpy as jnp

  from jaxdistill.train import throughput

  return max(throughput.time_matmul(jnp.float32, size, 0.3) for size in (1024, 2048))


def read_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
  """Bytes/s of a jitted float32 sum over ``mbytes`` MiB (read once)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  f = jax.jit(jnp.sum)
  return x.size * 4 / _best_time(lambda: f(x), repeats)


def host_chip(memory_bytes: float | None = None) -> chips_lib.Chip:
  """This host's CPU as a ``Chip``: measured FLOP/s and bandwidth, its RAM as memory, and the
  same measured bandwidth for transfers between its (fake) devices (shared memory)."""
  import os

  if memory_bytes is None:
    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  bw = read_bandwidth()
  return chips_lib.Chip("cpu", "cpu", matmul_flops(), float(memory_bytes), bw, bw, 1, 1)
