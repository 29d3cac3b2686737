"""A distilled sentence encoder vs its teacher on held-out sentences (configs/minilm_l6_to_l3.py).

  python benchmarks/minilm_eval.py --workdir W [--teacher DIR] [--sentences 512] [--json PATH]

Held-out sentences: the built-in corpus's validation-split docstrings (files never trained
on), split into sentences of 5 to 40 words, the first --sentences of them. Reports:

  cosine      mean cosine(student embedding, teacher embedding) per sentence
  spearman    Spearman correlation between the student's and the teacher's pairwise cosine
              similarities (all sentence pairs)
  ms/batch    median forward time of one batch (--batch_size sentences, padded to the same
              length for both) on this CPU, teacher and student runs interleaved in one
              process (so load from other processes hits both alike)
  speedup     teacher ms/batch / student ms/batch

The teacher defaults to the run's teacher.path (config.json).
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill.data import corpora, sources  # noqa: E402
from jaxdistill.evaluation import embed  # noqa: E402


def held_out_sentences(run_cfg: dict, n: int) -> list[str]:
  """The first ``n`` 5-40-word sentences of the validation split's docstrings."""
  cfg = ml_collections.ConfigDict(run_cfg)
  cfg.data.stdlib_kind = "docstrings"
  docs, _ = sources.open_source(cfg, "validation", corpora.cache_dir(cfg.cache_dir))
  out = []
  for i in range(len(docs)):
    for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", docs[i]):
      sentence = " ".join(sentence.split())
      if 5 <= len(sentence.split()) <= 40 and sentence not in out:
        out.append(sentence)
        if len(out) == n:
          return out
  return out


def _ranks(x: np.ndarray) -> np.ndarray:
  ranks = np.empty(len(x))
  ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation of two 1-D arrays (ties broken by order: continuous data)."""
  return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def ms_per_batch(models: list[embed.Embedder], texts: list[str], repeats: int) -> list[float]:
  """Median ms of one forward pass of ``texts`` per model, runs interleaved (fair under load)."""
  inputs = [embed.encode(m.tokenizer, texts, cap=m.hfm.config.max_len) for m in models]
  for m, (tokens_BxT, valid_BxT) in zip(models, inputs):
    m._apply(m.params, tokens_BxT, valid_BxT).block_until_ready()  # compile
  times = [[] for _ in models]
  for _ in range(repeats):
    for m, (tokens_BxT, valid_BxT), ts in zip(models, inputs, times):
      start = time.perf_counter()
      m._apply(m.params, tokens_BxT, valid_BxT).block_until_ready()
      ts.append(time.perf_counter() - start)
  return [1e3 * statistics.median(ts) for ts in times]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished run of an encoder student")
  parser.add_argument("--teacher", default="", help="HF teacher dir (default: the run's)")
  parser.add_argument("--sentences", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--json", default="")
  args = parser.parse_args()
  with open(os.path.join(args.workdir, "config.json")) as f:
    run_cfg = json.load(f)
  teacher = embed.Embedder(args.teacher or run_cfg["teacher"]["path"])
  student = embed.Embedder(args.workdir)
  texts = held_out_sentences(run_cfg, args.sentences)
  e_t, e_s = teacher(texts), student(texts)
  cosine = np.sum(e_t * e_s, axis=1)
  upper = np.triu_indices(len(texts), k=1)
  rho = spearman((e_t @ e_t.T)[upper], (e_s @ e_s.T)[upper])
  batch = texts[: args.batch_size]
  t_ms, s_ms = ms_per_batch([teacher, student], batch, args.repeats)
  result = {
    "sentences": len(texts),
    "cosine_mean": float(cosine.mean()),
    "cosine_min": float(cosine.min()),
    "spearman": rho,
    "batch_size": len(batch),
    "teacher_ms_per_batch": t_ms,
    "student_ms_per_batch": s_ms,
    "speedup": t_ms / s_ms,
    "devices": str(jax.devices()[0].platform),
  }
  print("| sentences | mean cosine | min cosine | Spearman | teacher ms/batch | student ms/batch "
        "| speedup |")  # fmt: skip
  print("|---|---|---|---|---|---|---|")
  print(
    f"| {len(texts)} | {result['cosine_mean']:.4f} | {result['cosine_min']:.4f} | {rho:.4f} | "
    f"{t_ms:.1f} | {s_ms:.1f} | {result['speedup']:.2f}x |"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
