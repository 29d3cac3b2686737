"""Generation: key/value-cache decoding, sampling, speculative decoding, the ``generate`` job.

  sampling.py     SamplingParams, per-row keys from (seed, row, step), the logits transforms
  cache.py        the key/value cache pytree: init, buckets, grow, logical sharding
  decode.py       Decoder: the jitted prefill and the ``lax.while_loop`` decode of one model
  sampler.py      Sampler(model, variables, tokenizer).generate / .stream: the Python API
  timing.py       time to first token and decode tokens/s of Samplers (``eval --latency``)

Layers: ``sampling`` is pure (layer 1); ``cache``, ``decode`` and ``sampler`` build on
``models`` (layer 3). Nothing here imports training, the jobs or the CLI.
"""

from jaxdistill.generate.sampler import Completion, Sampler
from jaxdistill.generate.sampling import SamplingParams

__all__ = ["Completion", "Sampler", "SamplingParams"]
