"""Dense vs fused loss head: compiled temp memory and wall time of forward + backward.

  python benchmarks/loss_head.py [--sizes 4096,512,32768 2048,1024,131072] [--json PATH]

Each size N,D,V is N tokens, student and teacher width D (teacher head [D, V] frozen) and
vocabulary V; the loss is 0.5 * KL(tau=2) + 0.5 * CE with 1/8 of the tokens padded, and the
gradient is taken w.r.t. the student's hidden states and head, as in the distill step.

* dense: logits = hidden @ head for both models, then ``losses.logit_loss`` +
  ``losses.cross_entropy`` (the reference path of the objective).
* fused: ``fused.fused_loss_head`` (token chunks, gradient computed in the forward pass);
  ``--vocab-chunk`` adds the vocab-chunked streaming variant as impl ``fused_vocab``.

Memory is ``compiled.memory_analysis().temp_size_in_bytes`` (XLA's scratch, excluding inputs
and outputs); time is the median of ``--repeats`` calls after one warm-up call. The defaults
are sized to finish in a few minutes on a 2-core CPU; pass the issue's sizes with --sizes.
Timings on a shared machine are noisy: compare the ratios, which come from the same run.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.distill import fused, losses

TAU, KL_WEIGHT, CE_WEIGHT = 2.0, 0.5, 0.5


def _inputs(n: int, d: int, v: int, seed: int = 0):
  """(student hidden, student head, teacher hidden, teacher head, targets, weights)."""
  keys = jax.random.split(jax.random.key(seed), 5)
  hs = jax.random.normal(keys[0], (n, d), jnp.float32)
  ws = jax.random.normal(keys[1], (d, v), jnp.float32) / np.sqrt(d)
  ht = jax.random.normal(keys[2], (n, d), jnp.float32)
  wt = jax.random.normal(keys[3], (d, v), jnp.float32) / np.sqrt(d)
  y = jax.random.randint(keys[4], (n,), 0, v)
  w = (jnp.arange(n) % 8 != 7).astype(jnp.float32)  # 1/8 padding
  return hs, ws, ht, wt, y, w


def dense_loss(hs, ws, ht, wt, y, w):
  denom = w.sum()
  zs_1xNxV = (hs @ ws)[None]
  zt_1xNxV = jax.lax.stop_gradient(ht @ wt)[None]
  kl, _ = losses.logit_loss("kl", zs_1xNxV, zt_1xNxV, w[None], denom, temperature=TAU)
  ce, _ = losses.cross_entropy(zs_1xNxV, y[None], w[None], denom)
  return KL_WEIGHT * kl + CE_WEIGHT * ce


def fused_loss(hs, ws, ht, wt, y, w, token_chunk: int, vocab_chunk: int = 0):
  out = fused.fused_loss_head(
    hs,
    ws,
    y,
    w,
    w.sum(),
    teacher_hidden_NxDt=ht,
    teacher_head_DtxV=wt,
    temperature=TAU,
    kl_weight=KL_WEIGHT,
    ce_weight=CE_WEIGHT,
    token_chunk=token_chunk,
    vocab_chunk=vocab_chunk,
  )
  return out.loss


def measure(loss_fn, args, repeats: int) -> dict:
  """Compiles value_and_grad w.r.t. (hidden, head); temp bytes and median seconds."""
  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  compiled = step.lower(*args).compile()
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  jax.block_until_ready(compiled(*args))  # warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return {"temp_bytes": temp, "median_s": statistics.median(times)}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=["2048,512,32768", "1024,256,131072"])
  parser.add_argument("--token-chunk", type=int, default=256)
  parser.add_argument("--vocab-chunk", type=int, default=0, help="also run fused_vocab")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip-dense", action="store_true", help="when dense does not fit")
  parser.add_argument("--json", help="write the rows here")
  args = parser.parse_args(argv)
  impls = {} if args.skip_dense else {"dense": dense_loss}
  impls["fused"] = lambda *a: fused_loss(*a, args.token_chunk)
  if args.vocab_chunk:
    impls["fused_vocab"] = lambda *a: fused_loss(*a, args.token_chunk, args.vocab_chunk)
  rows = []
  print(f"{'impl':<12} {'N':>6} {'D':>5} {'V':>7} {'temp MiB':>10} {'median s':>9}")
  for size in args.sizes:
    n, d, v = map(int, size.split(","))
    inputs = _inputs(n, d, v)
    for impl, fn in impls.items():
      row = {"impl": impl, "N": n, "D": d, "V": v, **measure(fn, inputs, args.repeats)}
      if impl != "dense":
        row.update(token_chunk=args.token_chunk, vocab_chunk=args.vocab_chunk * (impl != "fused"))
      rows.append(row)
      print(
        f"{impl:<12} {n:>6} {d:>5} {v:>7} {row['temp_bytes'] / 2**20:>10.1f} "
        f"{row['median_s']:>9.3f}",
        flush=True,
      )
  dense = {(r["N"], r["D"], r["V"]): r for r in rows if r["impl"] == "dense"}
  for r in rows:
    base = dense.get((r["N"], r["D"], r["V"]))
    if base and r["impl"] != "dense":
      mem, t = r["temp_bytes"] / base["temp_bytes"], r["median_s"] / base["median_s"]
      print(
        f"{r['impl']}/dense at N={r['N']} D={r['D']} V={r['V']}: memory {mem:.3f}, time {t:.3f}"
      )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
