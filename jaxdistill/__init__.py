"""jaxdistill: knowledge distillation at scale in JAX/Flax.

A frozen teacher and a trainable student run inside one jitted, mesh-sharded
``distill_step(state, teacher_vars, batch)``. The package map and its layers:
docs/architecture.md.

The public Python API, importable from here (each name is imported on first use, so
``import jaxdistill`` stays light and JAX starts only when a function needs it)::

  cfg = jaxdistill.load_config("configs/smoke.py", [("optim.steps", "20")])
  summary = jaxdistill.train_run(cfg, "runs/smoke")   # a whole run in a workdir (resumable)
  run = jaxdistill.build_run(cfg)                     # mesh, models, state, the jitted step
  result = jaxdistill.evaluate_workdir("runs/smoke")  # a finished run on its validation split
  jaxdistill.precompute_targets(cfg, "cache/")        # teacher targets stored for later runs

``default_config()`` is the schema every config file starts from.
"""

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute): one short path per entry point.
_API = {
  "default_config": ("jaxdistill.config", "default_config"),
  "load_config": ("jaxdistill.config", "load_config"),
  "validate": ("jaxdistill.config.validate", "validate"),
  "build_run": ("jaxdistill.train.run", "build_run"),
  "train_run": ("jaxdistill.train.loop", "train"),
  "evaluate_workdir": ("jaxdistill.evaluation.job", "evaluate_workdir"),
  "precompute_targets": ("jaxdistill.precompute.text", "run"),
  "JaxdistillError": ("jaxdistill.errors", "JaxdistillError"),
  "ConfigError": ("jaxdistill.errors", "ConfigError"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
  # PEP 562: resolve a public name lazily. The names differ from the subpackages' (``train``,
  # ``precompute``): once imported, a subpackage is an attribute of this package and would win.
  if name in _API:
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'jaxdistill' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_API))
