"""How a job's entrypoint becomes argv and environment for one process, on any backend.

Every backend starts the same commands with the same torchrun-style variables, so a
script that works locally works in Docker and on Slurm unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.hardware import LoaderPicks
from launcher.spec import JobSpec

# Set by the launcher for every process; documented in the README.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def python_for(spec: JobSpec) -> str:
    """The interpreter of the job: the configured one, else the one running launcher."""
    return spec.entrypoint.python or sys.executable


def entry_argv(spec: JobSpec, python: str | None = None) -> list[str]:
    """argv of one process: the user's script, the callable runner, or the built-in trainer."""
    py = python or python_for(spec)
    ep = spec.entrypoint
    if ep.kind == "script":
        return [py, ep.script or "", *ep.args]
    if ep.kind == "callable":
        return [py, "-m", "launcher.call", ep.callable or ""]
    return [py, "-m", "launcher.runtime"]


def dist_env(
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int,
    master_addr: str,
    master_port: int | str,
) -> dict[str, str]:
    """The torchrun-style variables for one process."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def job_env(spec: JobSpec, *, run_dir: Path | str, picks: LoaderPicks | None) -> dict[str, str]:
    """Variables every process of the job gets: the user's env, run paths, loader picks."""
    env = {
        "LAUNCHER_RUN_DIR": str(run_dir),
        "LAUNCHER_CONFIG": str(Path(run_dir) / "config.yaml"),
        "LAUNCHER_JOB_NAME": spec.name,
        # Reproducible hashing in every rank (seeding also covers random/numpy/torch).
        "PYTHONHASHSEED": str(spec.train.seed),
        # Unbuffered output, so logs show progress as it happens and survive a kill.
        "PYTHONUNBUFFERED": "1",
    }
    if picks is not None:
        env.update(picks.as_env())
    env.update(spec.env)
    return env
