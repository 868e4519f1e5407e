"""`python -m r2m.cli`: the `r2m` command (for `accelerate launch -m r2m.cli ...`)."""

import sys

from . import main

sys.exit(main())
