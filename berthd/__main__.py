"""``python -m berthd ...`` runs the ``berthd`` command."""

import sys

from berthd.daemon.cli import main

sys.exit(main())
