"""Runs in the batch shell on the first node, under submitit: the host side of a job.

`StepTask` starts ONE `srun` step with every rank (a script, a callable or the built-in
trainer; optionally in a pyxis container) and is the job's only requeuer. What each event
delivers on Slurm 22.05 (measured on the local cluster, `preempt_send_user_signal`):
- time limit: USR2 (`--signal=B:USR2@signal_delay_s`, up to 60 s early) to this shell only;
- preemption by a higher partition: USR2 to this shell only, then after the partition's
  GraceTime SIGCONT+SIGTERM to every process of the job, SIGKILL KillWait later; Slurm
  requeues the job itself (PreemptMode=REQUEUE), and `scontrol show job` has a PreemptTime;
- `scontrol requeue` by an administrator, and scancel: SIGCONT+SIGTERM to every process at
  once (ranks, their children, this shell), SIGKILL KillWait later; Slurm requeues (or ends).
On USR2 submitit calls `checkpoint()`: it writes the attempt's stop file, every rank's
wrapper (rank.py) sees it and sends its script `entrypoint.stop_signal` (a signal through
srun would reach every process of the step: USR2 killed a plain script here); the ranks
get the grace to save, then this task requeues through submitit, unless Slurm requeues the
job itself (preempted: a second requeue would cut the grace short) or `slurm.max_requeue`
is spent.
A rank's `scontrol requeue <this job>` (Lightning, through the run dir's `bin/scontrol`) is
a request to this task: handled like USR2, so the job is requeued once, counted.
The last allowed attempt is made non-requeueable (`scontrol update Requeue=0`), so neither a
preemption nor an administrator requeues it past `slurm.max_requeue`.

Every rank leaves one exit file per attempt (`rank.write_exit`): srun exits 0 even when it
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
    REQUEUE_DIR,
    SHIM_DIR,
    STOP_FILE,
    missing_ranks,
    never_reported,
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


# `scontrol` first on the ranks' PATH (rank.py puts <run_dir>/bin there): a requeue of this
# job becomes a request file for the host task; any other call is the real scontrol.
SCONTROL_SHIM = r"""#!/bin/sh
# Written by launcher. A rank's `scontrol requeue <this job>` (Lightning's auto-requeue) is a
# request to launcher's host task, which requeues the job once, within slurm.max_requeue.
# Every other call goes to the real scontrol (this folder is taken off PATH first).
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
set -f
rest=
old_ifs=$IFS
IFS=:
for d in $PATH; do
    [ "$d" = "$here" ] || rest=${rest:+$rest:}$d
done
IFS=$old_ifs
set +f
PATH=$rest
export PATH
if [ "$1" = requeue ] && [ "$#" -ge 2 ] && [ -n "$SLURM_JOB_ID" ] &&
    [ -n "$LAUNCHER_RUN_DIR" ]; then
    this=$SLURM_JOB_ID
    [ -n "$SLURM_ARRAY_JOB_ID" ] && this=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    shift
    for id in "$@"; do
        [ "$id" = "$this" ] || [ "$id" = "$SLURM_JOB_ID" ] || exec scontrol requeue "$@"
    done
    dir=$LAUNCHER_RUN_DIR/requeue
    mkdir -p "$dir" || exit 1
    f=$dir/rank${SLURM_PROCID:-0}-restart${SLURM_RESTART_COUNT:-0}
    date +%s >"$f.tmp" && mv -f "$f.tmp" "$f" || exit 1
    echo "launcher: scontrol requeue $this: passed to launcher's host task," \
        "which requeues the job (within slurm.max_requeue)" >&2
    exit 0
