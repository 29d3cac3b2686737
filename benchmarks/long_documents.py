"""Long documents: how many documents a training batch mixes, by shuffle window and streams.

  python benchmarks/long_documents.py [--json out.json] [--cache_dir DIR] [--batches 150]

The quickstart's data (the built-in corpus, 16 x 128 rows, its 4096-token BPE), with each
document's tokens replaced by its index (same lengths, so the same rows), through the real
training pipeline (``pipeline.train_dataset``, no prefetch thread). Per setting: the mean
number of distinct documents in a batch, the mean share of a batch's tokens held by its most
common document, how many documents the whole run of batches saw (150 batches: a quickstart
student's run), the time to the first batch and per later batch, and the peak host memory
Python allocated while filling and serving (tracemalloc, numpy arrays included; a second,
untraced pass gives the times). Settings: the old general default (a 1024-row window),
``data.interleave`` streams at a window of at most that size, and the quickstart's
whole-split window (32,768 rows).
"""

import argparse
import json
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from jaxdistill import data as data_lib  # noqa: E402
from jaxdistill import quickstart
from jaxdistill.data import text as pipeline  # noqa: E402

OFFSET = 1 << 20  # document k's tokens become OFFSET + k (the vocabulary is far below it)

SETTINGS = (  # (name, shuffle_rows, interleave)
  ("window 1024 (old default)", 1024, 0),
  ("window 512 + 16 streams", 512, 16),
  ("window 512 + 64 streams", 512, 64),
  ("window 1024 + 64 streams", 1024, 64),
  ("no window, 64 streams", 0, 64),
  ("window 32768 (quickstart, whole split)", 32768, 0),
)


class _DocIds:
  """A tokenizer whose encodings are the real ones with every id replaced by OFFSET + the
  document's index (EOS kept), so a batch's tokens say which documents it holds."""

  def __init__(self, tokenizer, texts):
    self._tok, self._index = tokenizer, {t: i for i, t in enumerate(texts)}

  def token_to_id(self, name):
    return self._tok.token_to_id(name)

  def encode_batch(self, texts):
    out = []
    for text, enc in zip(texts, self._tok.encode_batch(texts)):
      out.append(type("Enc", (), {"ids": [OFFSET + self._index[text]] * len(enc.ids)}))
    return out


def measure(cfg, prepared, batches: int, traced: bool) -> dict:
  """Diversity over ``batches`` batches; first-batch and per-batch time; peak traced bytes."""
  if traced:
    tracemalloc.start()
  start = time.perf_counter()
  it = iter(pipeline.train_dataset(cfg, prepared, 0, 1))
  first = next(it)
  first_s = time.perf_counter() - start
  got = [first] + [next(it) for _ in range(batches - 1)]
  per_batch_s = (time.perf_counter() - start - first_s) / (batches - 1)
  peak = tracemalloc.get_traced_memory()[1] if traced else 0
  if traced:
    tracemalloc.stop()
  distinct, top_share, seen = [], [], set()
  for b in got:
    ids = b["inputs"][b["inputs"] >= OFFSET] - OFFSET
    counts = np.bincount(ids)
    distinct.append(int((counts > 0).sum()))
    seen.update(np.flatnonzero(counts).tolist())
    top_share.append(float(counts.max() / counts.sum()))
  return {
    "docs_per_batch_mean": float(np.mean(distinct)),
    "docs_per_batch_min": int(np.min(distinct)),
    "top_doc_share_mean": float(np.mean(top_share)),
    "docs_seen": len(seen),
    "first_batch_s": first_s,
    "per_batch_ms": 1e3 * per_batch_s,
    "peak_traced_mb": peak / 2**20,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--cache_dir", default="", help="jaxdistill cache (default: the usual)")
  # 150: the quickstart students' steps (docs seen: how many files such a run trains on)
  parser.add_argument("--batches", type=int, default=150)
  args = parser.parse_args(argv)

  base = quickstart.student_config("full", kd=False)
  base.cache_dir = args.cache_dir
  data_lib.check(base)  # builds the corpus and tokenizer once, outside the timings
  real = pipeline.prepare(base)
  texts = [real.train[i] for i in range(len(real.train))]
  prepared = pipeline.Prepared(texts, "", _DocIds(real.tokenizer, texts), "", "")
  rows = {}
  for name, shuffle_rows, interleave in SETTINGS:
    cfg = quickstart.student_config("full", kd=False)
    cfg.data.update(shuffle_rows=shuffle_rows, interleave=interleave, prefetch=0)
    traced = measure(cfg, prepared, args.batches, traced=True)
    timed = measure(cfg, prepared, args.batches, traced=False)
    rows[name] = {**traced, "first_batch_s": timed["first_batch_s"]}
    rows[name]["per_batch_ms"] = timed["per_batch_ms"]
    assert timed["docs_per_batch_mean"] == traced["docs_per_batch_mean"]  # deterministic
    print(name, json.dumps(rows[name]), flush=True)
  shape = f"{base.data.batch_size} x {base.data.seq_len}"
  print(f"\n{len(texts)} training documents, batches of {shape}, {args.batches} batches")
  print(
    f"{'setting':40s} {'docs/batch':>10s} {'min':>4s} {'top share':>9s} {'first s':>8s}"
    f" {'ms/batch':>9s} {'peak MB':>8s}"
  )
  for name, r in rows.items():
    print(
      f"{name:40s} {r['docs_per_batch_mean']:10.1f} {r['docs_per_batch_min']:4d} "
      f"{r['top_doc_share_mean']:9.2f} {r['first_batch_s']:8.2f} {r['per_batch_ms']:9.1f} "
      f"{r['peak_traced_mb']:8.1f} {r['docs_seen']:9d}"
    )
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"documents": len(texts), "batches": args.batches, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
