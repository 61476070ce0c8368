"""`python -m launcher.runtime`: the built-in trainer in one process of a launched job.

Reads LAUNCHER_CONFIG (the run's resolved config.yaml) and LAUNCHER_RUN_DIR, ranks from the
torchrun-style or Slurm variables. Exit codes are listed in `launcher.runtime`.
"""

from __future__ import annotations

import os
import sys

from launcher.errors import LauncherError


def main() -> int:
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    try:
        from launcher.runtime.trainer import run_from_environ

        return run_from_environ().exit_code
    except LauncherError as exc:
        print(f"launcher.runtime: rank {rank}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
