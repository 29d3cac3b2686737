"""Measuring models: validation metrics, latency and size, embeddings, the eval job.

  classify  classification metrics as weighted sums (layer 1, used by losses' callers)
  evaluate  language models and image classifiers on a validation split (layer 4: the loop
            calls it)
  latency   compiled forward passes timed warm and interleaved, memory, params, bytes (layer 4)
  job       ``jaxdistill eval``: a finished run's student and teacher measured (layer 6)
  embed     ``jaxdistill embed``: sentence embeddings from an encoder (layer 6)

The job modules may import ``train``; the lower ones only ``models``, ``data``, ``parallel``.
"""
