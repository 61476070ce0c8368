"""Sleeps long and records its pid, for cancel and Ctrl-C tests."""

import os
import time
from pathlib import Path

Path(os.environ["LAUNCHER_RUN_DIR"], f"pid-rank{os.environ['RANK']}").write_text(str(os.getpid()))
print("sleeping", flush=True)
time.sleep(300)
