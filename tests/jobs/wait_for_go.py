"""Says it is ready, then exits 0 as soon as the test creates `go` in the run dir."""

import os
import time
from pathlib import Path

run_dir = Path(os.environ["LAUNCHER_RUN_DIR"])
(run_dir / f"ready-rank{os.environ['RANK']}").write_text(str(os.getpid()))
while not (run_dir / "go").exists():
    time.sleep(0.05)
print("go seen; exiting 0", flush=True)
