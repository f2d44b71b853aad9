import sys

from devicekit.cli import main

sys.exit(main())