fi
exec scontrol "$@"
"""


def write_shim(run_dir: Path) -> Path:
    """<run_dir>/bin/scontrol (atomically, executable), for every rank of every attempt."""
    folder = run_dir / SHIM_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scontrol"
    tmp = folder / ".scontrol.tmp"
    tmp.write_text(SCONTROL_SHIM)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def requeue_requests(run_dir: Path, restart: int) -> list[int]:
    """Ranks that asked (scontrol requeue, through the shim) to requeue attempt `restart`."""
    found = []
    for path in (run_dir / REQUEUE_DIR).glob(f"rank*-restart{restart}"):
        rank = path.name.removeprefix("rank").partition("-")[0]
        if rank.isdigit():
            found.append(int(rank))
    return sorted(found)


def _restart() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


class StepTask(submitit.helpers.Checkpointable):
    """Host side of a job: one srun step with all ranks; the job's one requeuer."""

    def __init__(
        self,
        srun_argv: list[str],
        run_dir: str,
        max_requeue: int,
        grace_s: float,
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
        self._ended_by_slurm = False
        self._stopping = False
        self._submitit_usr2: Any = None
        # When the time-limit stop is due (EndTime - signal_delay_s), if known.
        self._stop_at: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a running process is not part of the requeued job
        state["_ended_by_slurm"] = state["_stopping"] = False
        state["_submitit_usr2"] = None  # submitit installs its handler again
        state["_stop_at"] = None
        return state

    def __call__(self) -> int:
        run_dir = Path(self.run_dir)
        restart = _restart()
        env = {**os.environ, **self.env}
        env["MASTER_ADDR"] = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        env["MASTER_PORT"] = str(free_port(""))
        _attempt_event(run_dir, "start")
        if restart > self.max_requeue:
            # Slurm requeued it (preemption, an administrator) before the last attempt was
            # made non-requeueable: the limit still holds.
            why = (
                f"requeued {restart} times, past slurm.max_requeue={self.max_requeue}: "
                "not started again"
            )
            _attempt_event(run_dir, "end", exit_code=None, error=why)
            raise RuntimeError(why)
        if restart >= self.max_requeue:
            self._last_attempt(run_dir)
        write_shim(run_dir)
        self._ended_by_slurm = self._stopping = False
        signal.signal(signal.SIGTERM, self._on_term)
        self._submitit_usr2 = signal.signal(signal.SIGUSR2, self._on_usr2)
        self._arm_time_limit_signal()
        self._proc = subprocess.Popen(self.srun_argv, env=env)
        # Poll instead of wait(): submitit's signal handler runs checkpoint() on top of this
        # frame, and a blocking wait() here would hold the lock its wait() needs.
        asked = False
        while (code := self._proc.poll()) is None:
            if not asked and not self._stopping and requeue_requests(run_dir, restart):
                asked = True  # a rank asked for a requeue: the same path as Slurm's USR2
                os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
        if self._stopping:
            self._wait_for_slurm()  # checkpoint() decided: Slurm (or submitit) ends the job
        missing = _missing_after_step(run_dir, getattr(self, "world_size", 0))
        _attempt_event(run_dir, "end", exit_code=code, **({"missing": missing} if missing else {}))
        if code != 0:
            raise RuntimeError(f"the job step exited with code {code} (logs: {run_dir}/logs)")
        if missing:
            # srun exits 0 when it could not start the tasks: no rank ran, nothing is done.
            raise RuntimeError(never_reported(missing))
        return code

    def _on_term(self, signum: int, _frame: object) -> None:
        """Slurm is ending the job (administrator's requeue, scancel, preemption's end): the
        ranks got the same TERM; Slurm, not this task, decides whether it comes back."""
        if not self._ended_by_slurm:
            self._ended_by_slurm = True
            if not self._stopping:  # else it is the requeue checkpoint() decided on
                _attempt_event(
                    Path(self.run_dir), "signal", signal="TERM", requeue=None, by="slurm"
                )

    def _on_usr2(self, signum: int, frame: Any) -> None:
        """Slurm's time-limit USR2 may come up to 60 s before `signal_delay_s`: that one
        waits for our own timer (so every attempt gets the same time to work). Preemption,
        a rank's request and a USR2 on time go on to submitit's handler (checkpoint())."""
        early = self._stop_at is not None and time.time() < self._stop_at - 2
        if early and not requeue_requests(Path(self.run_dir), _restart()):
            if _job_field(os.environ.get("SLURM_JOB_ID", ""), "PreemptTime") is None:
                _attempt_event(Path(self.run_dir), "early_signal", due=self._stop_at)
                return
        if callable(self._submitit_usr2):
            self._submitit_usr2(signum, frame)

    def _last_attempt(self, run_dir: Path) -> None:
        """No requeue after this attempt, by anyone: Slurm would requeue a preempted job, or
        on an administrator's word, past slurm.max_requeue."""
        job = os.environ.get("SLURM_JOB_ID", "")
        if not job:
            return
        try:
            run_slurm_command(["scontrol", "update", f"JobId={job}", "Requeue=0"], timeout_s=30)
        except BackendError as exc:
            _attempt_event(run_dir, "warning", message=f"cannot make the last attempt final: {exc}")

    def _arm_time_limit_signal(self) -> None:
        """Send ourselves USR2 `signal_delay_s` before the job's end time.

        Slurm's own USR2 may come up to 60 s early, possibly before any handler was
        installed (the batch shell ignores it then), so it can be lost; this one is not.
        """
        end = _job_field(os.environ.get("SLURM_JOB_ID", ""), "EndTime")
        if end is None or not self.signal_delay_s:
            return
        self._stop_at = end - self.signal_delay_s
        delay = self._stop_at - time.time()
        if delay <= 0:
            return
        signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGUSR2))
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _wait_for_slurm(self) -> None:
        """Slurm requeues (or ends) this job itself: wait for its SIGKILL. Exiting first could
        end a preempted job COMPLETED instead of requeued."""
        while True:
            time.sleep(1)

    # None: submitit does not requeue (submitit's own annotation omits it).
    def checkpoint(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> submitit.helpers.DelayedSubmission | None:
        """Stop the ranks with their stop signal and the grace to save, then requeue once."""
        # One stop per attempt: a second USR2 (Slurm's early one and our timer, or a rank's
        # request) must not requeue twice.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._stopping = True
        run_dir = Path(self.run_dir)
        restart = _restart()
        asked = requeue_requests(run_dir, restart)
        proc = self._proc
        if proc is not None and proc.poll() is None and not asked:
            # Every rank's wrapper sees it and sends its script the stop signal (a signal
            # through srun would reach every process of the step, the scripts included).
            stop = run_dir / STOP_FILE.format(restart=restart)
            stop.write_text(str(time.time()))
        deadline = time.monotonic() + self.grace_s
        while proc is not None and proc.poll() is None and time.monotonic() < deadline:
            if requeue_requests(run_dir, restart):
                break  # saved (Lightning, or its rank 0 wrapper, asks after its checkpoint)
            time.sleep(0.1)
        asked = requeue_requests(run_dir, restart)
        by_rank = {"asked_by_ranks": asked} if asked else {}
        preempted = _job_field(os.environ.get("SLURM_JOB_ID", ""), "PreemptTime") is not None
        if preempted or self._ended_by_slurm:
            reason = "preempted" if preempted else "ended by Slurm (TERM)"
            _attempt_event(run_dir, "signal", requeue=None, by="slurm", reason=reason, **by_rank)
            if proc is not None:
                while proc.poll() is None:
                    time.sleep(0.2)
            self._wait_for_slurm()
        if restart >= self.max_requeue:
            _attempt_event(
                run_dir,
                "signal",
                requeue=False,
                reason=f"slurm.max_requeue={self.max_requeue} reached",
                **by_rank,
            )
            return None
        _attempt_event(run_dir, "signal", requeue=True, by="launcher", **by_rank)
        return super().checkpoint(*args, **kwargs)


def _missing_after_step(run_dir: Path, world_size: int) -> list[int]:
    """Ranks with no exit file for this attempt, once files written on other nodes had
    time to show here (a shared file system may list a new file a few seconds late)."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    deadline = time.monotonic() + EXIT_FILES_GRACE_S
    while (missing := missing_ranks(run_dir, world_size, restart)) and time.monotonic() < deadline:
        time.sleep(1)
    return missing


def _job_field(job_id: str, name: str) -> float | None:
    """A time field of `scontrol show job` (EndTime, PreemptTime) as epoch seconds, or None
    (not set, or Slurm did not answer)."""
    import datetime as dt

    if not job_id:
        return None
    try:
        out = run_slurm_command(["scontrol", "show", "job", "-o", job_id], timeout_s=30)
    except BackendError:
        return None
    for field in out.split():
        key, _, value = field.partition("=")
        if key == name:
            try:
                return dt.datetime.fromisoformat(value).timestamp()  # controller's local time
            except ValueError:
                return None
    return None
