"""`python -m launcher.backends.local RUN_DIR [--echo] [--wait-stdin] [--lifeline-stdin]`: a
detached supervisor (`--wait-stdin`: start once the launcher has recorded it), or the one
inside a Docker container (`--echo` rank output to the container's log; `--lifeline-stdin`:
stop the run when the foreground launcher's attached stdin closes)."""

import sys
from pathlib import Path

from launcher.backends.local.supervisor import supervise
from launcher.errors import LauncherError

flags = sys.argv[2:]
try:
    code = supervise(
        Path(sys.argv[1]),
        echo="--echo" in flags,
        wait_stdin="--wait-stdin" in flags,
        lifeline_stdin="--lifeline-stdin" in flags,
    )
except LauncherError as exc:
    print(f"launcher: error: {exc}", file=sys.stderr)
    code = exc.exit_code
raise SystemExit(code)
