"""`python -m hostkit.cli`: the `edgekit` command."""

import sys

from hostkit.cli import main

sys.exit(main())
