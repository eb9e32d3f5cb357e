"""`python -m clarity.cli ...`: the same as the `clarity` command."""

import sys

from clarity.cli import main

sys.exit(main())
