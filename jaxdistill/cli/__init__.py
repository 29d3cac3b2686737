"""The ``jaxdistill`` command line: parse, load and validate the config, call a job.

  commands  the parser, the commands and ``main(argv)`` (the console script's entry point)
  compress  the compression commands: ``pipeline``, ``prune``, ``quantize``

The top layer: it may import anything; nothing imports it. JAX is imported only after the
config is known good.
"""

from jaxdistill.cli.commands import main

__all__ = ["main"]
