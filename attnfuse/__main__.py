"""``python -m attnfuse``: the command-line interface (see :mod:`attnfuse.cli`)."""
from attnfuse.cli import main

raise SystemExit(main())
