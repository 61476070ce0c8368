"""The cause of a run that did not complete, read from its run folder once and kept.

`launcher status` and `launcher sweep status` call `ensure_cause`: for a FAILED or CANCELLED
record without a "cause", it gathers what the backends left (the record's exit codes and
states, `exits/rank<N>.json` on Slurm, each rank's log tail), asks `triage.diagnose`, and
writes the answer into the record atomically, so later calls only read it. The cost (CPU-
and GPU-hours held, and the share lost to failures and requeues) is kept the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.errors import LauncherError
from launcher.files import open_regular
from launcher.triage import BackendView, RankEnd, diagnose

CAUSE_STATES = ("FAILED", "CANCELLED")
# Backend errors that mean no rank's script ever ran: a rank that could not be started, tasks
# that never reported (Slurm), an image the engine does not have.
_NEVER_STARTED = re.compile(
    r"cannot start rank|never reported an exit|the tasks did not start|No such image|"
    r"pull access denied|image .* not found|invalid reference format",
    re.IGNORECASE,
)
# The local/Docker supervisor's words when it stopped the ranks at resources.time_min.
_LOCAL_TIME_LIMIT = re.compile(r"time limit of [\d.]+ (?:min|s) reached \(resources\.time_min\)")
TAIL_BYTES = 16 * 1024
MAX_RANK_LOGS = 256  # a 4,096-rank job: read the logs of the ranks that failed, not all


def _tail(path: Path) -> str:
    try:
        with open_regular(path, follow_symlinks=True) as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _exit_files(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Slurm's per-rank exit files (rank.py), newest attempt only."""
    found: dict[int, dict[str, Any]] = {}
    folder = run_dir / "exits"
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("rank*.json"))[: 1 << 16]:
        try:
            with open_regular(path) as fh:
                data = json.loads(fh.read(1 << 16))
            rank = int(data["rank"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(data, dict):
            found[rank] = data
    return found


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rank_ends(run_dir: Path, record: runs.RunRecord) -> list[RankEnd]:
    """Every rank's end as the backend recorded it, with its log tail."""
    world = int(record.get("world_size") or 0)
    codes: dict[str, Any] = dict(record.get("exit_codes") or {})
    ends: dict[str, Any] = dict(record.get("rank_ends") or {})
    exits = _exit_files(run_dir)
    failed_rank = record.get("failed_rank")
    out: list[RankEnd] = []
    for rank in range(min(world, 1 << 20)):
        key = str(rank)
        entry = ends.get(key)
        info: dict[str, Any] = entry if isinstance(entry, dict) else {}
        exit_file = exits.get(rank, {})
        code = info.get("code", codes.get(key, exit_file.get("exit_code")))
        if not isinstance(code, int) or isinstance(code, bool):
            code = None
        # rank.py: the wrapper got a stop (srun's kill-on-bad-exit TERM, the time limit's
        # stop file) before its script ended.
        stopped = bool(
            info.get("stopped_by_launcher")
            or exit_file.get("signal_received")
            or exit_file.get("stopped_by")
        )
        if not ends and not exit_file and failed_rank is not None and rank != failed_rank:
            # Older local records: the supervisor stopped every rank but the failing one.
            stopped = code is not None and code != 0
        ended = _number(info.get("ended", exit_file.get("ended")))
        if ended is None and rank == failed_rank:
            ended = 0.0  # the supervisor saw it first
        interesting = code != 0 and len(out) < MAX_RANK_LOGS
        log = _tail(run_dir / "logs" / f"rank{rank}.log") if interesting else ""
        node = exit_file.get("node") or None
        out.append(RankEnd(rank, code, node, ended, log, stopped))
    return out


def backend_view(record: runs.RunRecord) -> BackendView:
    """What the backend said, from the record."""
    state = record.get("state")
    error = record.get("error") or ""
    slurm_state = record.get("slurm_state")
    reason = record.get("slurm_reason")
    if slurm_state and reason:
        slurm_state = f"{slurm_state} {reason}"
    cancelled_by = None
    if state == "CANCELLED" and not slurm_state:
        match = re.search(r"(?:stopped|cancelled) by (.+)", error)
        cancelled_by = match.group(1).strip() if match else "launcher cancel"
    never = error if state == "FAILED" and _NEVER_STARTED.search(error) else None
    oom = bool(record.get("oom_kills")) or error.startswith("killed: out of memory")
    stopped_for, stop_reason = _last_stop(record)
    if state == "FAILED" and _LOCAL_TIME_LIMIT.match(error):
        # local/Docker supervisor: it stopped every rank at resources.time_min.
        stopped_for, stop_reason = "time_limit", error.split(";")[0]
    return BackendView(
        stopped_for=stopped_for,
        stop_reason=stop_reason,
        slurm_state=slurm_state,
        oom_killed=oom,
        cancelled_by=cancelled_by,
        never_started=never,
        error=error or None,
    )


def _last_stop(record: runs.RunRecord) -> tuple[str | None, str | None]:
    """Why the launcher stopped the last Slurm attempt (batch.py's "signal" event): Slurm's
    PreemptTime said preempted; else, with no rank asking to requeue, its USR2 came from the
    time limit (Slurm's or the launcher's own timer) and no requeue was left."""
    attempts = record.get("attempts") or []
    last = attempts[-1] if attempts and isinstance(attempts[-1], dict) else {}
    if not last.get("signalled"):
        return None, None
    reason = last.get("reason")
    reason = reason if isinstance(reason, str) else None
    if reason == "preempted":
        return "preempted", None
    if last.get("requeued") is False and not last.get("asked_by_ranks"):
        return "time_limit", f"{reason}: not requeued" if reason else "not requeued"
    return None, None


def ensure_cause(run_dir: Path, record: runs.RunRecord) -> runs.RunRecord:
    """The record with its "cause" (computed once, then kept in the record)."""
    if record.get("state") not in CAUSE_STATES or record.get("cause"):
        return record
    ends = rank_ends(run_dir, record)
    cause = diagnose(ends, backend_view(record))
    try:
        return runs.update_record(run_dir, cause=cause.as_dict())
    except (OSError, LauncherError):
        return {**record, "cause": cause.as_dict()}
