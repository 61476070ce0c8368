"""Runs in the batch shell on the first node, under submitit: the host side of a job.

`StepTask` runs in the batch shell on the first node: it starts ONE `srun` step with
every rank (optionally inside a pyxis container) and keeps the requeue decision on the
host side. When Slurm signals the batch shell (USR2 before the time limit, or on
preemption), submitit calls `checkpoint()`: the signal is forwarded to the step, the
ranks save a checkpoint and exit, and the job is requeued until `max_requeue` is spent.

`CallableTask` runs the user's callable in every task through submitit, with the
torchrun-style variables exported.

Both leave one exit file per rank and attempt (`rank.write_exit`): srun exits 0 even when it
could not start the tasks, so the host side fails the job when a rank wrote none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from launcher.backends.slurm.rank import (
    dist_env_from_slurm,
    missing_ranks,
    never_reported,
    write_exit,
)
from launcher.backends.slurm.status import run_slurm_command
from launcher.errors import BackendError
from launcher.ports import free_port

# How long the host waits for the exit files of ranks that ran on other nodes.
EXIT_FILES_GRACE_S = 10


def _append_attempt(run_dir: Path, event: dict[str, Any]) -> None:
    """One JSON line per attempt event; a single small append is atomic on POSIX."""
    line = json.dumps(event) + "\n"
    fd = os.open(run_dir / "attempts.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _attempt_event(run_dir: Path, phase: str, **extra: Any) -> None:
    _append_attempt(
        run_dir,
        {
            "phase": phase,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "node": os.environ.get("SLURMD_NODENAME", socket.gethostname()),
            "time": time.time(),
            **extra,
        },
    )


class StepTask(submitit.helpers.Checkpointable):
    """Host side of a script / built-in-trainer job: one srun step with all ranks."""

    def __init__(
        self,
        srun_argv: list[str],
        run_dir: str,
        max_requeue: int,
        grace_s: int,
        env: dict[str, str],
        signal_delay_s: int = 0,
        world_size: int = 0,
    ):
        self.srun_argv = srun_argv
        # Ranks that must each leave an exit file for the step to count as done.
        self.world_size = world_size
        self.run_dir = run_dir
        self.env = env
        self.signal_delay_s = signal_delay_s
        self.max_requeue = max_requeue
        self.grace_s = grace_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running process is not part of the requeued job
        return state

    def __call__(self) -> int:
        run_dir = Path(self.run_dir)
        env = {**os.environ, **self.env}
        env["MASTER_ADDR"] = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        env["MASTER_PORT"] = str(free_port(""))
        _attempt_event(run_dir, "start")
        self._arm_time_limit_signal()
        self._proc = subprocess.Popen(self.srun_argv, env=env)
        # Poll instead of wait(): submitit's signal handler runs checkpoint() on top of this
        # frame, and a blocking wait() here would hold the lock its wait() needs.
        while (code := self._proc.poll()) is None:
            time.sleep(0.2)
        missing = _missing_after_step(run_dir, getattr(self, "world_size", 0))
        _attempt_event(run_dir, "end", exit_code=code, **({"missing": missing} if missing else {}))
        if code != 0:
            raise RuntimeError(f"the job step exited with code {code} (logs: {run_dir}/logs)")
        if missing:
            # srun exits 0 when it could not start the tasks: no rank ran, nothing is done.
            raise RuntimeError(never_reported(missing))
        return code

    def _arm_time_limit_signal(self) -> None:
        """Send ourselves USR2 `signal_delay_s` before the job's end time.

        Slurm's own USR2 may come up to 60 s early, possibly before any handler was
        installed (the batch shell ignores it then), so it can be lost; this one is not.
        """
        end = _job_end_time(os.environ.get("SLURM_JOB_ID", ""))
        if end is None or not self.signal_delay_s:
            return
        delay = end - time.time() - self.signal_delay_s
        if delay <= 0:
            return
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGUSR2))
        signal.setitimer(signal.ITIMER_REAL, delay)

    # None: submitit does not requeue (submitit's own annotation omits it).
    def checkpoint(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> submitit.helpers.DelayedSubmission | None:
        """Forward the signal to the ranks, let them save, then ask submitit to requeue."""
        run_dir = Path(self.run_dir)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGUSR2)  # srun relays it to every task
            deadline = time.monotonic() + self.grace_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                proc.terminate()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts >= self.max_requeue:
            _attempt_event(run_dir, "signal", requeue=False, reason="max_requeue reached")
            return None
        _attempt_event(run_dir, "signal", requeue=True)
        return super().checkpoint(*args, **kwargs)


def _missing_after_step(run_dir: Path, world_size: int) -> list[int]:
    """Ranks with no exit file for this attempt, once files written on other nodes had
    time to show here (a shared file system may list a new file a few seconds late)."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    deadline = time.monotonic() + EXIT_FILES_GRACE_S
    while (missing := missing_ranks(run_dir, world_size, restart)) and time.monotonic() < deadline:
        time.sleep(1)
    return missing


def _job_end_time(job_id: str) -> float | None:
    """The job's EndTime (epoch seconds) from `scontrol show job`, or None."""
    import datetime as dt

    if not job_id:
        return None
    try:
        out = run_slurm_command(["scontrol", "show", "job", "-o", job_id], timeout_s=30)
    except BackendError:
        return None
    for field in out.split():
        key, _, value = field.partition("=")
        if key == "EndTime":
            try:
                return dt.datetime.fromisoformat(value).timestamp()  # controller's local time
            except ValueError:
                return None
    return None


class CallableTask(submitit.helpers.Checkpointable):
    """Every task: export the distributed variables, then call the user's function."""

    def __init__(self, ref: str, config_path: str, run_dir: str, workdir: str, env: dict[str, str]):
        self.ref = ref
        self.env = env
        self.config_path = config_path
        self.run_dir = run_dir
        self.workdir = workdir

    def __call__(self) -> Any:
        from launcher.call import resolve_callable
        from launcher.config import load_resolved

        os.environ.update(self.env)
        os.environ.update(dist_env_from_slurm(os.environ))
        os.chdir(self.workdir)
        if os.environ.get("RANK") == "0":
            _attempt_event(Path(self.run_dir), "start")
        started = time.time()
        try:
            fn = resolve_callable(self.ref)
            result = fn(load_resolved(self.config_path))
        except SystemExit as exc:
            code = exc.code if type(exc.code) is int else int(exc.code is not None)
            write_exit(self.run_dir, os.environ, code, started)
            raise
        except BaseException as exc:
            write_exit(self.run_dir, os.environ, 1, started, error=f"{type(exc).__name__}: {exc}")
            raise
        write_exit(self.run_dir, os.environ, 0, started)
        return result
