"""Generation: key/value-cache decoding, sampling, speculative decoding, the ``generate`` job.

  sampling.py     SamplingParams, per-row keys from (seed, row, step), the logits transforms
  cache.py        the key/value cache pytree: init, buckets, grow, logical sharding
  decode.py       Decoder: the jitted prefill and the ``lax.while_loop`` decode of one model
  sampler.py      Sampler(model, variables, tokenizer).generate / .stream: the Python API
  int8_weights.py quantize(model, variables): weight-only int8 decoding (int8 kernels + scales)
  prompts.py      the command's prompts and stop tokens, checked (layer 3)
  output.py       the command's resumable .jsonl file and its settings sidecar (layer 3)
  load.py, job.py ``jaxdistill generate``: the model to run, batches, output (layer 6, jobs)
  spec_decode.py  SpecDecoder: the jitted draft-then-verify rounds of speculative decoding
  speculative.py  SpeculativeSampler(target, ..., draft, ...).generate -> (completions, SpecStats)
  timing.py       time to first token and decode tokens/s of Samplers (``eval --latency``)

Layers: ``sampling`` is pure (layer 1); ``cache``, ``decode``, ``sampler`` and ``timing``
build on ``models`` (layer 3). Only ``load`` and ``job`` (jobs, imported by the CLI alone)
import training or evaluation.
"""

from jaxdistill.generate.sampler import Completion, Sampler
from jaxdistill.generate.sampling import SamplingParams
from jaxdistill.generate.speculative import SpecStats, SpeculativeSampler, acceptance_rate

__all__ = [
  "Completion",
  "Sampler",
  "SamplingParams",
  "SpecStats",
  "SpeculativeSampler",
  "acceptance_rate",
]
