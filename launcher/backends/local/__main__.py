"""`python -m launcher.backends.local RUN_DIR [--echo]`: a detached supervisor, or the one
inside a Docker container (which echoes rank output to the container's log)."""

import sys
from pathlib import Path

from launcher.backends.local.supervisor import supervise

raise SystemExit(supervise(Path(sys.argv[1]), echo="--echo" in sys.argv[2:]))
