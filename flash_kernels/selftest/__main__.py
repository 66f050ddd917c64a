"""`python -m flash_kernels.selftest`: the self-test's command line (runner.main)."""

import sys

from .runner import main

sys.exit(main())
