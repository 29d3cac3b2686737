"""Decode speed against its limits: bandwidth and matmul probes, our decoder, `transformers`.

  python benchmarks/decode.py [--small] [--batches 1,8,64] [--prompts 128,1024]
      [--new_tokens 32] [--hf_venv PATH | --no_hf] [--no_int8] [--output PATH]

In one run, on this machine:

* a memory-bandwidth probe (a jitted sum over a 512 MB float32 array: GB/s read) and a matmul
  probe (jitted float32 matmuls of decode shapes, [B, 768] x [768, 2048] and the head's
  [B, 768] x [768, 32000], and a 2048^3 square one: the best FLOP/s);
* a random Llama-shaped decoder (default: vocab 32000, d_model 768, 12 layers, 12 heads, d_ff
  2048, untied head, float32: 134M params, 537 MB; ``--small`` a 4-layer d_model 256 one for a
  quick check) through ``generate.decode.Decoder`` as ``generate.Sampler`` drives it (greedy,
  cache capacity in power-of-two buckets): per batch x prompt length, time to first token (the
  prefill program: prompt forward, cache fill, first token), prefill tok/s, decode tok/s (the
  remaining ``new_tokens - 1`` steps in ``decode`` calls), the cache's bytes;
* the same weights with weight-only int8 (``generate.int8_weights``) at each batch, prompt 128;
* the same weights exported with ``models.hf_export`` and run by ``transformers`` ``generate``
  (PyTorch, greedy, same prompts, same number of new tokens) in a scratch venv
  (``--hf_venv``; created with pip when missing; torch is never a jaxdistill dependency).

Each row's ``bandwidth_fraction`` is the achieved decode tok/s over the bandwidth bound
B * GB/s / (bytes read per step: every weight but the embedding table, plus the cache's
occupied slots, on average over the steps); ``compute_fraction`` is the achieved decode FLOP/s
(2 * those weights + attention's 4 * L * H * K * cached tokens, per token) over the matmul
probe's best. ``vs_transformers`` is our decode tok/s over theirs. Prints a table, writes JSON.
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill.generate import cache as cache_lib  # noqa: E402
from jaxdistill.generate import decode as decode_lib  # noqa: E402
from jaxdistill.generate import int8_weights  # noqa: E402
from jaxdistill.generate.sampling import SamplingParams  # noqa: E402
from jaxdistill.models.transformer import Transformer, TransformerConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA_134M = dict(vocab_size=32000, d_model=768, num_layers=12, num_heads=12, d_ff=2048)
SMALL = dict(vocab_size=4096, d_model=256, num_layers=4, num_heads=4, d_ff=704)


def _best_time(fn, repeats: int) -> float:
  """The fastest of ``repeats`` timed calls of ``fn`` (compiled and warmed once first)."""
  jax.block_until_ready(fn())
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def bandwidth_probe(mbytes: int = 512, repeats: int = 10) -> dict:
  """GB/s of a jitted float32 sum (read only) and a scale-copy (read + write)."""
  x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
  read = _best_time(lambda: jax.jit(jnp.sum)(x), repeats)
  copy = _best_time(lambda: jax.jit(lambda a: a * 2.0)(x), repeats)
  nbytes = x.size * 4
  return {"read_gbs": nbytes / read / 1e9, "copy_gbs": 2 * nbytes / copy / 1e9, "mbytes": mbytes}


def matmul_probe(d_model: int, d_ff: int, vocab: int, repeats: int = 5) -> dict:
  """FLOP/s of jitted float32 matmuls: decode shapes and a square one; the best is the probe."""
  shapes = {
    f"64x{d_model}x{d_ff}": (64, d_model, d_ff),
    f"64x{d_model}x{vocab}": (64, d_model, vocab),
    f"256x{d_model}x{d_ff}": (256, d_model, d_ff),
    "2048x2048x2048": (2048, 2048, 2048),
  }
  out = {}
  for name, (m, k, n) in shapes.items():
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    out[name] = 2 * m * k * n / _best_time(lambda f=f, a=a, b=b: f(a, b), repeats) / 1e9
  return {"gflops": out, "best_gflops": max(out.values())}


def model_config(small: bool, max_len: int) -> TransformerConfig:
  return TransformerConfig(
    **(SMALL if small else LLAMA_134M), max_len=max_len, tie_embeddings=False
  )


def random_variables(module: Transformer, seed: int = 0) -> dict:
  """Random params (N(0, 1 / fan_in) kernels, unit norms) built on the host: no init program."""
  import flax.linen as nn

  rng = np.random.default_rng(seed)
  shapes = nn.unbox(
    jax.eval_shape(lambda r: module.init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))
  )

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(s.shape, s.dtype)
    fan_in = s.shape[0] if "embed" not in name else 1
    return jnp.asarray(rng.standard_normal(s.shape, np.float32) / math.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def weight_bytes_read(params, vocab: int, batch: int, itemsize: bool = True) -> int:
  """Bytes (``itemsize=False``: scalars) one decode step reads from the params: all but the
  embedding table (B rows of it)."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    nbytes = leaf.size * (leaf.dtype.itemsize if itemsize else 1)
    if "token_embed" in jax.tree_util.keystr(path):
      nbytes = batch * nbytes // vocab
    total += nbytes
  return total


