"""This host measured: the peaks a roofline for the CPU backend is drawn against.

A CPU has no datasheet figure a jitted XLA program reaches, so ``host_chip`` measures them in
the same process: float32 matmul FLOP/s (the best of a few shapes) and read bandwidth (a
jitted sum over a buffer much larger than the caches). The CPU roofline of a small config set
next to its measured step time is how the roofline model checks itself (``benchmarks/
preflight_honesty.py``): the bound must never be slower than the measured step.
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


def matmul_flops(repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of one device over a few shapes (square and skinny)."""
  import jax
  import jax.numpy as jnp

  best = 0.0
  for m, k, n in ((1024, 1024, 1024), (2048, 2048, 2048), (256, 1024, 4096)):
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    best = max(best, 2 * m * k * n / _best_time(lambda: f(a, b), repeats))
  return best


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
