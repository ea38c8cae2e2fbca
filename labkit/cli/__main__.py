"""`python -m labkit.cli ...`, the same as the `labkit` script."""

import sys

from labkit.cli import main

sys.exit(main())
