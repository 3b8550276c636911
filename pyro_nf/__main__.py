"""``python -m pyro_nf``: the ``pyro-nf`` command line (also what ``torchrun -m pyro_nf`` runs)."""

import sys

from pyro_nf.cli import main

if __name__ == "__main__":
    sys.exit(main())