def time_decoder(module, variables, prompts_BxP: np.ndarray, new_tokens: int) -> dict:
  """Prefill + ``new_tokens - 1`` decode steps of ``module`` as ``Sampler`` runs them.

  The prefill program is compiled ahead (so the timed call is its only run); the decode
  program is compiled by a 1-step call on a copy of the prefilled state.
  """
  cfg = module.config
  b, p = prompts_BxP.shape
  decoder = decode_lib.Decoder(module, SamplingParams(), (), new_tokens)
  capacity = cache_lib.bucket(p + 1, cfg.max_len)
  args = (
    jnp.asarray(prompts_BxP, jnp.int32),
    jnp.full((b,), p, jnp.int32),
    jnp.arange(b, dtype=jnp.int32),
    jnp.int32(0),
  )
  start = time.perf_counter()
  prefill = decoder.prefill.lower(variables, capacity, *args).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  state = jax.block_until_ready(prefill(variables, *args))
  ttft = time.perf_counter() - start
  warm = jax.tree.map(jnp.copy, state)
  jax.block_until_ready(decoder.decode(variables, warm, jnp.int32(1), jnp.int32(0)))
  del warm
  grow = jax.jit(cache_lib.grow, static_argnums=(1,))
  steps_done, decode_s, cache_bytes = 0, 0.0, cache_lib.nbytes(state.cache)
  while steps_done < new_tokens - 1:
    room = decode_lib.room(state)
    if room < 1:  # as Sampler: the next bucket (not timed: compiles a program per capacity)
      state = grow(
        state.cache, cache_lib.bucket(cache_lib.capacity_of(state.cache) + 1, cfg.max_len)
      )
      continue
    steps = min(room, new_tokens - 1 - steps_done)
    start = time.perf_counter()
    state = jax.block_until_ready(decoder.decode(variables, state, jnp.int32(steps), jnp.int32(0)))
    decode_s += time.perf_counter() - start
    steps_done += steps
    cache_bytes = max(cache_bytes, cache_lib.nbytes(state.cache))
  host = decode_lib.to_host(state)
  assert (host["num_B"] == new_tokens).all(), host["num_B"]
  return {
    "ttft_s": ttft,
    "prefill_tok_s": b * p / ttft,
    "decode_tok_s": b * (new_tokens - 1) / decode_s,
    "decode_s": decode_s,
    "cache_bytes": cache_bytes,
    "capacity": capacity,
    "compile_prefill_s": compile_s,
    "tokens": host["tokens_BxN"],
  }


def flops_per_token(cfg: TransformerConfig, scalars_read: int, context: float) -> float:
  """2 * weight scalars read + attention's scores and context (4 * L * H * K * cached tokens)."""
  return 2 * scalars_read + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def row_limits(cfg, params, b, p, n, tok_s, bw_gbs, peak_gflops) -> dict:
  """Bandwidth bound, bandwidth and compute fractions of ``tok_s`` decode tokens/s."""
  weights = weight_bytes_read(params, cfg.vocab_size, b)
  context = p + n / 2  # cached tokens per row, on average over the decode steps
  cache_read = b * cfg.num_layers * 2 * cfg.kv_heads * cfg.head_dim * 4 * context
  bound = b * bw_gbs * 1e9 / (weights + cache_read)
  scalars = weight_bytes_read(params, cfg.vocab_size, b, itemsize=False)
  achieved = tok_s * flops_per_token(cfg, scalars, context) / 1e9
  return {
    "weight_bytes_read": weights,
    "cache_bytes_read": cache_read,
    "bound_tok_s": bound,
    "bandwidth_fraction": tok_s / bound,
    "decode_gflops": achieved,
    "compute_fraction": achieved / peak_gflops,
  }


