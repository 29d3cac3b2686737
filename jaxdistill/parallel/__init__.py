"""Parallelism and numerics: where arrays live and in which dtype they compute.

Owns the device mesh and the ONE logical-axis rules table (``sharding``), ``jax.distributed``
start-up (``distributed``), the teacher's own placement rules (``placement``) and dtype
policies (``precision``).

Layer 1: imports only ``errors`` and ``paths``; everything else in the package stands on it.
"""
