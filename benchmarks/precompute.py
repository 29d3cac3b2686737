"""Teacher-target precompute: throughput relative to the teacher alone, and bytes per token.

  python benchmarks/precompute.py [--rows 192] [--json PATH]

For top-k with k in {8, 32, 64, 128} (bf16 log-probs) and for sampled targets (n = 16 draws),
on synthetic data with a random teacher (d256, 4 layers, vocabulary 8192, T = 128, 16 rows a
batch):

* ``throughput_ratio``: ``jaxdistill precompute``'s tokens/s (reading rows, teacher, targets,
  fetching, encoding, writing ArrayRecord shards) over the teacher-forward-only tokens/s (the
  same compiled forward + top-k / sampling, every batch's result awaited, nothing written),
  measured in the same run, forward-only before and after (their mean). >= 0.9 means writing
  overlaps compute. The function is compiled before either is timed.
* ``bytes_per_token``: bytes of the shard files on disk (zstd by ArrayRecord) per token,
  everything included: the row's own ids, segment ids and positions and the container.
  ``target_bytes_per_token``: the raw (uncompressed) target part of the records per token,
  i.e. without the row's 8 bytes per token (to compare with 4 k + 8).

``k`` is the top-k size, or n (draws per token) for sampled targets. A random teacher is
near-uniform, so its n draws are nearly all distinct: the worst case for sampled storage.
Timings on a shared machine are noisy: compare the ratios, taken in the same run.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from array_record.python import array_record_module

from jaxdistill.config import default_config, validate
from jaxdistill.data import cached
from jaxdistill.parallel import sharding as sharding_lib
from jaxdistill.precompute import text as precompute

ROW_BYTES_PER_TOKEN = 8  # inputs, targets (uint16), segment ids, positions (uint16)


def _config(targets: str, k: int, rows: int):
  cfg = default_config()
  model = dict(vocab_size=8192, d_model=256, num_layers=4, num_heads=4, d_ff=1024, max_len=128)
  cfg.student.update(model)
  cfg.teacher.update(model, source="random")
  cfg.data.update(batch_size=16, seq_len=128, pad_fraction=0.1)
  # One shard: ArrayRecord files grow in 64 KiB blocks, which small shards would overstate.
  cfg.precompute.update(targets=targets, k=k, samples=16, rows=rows, rows_per_shard=rows)
  cfg.log.progress = False
  validate.validate(cfg)
  return cfg


def _forward_only(teacher, batches) -> float:
  """Tokens/s of the compiled teacher + targets function alone (results awaited, not written)."""
  start, pending = time.perf_counter(), None
  for batch, index in batches:
    out = teacher.fn(teacher.params, batch, index)
    if pending is not None:
      jax.block_until_ready(pending)
    pending = out
  jax.block_until_ready(pending)
  tokens = sum(b["inputs"].size for b, _ in batches)
  return tokens / (time.perf_counter() - start)


def _sizes(output: str, layout: cached.Layout) -> tuple[int, int, int]:
  """(bytes on disk, record payload bytes, tokens) of a cache."""
  disk = payload = rows = 0
  for name in sorted(os.listdir(output)):
    if name.endswith(".arrayrecord"):
      path = os.path.join(output, name)
      disk += os.path.getsize(path)
      reader = array_record_module.ArrayRecordReader(path)
      records = reader.read_all()
      reader.close()
      payload += sum(len(r) for r in records)
      rows += len(records)
  return disk, payload, rows * layout.seq_len


def measure(targets: str, k: int, rows: int, workdir: str) -> dict:
  cfg = _config(targets, k, rows)
  output = os.path.join(workdir, f"{targets}-{k}")
  teacher = precompute.build_teacher(cfg, output)
  host_rows = list(precompute.row_stream(cfg))
  b = cfg.data.batch_size
  batches = []
  with sharding_lib.rules_context(teacher.mesh):
    for lo in range(0, rows, b):
      batch = sharding_lib.shard_batch(
        precompute._host_batch(host_rows[lo : lo + b], b), teacher.mesh
      )
      index = sharding_lib.shard_batch({"i": np.arange(lo, lo + b, dtype=np.int32)}, teacher.mesh)
      batches.append((batch, index["i"]))
    jax.block_until_ready(teacher.fn(teacher.params, *batches[0]))  # compile
    before = _forward_only(teacher, batches)
  result = precompute.run(cfg, output, teacher=teacher)
  with sharding_lib.rules_context(teacher.mesh):
    after = _forward_only(teacher, batches)
  layout = cached.layout_of(cfg)
  disk, payload, tokens = _sizes(output, layout)
  forward = (before + after) / 2
  rate = result["tokens"] / result["seconds"]
  return {
    "targets": "sampled" if targets == "sampled" else "topk",
    "k": k if targets == "topk" else layout.samples,
    "bytes_per_token": round(disk / tokens, 1),
    "target_bytes_per_token": round(payload / tokens - ROW_BYTES_PER_TOKEN, 1),
    "throughput_ratio": round(rate / forward, 3),
    "precompute_tokens_per_s": round(rate),
    "forward_tokens_per_s": round(forward),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=192, help="rows (of 128 tokens) per setting")
  parser.add_argument("--json", default=None, help="write the rows as JSON here")
  args = parser.parse_args(argv)
  settings = [("topk", k) for k in (8, 32, 64, 128)] + [("sampled", 32)]  # k unused there
  results = []
  header = "targets  k    bytes/token  target bytes/token  (4k+8)  precompute/forward  tok/s"
  print(header)
  with tempfile.TemporaryDirectory() as workdir:
    for targets, k in settings:
      r = measure(targets, k, args.rows, workdir)
      results.append(r)
      bound = f"{4 * r['k'] + 8:6d}" if targets == "topk" else "     -"
      print(
        f"{r['targets']:8} {r['k']:<4} {r['bytes_per_token']:11.1f}  "
        f"{r['target_bytes_per_token']:18.1f}  {bound}  {r['throughput_ratio']:18.3f}  "
        f"{r['precompute_tokens_per_s']:,}",
        flush=True,
      )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
