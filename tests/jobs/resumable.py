"""A torchrun-style job that checkpoints every step and stops cleanly on SIGUSR2/SIGTERM.

Used by the requeue tests: it must finish all its steps across attempts, resuming from
its own checkpoint. Every attempt is logged to attempts-seen.jsonl in the run dir.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 40
STEP_S = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
run_dir = Path(os.environ["LAUNCHER_RUN_DIR"])
ckpt = run_dir / f"ckpt-rank{os.environ['RANK']}.json"
stop = []
signal.signal(signal.SIGUSR2, lambda *_: stop.append("USR2"))
signal.signal(signal.SIGTERM, lambda *_: stop.append("TERM"))

step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
with open(run_dir / "attempts-seen.jsonl", "a") as fh:
    fh.write(
        json.dumps(
            {
                "rank": os.environ["RANK"],
                "resumed_at": step,
                "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            }
        )
        + "\n"
    )
print(f"starting at step {step}", flush=True)
while step < STEPS:
    time.sleep(STEP_S)
    step += 1
    tmp = ckpt.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step}))
    os.replace(tmp, ckpt)
    if stop:
        print(f"got {stop[0]} at step {step}: checkpointed, exiting for requeue", flush=True)
        sys.exit(75)
(run_dir / f"done-rank{os.environ['RANK']}.json").write_text(json.dumps({"step": step}))
print("finished", flush=True)
