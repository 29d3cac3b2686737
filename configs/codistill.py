"""Two students that teach each other while both train, on the built-in corpus (the stdlib).

  jaxdistill train --config configs/codistill.py --workdir workdirs/codistill
  jaxdistill train --config configs/codistill.py:test --workdir /tmp/codistill  (seconds)
  jaxdistill train --config configs/codistill.py:mutual --workdir workdirs/mutual

No frozen teacher: the student (model 0) and a peer (``codistill.peers``) train together in
the one jitted step, each on its CE plus a KL to the other's stop-gradient predictions
(jaxdistill/train/codistill.py), each with its own AdamW and learning rate.

Variants (``get_config``'s argument, ``SIZE`` or ``MODE`` or ``MODE,SIZE``):

* ``codistill`` (the default): Anil et al. (2018). Each model reads its own half of every
  batch's rows (``split_data``) and sees the other only through a copy of its params
  refreshed every ``exchange_every`` steps (50 at full size), inside the step.
* ``mutual``: deep mutual learning (Zhang et al. 2018): both models read the whole batch and
  each other's current predictions (``exchange_every=1``).

Sizes: ``full`` (the quickstart's CE student twice, 300 steps) or ``test`` (a few stdlib
files, tiny models, exchange every 2 steps; about a minute on 2 cores with compilation).
Corpus, tokenizer, model and optimizer are the quickstart's CE student at that size
(``configs/quickstart.py``); the peer is the same architecture with its own init (a peer of
another size is one key away: ``codistill.peers=({"d_model": 64, "lr": 1e-3},)``).
"""

import os

from jaxdistill.config import config_module
from jaxdistill.errors import ConfigError

_RECIPE = config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
# Per size: steps, steps between exchanges (codistill), the KL weight, the eval interval.
SIZES = {
  "full": dict(steps=300, exchange_every=50, weight=1.0, eval_every=50),
  "test": dict(steps=8, exchange_every=2, weight=1.0, eval_every=4),
}
MODES = ("codistill", "mutual")


def get_config(arg: str = "codistill"):
  """The run for ``arg``: a mode (codistill | mutual), a size (full | test), or both
  ("mutual,test")."""
  parts = [p for p in arg.split(",") if p]
  mode = next((p for p in parts if p in MODES), "codistill")
  size = next((p for p in parts if p in SIZES), "full")
  unknown = [p for p in parts if p not in MODES and p not in SIZES]
  if unknown:
    raise ConfigError(
      "--config",
      f"configs/codistill.py:{arg}: use a mode ({', '.join(MODES)}) and/or a size "
      f"({', '.join(SIZES)}), e.g. codistill.py:mutual,test",
    )
  r = SIZES[size]
  cfg = _RECIPE.student_config(size, kd=False)  # CE only, no teacher
  steps = r["steps"]
  cfg.optim.update(steps=steps, warmup_steps=max(1, int(0.1 * steps)))
  c = cfg.codistill
  c.peers = ({"lr": cfg.optim.lr},)  # the student's architecture, its own init and AdamW
  c.weight, c.temperature = r["weight"], 1.0
  if mode == "codistill":
    c.update(exchange_every=r["exchange_every"], split_data=True)
  else:
    c.update(exchange_every=1, split_data=False)
  cfg.eval.every = r["eval_every"]
  return cfg
