"""``python -m jaxdistill.cli``: the same as the ``jaxdistill`` console script."""

import sys

from jaxdistill.cli.commands import main

if __name__ == "__main__":
  sys.exit(main())
