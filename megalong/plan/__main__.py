"""`python -m megalong.plan ...` — the same as `megalong plan ...`."""
import sys

from megalong.plan.cli import main

sys.exit(main())
