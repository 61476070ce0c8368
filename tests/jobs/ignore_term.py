"""Ignores the stop signal (says so) and sleeps: only SIGKILL after the grace ends it."""

import os
import signal
import time
from pathlib import Path


def _ignore(signum: int, _frame: object) -> None:
    print(f"ignoring {signal.Signals(signum).name}", flush=True)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(sig, _ignore)
Path(os.environ["LAUNCHER_RUN_DIR"], f"ready-rank{os.environ['RANK']}").write_text(str(os.getpid()))
while True:
    time.sleep(1)
