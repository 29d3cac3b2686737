"""Compression jobs on finished runs: pruning, post-training int8, the progressive pipeline.

  stages     a pipeline config's declaration of its stages, checked before anything runs
             (layer 3)
  prune_job  ``prune_workdir``: a finished run's student scored and cut to a smaller shape
  ptq        post-training quantisation of a finished student; int8 files read back
  pipeline   ``jaxdistill pipeline``: distil, prune, distil again, quantise, stage by stage

The model-level operations these call (scores, surgery, qwix QAT) live in ``models``. Layer 6
(jobs): may import ``train``, ``evaluation``, ``report`` and below.
"""