def hf_rows(python, variables, cfg, inputs, new_tokens) -> dict:
  """``transformers`` on the exported weights: {(b, p): worker row}."""
  from jaxdistill.models import hf_export

  sys.path.insert(0, HERE)
  from hf_generate_check import run_worker

  with tempfile.TemporaryDirectory() as tmp:
    hf_export.export(jax.device_get(variables["params"]), hf_export.hf_model_for(cfg), tmp)
    spec = {"model_dir": tmp, "new_tokens": new_tokens, "time": True}
    spec["batches"] = [prompts.tolist() for prompts in inputs.values()]
    got = run_worker(python, spec)
  return {key: dict(row, torch=got["torch"]) for key, row in zip(inputs, got["rows"])}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="a 4-layer d_model 256 model")
  parser.add_argument("--batches", default="1,8,64")
  parser.add_argument("--prompts", default="128,1024")
  parser.add_argument("--new_tokens", type=int, default=32)
  parser.add_argument("--hf_venv", default=os.path.join(tempfile.gettempdir(), "hfvenv"))
  parser.add_argument("--no_hf", action="store_true", help="skip transformers")
  parser.add_argument("--no_int8", action="store_true", help="skip weight-only int8")
  parser.add_argument("--output", default=os.path.join(tempfile.gettempdir(), "decode.json"))
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  prompt_lens = [int(p) for p in args.prompts.split(",")]
  n = args.new_tokens
  cfg = model_config(args.small, 2 * max(prompt_lens) + n)
  module = Transformer(cfg)
  variables = random_variables(module)
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables))
  result = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": {"nproc": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version()},
    "jax": jax.__version__,
    "ld_preload": os.environ.get("LD_PRELOAD", ""),
    "config": {
      k: getattr(cfg, k) for k in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff")
    },
    "weight_bytes": weight_bytes,
    "new_tokens": n,
    "load_before": os.getloadavg(),
  }
  result["bandwidth"] = bandwidth_probe(128 if args.small else 512)
  result["matmul"] = matmul_probe(cfg.d_model, cfg.d_ff, cfg.vocab_size)
  bw, peak = result["bandwidth"]["read_gbs"], result["matmul"]["best_gflops"]
  print(f"bandwidth probe: {bw:.1f} GB/s read, {result['bandwidth']['copy_gbs']:.1f} GB/s copy")
  print(f"matmul probe: best {peak:.1f} GFLOP/s {result['matmul']['gflops']}")
  rng = np.random.default_rng(0)
  inputs = {(b, p): rng.integers(0, cfg.vocab_size, (b, p)) for p in prompt_lens for b in batches}
  rows, tokens = [], {}
  for (b, p), prompts in inputs.items():
    got = time_decoder(module, variables, prompts, n)
    tokens[(b, p)] = got.pop("tokens")
    row = {"batch": b, "prompt_len": p, "weights": "float32", **got, "load": os.getloadavg()[0]}
    row.update(row_limits(cfg, variables["params"], b, p, n, got["decode_tok_s"], bw, peak))
    rows.append(row)
    print(
      f"b={b} p={p}: decode {got['decode_tok_s']:.1f} tok/s, ttft {got['ttft_s']:.2f} s", flush=True
    )
  if not args.no_int8:
    module8, variables8 = int8_weights.quantize(module, variables)
    for b in batches:
      p = prompt_lens[0]
      got = time_decoder(module8, variables8, inputs[(b, p)], n)
      same = float((got.pop("tokens") == tokens[(b, p)]).mean())
      row = {"batch": b, "prompt_len": p, "weights": "int8", **got, "load": os.getloadavg()[0]}
      row.update(row_limits(cfg, variables8["params"], b, p, n, got["decode_tok_s"], bw, peak))
      float_row = next(r for r in rows if (r["batch"], r["prompt_len"]) == (b, p))
      row["vs_float"] = got["decode_tok_s"] / float_row["decode_tok_s"]
      row["same_tokens_as_float"] = same
      rows.append(row)
      print(
        f"int8 b={b} p={p}: decode {got['decode_tok_s']:.1f} tok/s ({row['vs_float']:.2f}x float)"
      )
  hf, hf_error = {}, None
  if not args.no_hf:
    try:
      from hf_generate_check import ensure_venv

      hf = hf_rows(ensure_venv(args.hf_venv), variables, cfg, inputs, n)
    except Exception as e:  # noqa: BLE001  (no torch here: the column stays null, said why)
      hf_error = f"{type(e).__name__}: {str(e)[-500:]}"
      print(f"transformers not run: {hf_error}")
  result["transformers_error"] = hf_error
  for row in rows:
    theirs = hf.get((row["batch"], row["prompt_len"]))
    row["transformers_decode_tok_s"] = theirs and theirs["decode_tok_s"]
    row["transformers_ttft_s"] = theirs and theirs["ttft_s"]
    row["vs_transformers"] = (
      theirs and theirs["decode_tok_s"] and row["decode_tok_s"] / theirs["decode_tok_s"]
    )
    if theirs and row["weights"] == "float32":
      row["same_tokens_as_transformers"] = float(
        (np.asarray(theirs["tokens"]) == tokens[(row["batch"], row["prompt_len"])]).mean()
      )
  result["rows"] = rows
  result["torch"] = next(iter(hf.values()), {}).get("torch")
  _print_table(result)
  with open(args.output, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.output}")
  return result


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _print_table(result: dict) -> None:
  fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
  print(
    "| weights | batch | prompt | TTFT s | prefill tok/s | decode tok/s | bound tok/s | "
    "bandwidth fraction | compute fraction | cache MB | transformers tok/s | vs transformers |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in result["rows"]:
    print(
      f"| {r['weights']} | {r['batch']} | {r['prompt_len']} | {r['ttft_s']:.2f} | "
      f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['bound_tok_s']:.1f} | "
      f"{r['bandwidth_fraction']:.2f} | {r['compute_fraction']:.2f} | "
      f"{r['cache_bytes'] / 2**20:.0f} | {fmt(r['transformers_decode_tok_s'], '.1f')} | "
      f"{fmt(r['vs_transformers'], '.2f')} |"
    )


if __name__ == "__main__":
  main()
