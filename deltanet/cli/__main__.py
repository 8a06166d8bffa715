"""``python -m deltanet.cli ...`` (and ``torchrun -m deltanet.cli train ...``): the ``deltanet`` command."""

import sys

from deltanet.cli import main

if __name__ == "__main__":
    sys.exit(main())
