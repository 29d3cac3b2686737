"""Config checks of one section each, run by ``config.validate.validate`` (the one entry point).

  continual the ``continual`` section: a drifting stream, its windows, the teacher's refresh
  distill   the ``distill`` section: loss kinds, weights, layer maps, schedules, the fused head
  teachers  several teachers: ``teachers``, ``distill.ensemble``, feature terms' teacher indices
  vision    image classifiers: models, their pairing, losses and data

Layer 3, with ``validate``: may import ``config``, ``models``, ``data``, ``distill`` and below.
"""
