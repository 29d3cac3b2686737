"""``jaxdistill precompute``: the teacher run once, its targets stored for later runs.

  text    sparse top-k / sampled targets of a language teacher in ArrayRecord shards (and the
          dispatcher ``run``, which hands image classifiers to ``images``)
  images  the whole class logits of an image classifier, by example index

Layer 6 (a job): may import ``train``, ``data``, ``distill`` and below; only the CLI and other
jobs import it.
"""
