"""A torchrun-style script for tests: writes what it sees of the launch env, per rank."""

import json
import os
import sys
from pathlib import Path

KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LAUNCHER_NUM_WORKERS",
    "LAUNCHER_PIN_MEMORY",
    "LAUNCHER_RUN_DIR",
    "CUSTOM",
    "SLURM_PROCID",
    "SLURM_JOB_ID",
    "SLURMD_NODENAME",
)
out = Path(os.environ["LAUNCHER_RUN_DIR"]) / f"env-rank{os.environ['RANK']}.json"
out.write_text(json.dumps({"argv": sys.argv[1:], **{k: os.environ.get(k) for k in KEYS}}))
print("env written", out)
