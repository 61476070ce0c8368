"""`python -m launcher` is the same as the `launcher` console script."""

from launcher.cli import main

raise SystemExit(main())
