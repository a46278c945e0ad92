"""`python -m headstart.cli`: the same command as the `headstart` script."""

import sys

from headstart.cli.main import main

sys.exit(main())
