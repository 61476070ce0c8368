"""Helpers for tests against the real local Slurm cluster (slurm/start.sh)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from launcher import runs
from launcher.backends.slurm.backend import BACKEND
from tests.conftest import need


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def require_cluster() -> None:
    need(cluster_up(), "the local Slurm cluster (bash slurm/start.sh)")


def wait_state(run_dir: Path, states: tuple[str, ...], timeout: float = 180) -> dict:
    """Poll the run's record through the backend's batched refresh until a state is reached."""
    deadline = time.monotonic() + timeout
    record = runs.read_record(run_dir)
    while time.monotonic() < deadline:
        BACKEND.refresh([run_dir])
        record = runs.read_record(run_dir)
        if record["state"] in states:
            return record
        time.sleep(1)
    raise AssertionError(
        f"run stayed {record['state']} (slurm {record.get('slurm_state')}) "
        f"for {timeout:.0f}s; wanted {states}"
    )


def only_run(runs_dir: Path) -> Path:
    found = list(runs.iter_run_dirs(runs_dir))
    assert len(found) == 1, found
    return found[0]


def wait_file(path_glob: str, folder: Path, timeout: float = 120, predicate=None) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in folder.glob(path_glob):
            if predicate is None or predicate(path):
                return path
        time.sleep(0.5)
    raise AssertionError(f"no {path_glob} in {folder} after {timeout:.0f}s")
