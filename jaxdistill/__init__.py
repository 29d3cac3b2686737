"""jaxdistill: knowledge distillation at scale in JAX/Flax.

A frozen teacher and a trainable student run inside one jitted, mesh-sharded
``distill_step(state, teacher_vars, batch)``. See README.md for a tour.
"""

__version__ = "0.1.0"
