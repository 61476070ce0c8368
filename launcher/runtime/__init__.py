"""What runs inside the job: the built-in trainer and helpers for user scripts.

This package is the only one that imports torch at module level, in its submodules
(`dist`, `seed`, `loader`, `models`, `optim`, `checkpoint`, `trainer`). This file itself
stays torch-free, so the submit side (the Slurm backend) can read the exit codes below
without paying for a torch import in `--help` or `--dry-run`.

Exit codes of `python -m launcher.runtime`:
  0                   the run finished all its steps
  1                   the run failed (a traceback is in the rank's log)
  2                   bad configuration or environment (one line on stderr)
  REQUEUE_EXIT_CODE   stopped by SIGUSR1 / SIGUSR2 / SIGTERM after checkpointing: start the
                      same run again and it resumes from that checkpoint
"""

from __future__ import annotations

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry".
# Distinct from 0/1/2, from 128+N (killed by signal N) and from Python's own codes.
REQUEUE_EXIT_CODE = 75
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# Signals that mean "finish the step, checkpoint, exit with REQUEUE_EXIT_CODE".
# Slurm sends USR2 (or what `--signal` says) before the time limit; schedulers send TERM.
STOP_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM")

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "REQUEUE_EXIT_CODE", "STOP_SIGNALS"]
