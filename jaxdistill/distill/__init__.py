"""The distillation objective: pure loss functions and the terms built from the config.

Owns the logit divergences, MiniLM relations and hidden-state losses (``losses``), the CNN
feature-map losses (``vision_losses``), several teachers' combined target (``ensemble``),
scalar schedules (``schedules``), layer maps (``layer_maps``), the chunked heads that never
form [N, V] logits in float32 (``closed_form``, ``chunking``, ``fused``, ``sparse``) and the
objective itself (``heads`` + ``objective``: one head term chosen at build time plus feature
terms, each a record), and the losses on sequences the student wrote (``policy_losses``: the
sampled-token reverse KL; not yet a term of the objective).

Layers 1 (the pure functions: losses, vision_losses, ensemble, schedules, layer_maps,
closed_form) and 3 (heads, objective, chunking, fused, sparse: these read ``config`` and
``models``). Nothing here imports ``train``, the jobs or the CLI.
"""
