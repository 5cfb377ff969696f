"""``python -m cmda_data``: the ``cmda`` command (see :mod:`cmda_data.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
