"""`python -m dseh` runs the command-line interface."""

from dseh.cli import main

raise SystemExit(main())
