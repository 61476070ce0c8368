"""Slurm's view of jobs: ONE sacct + squeue query per refresh, and one state table.

Runs on the submit host (CLI, sweep status). Both single jobs and array tasks are read
here, so there is one parser and one mapping from Slurm states to launcher states.

Every Slurm command goes through `run_slurm_command`, with a timeout: a controller or
database that does not answer is one BackendError within `QUERY_TIMEOUT_S`, never a hang.
Slurm's COMPLETED is not taken on trust: srun exits 0 when it could not start the tasks at
all, so a run is COMPLETED only when every rank wrote its exit file, with 0, in the current
attempt (`rank.missing_ranks`); otherwise it is FAILED, naming the ranks that never ran.
"""

from __future__ import annotations

import datetime as dt
import json
import pwd
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.backends.slurm.rank import never_reported, read_exits
from launcher.errors import BackendError

# AllocTRES x ElapsedRaw is what each attempt held (the run's cost); Submit tells a requeued
# attempt's row from an older job's that had the same id before the controller's ids reset.
SACCT_FIELDS = "JobID,State,ExitCode,Start,End,NodeList,AllocTRES,ElapsedRaw,Submit"
# sacct and squeue answer in well under a second; past this the controller or slurmdbd is
# down or overloaded, and `launcher status` says so instead of hanging.
QUERY_TIMEOUT_S = 20.0
# Slurm's own default MaxArraySize, used when the controller does not say.
DEFAULT_MAX_ARRAY_SIZE = 1001

# The one table from Slurm job states to launcher states, for runs and array tasks alike.
# PREEMPTED stays pending: with requeue the job comes back (a final one ends CANCELLED/FAILED).
PENDING_STATES = frozenset(
    {"PENDING", "REQUEUED", "CONFIGURING", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "PREEMPTED"}
)
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "SUSPENDED", "SIGNALING", "STAGE_OUT"})
ACTIVE = PENDING_STATES | RUNNING_STATES
FAILED = frozenset({"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})


def launcher_state(slurm_state: str) -> str | None:
    """PENDING / RUNNING / COMPLETED / FAILED / CANCELLED for a Slurm state; None if unknown."""
    state = slurm_state.rstrip("+")
    if state in PENDING_STATES:
        return "PENDING"
    if state in RUNNING_STATES:
        return "RUNNING"
    if state == "COMPLETED":
        return "COMPLETED"
    if state.startswith("CANCELLED"):
        return "CANCELLED"
    if state in FAILED:
        return "FAILED"
    return None


class SlurmTimeout(BackendError):
    """A Slurm command did not answer in time (controller or slurmdbd down or overloaded)."""


def run_slurm_command(argv: list[str], timeout_s: float = 60) -> str:
    """Run a Slurm client command; its failure (or silence) is a one-line BackendError."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise BackendError(f"{argv[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise SlurmTimeout(
            f"{shlex.join(argv[:2])} did not answer within {timeout_s:g} s: "
            "is the Slurm controller up?"
        ) from None
    if out.returncode != 0:
        message = " ".join(out.stderr.split())[:300] or f"exit code {out.returncode}"
        raise BackendError(f"{shlex.join(argv[:2])} failed: {message}")
    return out.stdout


# How Slurm commands are run: `run_slurm_command`, or a stand-in in unit tests.
Runner = Callable[[list[str], float], str]


def cluster_max_array_size() -> int:
    """MaxArraySize from the controller (`scontrol show config`), else Slurm's default."""
    for line in run_slurm_command(["scontrol", "show", "config"]).splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            return int(value.strip())
    return DEFAULT_MAX_ARRAY_SIZE


def expand_array_id(job: str) -> list[str]:
    """'12_[0-3,7%2]' -> ['12_0', '12_1', '12_2', '12_3', '12_7']; '12_5' -> ['12_5']."""
    match = re.fullmatch(r"(\d+)_\[([^\]]*)\]", job)
    if not match:
        return [job]
    base, body = match.groups()
    out = []
    for part in body.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def tres_count(tres: str, name: str) -> float:
    """How many of one resource an AllocTRES holds: 'billing=8,cpu=8,gres/gpu=2,node=1' ->
    8 for 'cpu', 2 for 'gres/gpu' (typed GPUs 'gres/gpu:a100=2' are summed when the untyped
    total is missing)."""
    total, typed = None, 0.0
    for item in tres.split(","):
        key, _, value = item.partition("=")
        try:
            count = float(value)
        except ValueError:
            continue
        if key == name:
            total = count
        elif key.startswith(name + ":"):
            typed += count
    return total if total is not None else typed


def parse_sacct(text: str) -> dict[str, dict[str, Any]]:
    """`sacct -X -D -P -n -o SACCT_FIELDS` lines -> job (or array task) id -> fields of its
    latest row, and under "usage" every row's (state, cpus, gpus, seconds, submit): with -D
    a requeued job has one row per attempt, oldest first."""
    states: dict[str, dict[str, Any]] = {}
    width = len(SACCT_FIELDS.split(","))
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        parts += [""] * (width - len(parts))
        info = {
            "state": (parts[1].split() or [""])[0],
            "reason": " ".join(parts[1].split()[1:]),  # "CANCELLED by 1000"
            "exit": parts[2],
            "start": parts[3],
            "end": parts[4],
            "nodes": parts[5],
        }
        try:
            seconds = max(0.0, float(parts[7]))
        except ValueError:
            seconds = 0.0
        usage = {
            "state": info["state"],
            "cpus": tres_count(parts[6], "cpu"),
            "gpus": tres_count(parts[6], "gres/gpu"),
            "seconds": seconds,
            "submit": parts[8].strip(),
        }
        for job in expand_array_id(parts[0].strip()):
            rows = states.get(job, {}).get("usage", [])
            states[job] = {**info, "usage": [*rows, usage]}
    return states


def merge_squeue(states: dict[str, dict[str, Any]], text: str) -> None:
    """`squeue -h -r -o %i|%T` lines win over sacct, which sees new jobs late, except over a
    cancellation sacct already has."""
    for line in text.splitlines():
        job, _, state = line.partition("|")
        for task in expand_array_id(job.strip()):
            if task not in states or not states[task]["state"].startswith("CANCELLED"):
                states.setdefault(
                    task, {"exit": "", "start": "", "end": "", "nodes": "", "reason": ""}
                )
                states[task]["state"] = state.strip()


def query_states(
    job_ids: list[str],
    *,
    run: Runner = run_slurm_command,
    timeout_s: float = QUERY_TIMEOUT_S,
) -> dict[str, dict[str, Any]]:
    """ONE sacct call (plus one squeue, which sees new jobs before sacct) for all these jobs
    and array tasks ('A_i'). A Slurm that does not answer is one BackendError within
    `timeout_s` (both calls together)."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    ids = ",".join(bases)
    deadline = time.monotonic() + timeout_s
    # -D: every attempt's row of a requeued job, for the time lost to the earlier ones.
    argv = ["sacct", "-X", "-D", "-P", "-n", "-j", ids, "-o", SACCT_FIELDS]
    states = parse_sacct(run(argv, timeout_s))
    left = max(1.0, deadline - time.monotonic())
    try:
        queue = run(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T"], left)
    except SlurmTimeout:
        raise
    except BackendError:
        queue = ""  # squeue refuses ids it no longer knows; sacct has them
    merge_squeue(states, queue)
    queued = {t for line in queue.splitlines() for t in expand_array_id(line.partition("|")[0])}
    for job, info in states.items():
        if info["state"].rstrip("+") == "PREEMPTED" and job not in queued:
            # Not requeued (not requeueable, or its last allowed attempt): it is over.
            info["final"] = "yes"
    return states


def task_states(job_ids: list[str]) -> dict[str, str]:
    """Launcher states of array tasks ('A_i') whose run record is not written yet (still
    queued, or died before): from the same one query."""
    known = query_states(job_ids)
    states = {}
    for job in job_ids:
        state = launcher_state(known.get(job, {}).get("state", ""))
        # COMPLETED without a run record: the task did not run the point either.
        states[job] = {None: "SUBMITTED", "COMPLETED": "FAILED"}.get(state, state) or "SUBMITTED"
    return states


def _attempts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "attempts.jsonl"
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    attempts: dict[int, dict[str, Any]] = {}
    for event in events:
        att = attempts.setdefault(
            event["restart"],
            {
                "attempt": event["restart"] + 1,
                "job_id": event.get("job_id"),
                "node": event.get("node"),
            },
        )
        if event["phase"] == "start":
            att["started"] = event["time"]
        elif event["phase"] == "end":
            att["ended"], att["exit_code"] = event["time"], event.get("exit_code")
            if event.get("error"):
                att["error"] = event["error"]
        elif event["phase"] == "signal":
            att["signalled"] = event["time"]
            # True: launcher requeued it; None: Slurm decides (preempted, TERM); False: not.
            att["requeued"] = event.get("requeue", False)
            for key in ("by", "reason", "asked_by_ranks"):
                if event.get(key) is not None:
                    att[key] = event[key]
    return [attempts[k] for k in sorted(attempts)]


def current_restart(attempts: list[dict[str, Any]]) -> int | None:
    """SLURM_RESTART_COUNT of the job's latest attempt (None: no attempt has started)."""
    return max((a["attempt"] - 1 for a in attempts), default=None)


def first_failure(run_dir: Path, restart: int | None = None) -> dict[str, Any] | None:
    """The rank that failed first (by end time) in attempt `restart`, from the exit files."""
    exits = read_exits(run_dir, restart).values()
    # A rank that stopped because it was asked to (stopped_by) did not fail.
    failures = [d for d in exits if d.get("exit_code") not in (0, None) and not d.get("stopped_by")]
    return min(failures, key=lambda d: d.get("ended", 0)) if failures else None


def _rank_failed(run_dir: Path, failure: dict[str, Any]) -> str:
    rank = failure["rank"]
    why = f": {failure['error']}" if failure.get("error") else ""
    return (
        f"rank {rank} on {failure.get('node') or '?'} exited with code {failure['exit_code']}"
        f"{why} (log: {run_dir / 'logs' / f'rank{rank}.log'})"
    )


# A row submitted this long before the run's record was written belongs to an older job that
# had the same id (the controller's ids were reset); the record is written before sbatch.
CLOCK_SLACK_S = 300


def who_cancelled(reason: str) -> tuple[str, dict[str, Any] | None]:
    """Slurm's "by 1000" -> ("by alice (uid 1000)", {"uid": 1000, "user": "alice"}); a uid
    this host cannot name stays a uid ("by uid 1000"); other words are kept as they are."""
    match = re.fullmatch(r"by (\d+)", reason.strip())
    if not match:
        return reason, None
    uid = int(match.group(1))
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        user = None
    text = f"by {user} (uid {uid})" if user else f"by uid {uid}"
    return text, {"uid": uid, "user": user}


def _submitted(stamp: str) -> dt.datetime | None:
    try:  # sacct prints the controller's local time, without a zone
        return dt.datetime.fromisoformat(stamp).astimezone()
    except ValueError:
        return None


def slurm_cost(record: dict[str, Any], info: dict[str, Any], *, completed: bool) -> dict[str, Any]:
    """The run's cost from sacct's rows of its job, one per attempt (`runs.cost_of`)."""
    rows: list[dict[str, Any]] = list(info.get("usage") or [])
    job_id = str(record.get("backend_info", {}).get("job_id", ""))
    try:
        created = dt.datetime.fromisoformat(str(record.get("created_at")))
    except ValueError:
        created = None
    if created is not None and "_" not in job_id and len(rows) > 1:
        # An array task's record is written when it starts, after its submission: only a
        # single job's record predates every row of its own job.
        since = created - dt.timedelta(seconds=CLOCK_SLACK_S)
        ours = [r for r in rows if (t := _submitted(r["submit"])) is None or t >= since]
        rows = ours or rows[-1:]
    spans = [(float(r["cpus"]), float(r["gpus"]), float(r["seconds"])) for r in rows]
    return runs.cost_of(spans, completed=completed, source="sacct AllocTRES x ElapsedRaw")


def apply_state(run_dir: Path, record: dict[str, Any], info: dict[str, Any]) -> None:
    """Bring one run's record up to date with its Slurm job's state.

    COMPLETED needs every rank's exit file with 0 for the current attempt, or the run is
    FAILED; CANCELLED after `launcher cancel` says so; a failed run names its first failing
    rank, or the ranks that never started. A cancelled run keeps who cancelled it, and a run
    that ended its cost (AllocTRES x ElapsedRaw of every attempt, `slurm_cost`)."""
    slurm_state = info["state"].rstrip("+")
    state = launcher_state(slurm_state)
    if slurm_state == "PREEMPTED" and info.get("final"):
        state = "CANCELLED"
    attempts = _attempts(run_dir)
    changes: dict[str, Any] = {"attempts": attempts, "slurm_state": slurm_state}
    ended = record.get("ended_at") or runs.now()
    restart = current_restart(attempts)
    world = int(record.get("world_size") or 0)
    if state in ("PENDING", "RUNNING"):
        changes["state"] = state
        if state == "RUNNING" and not record.get("started_at"):
            changes["started_at"] = runs.now()
    elif state == "CANCELLED":
        default = "cancelled (scancel or preemption without requeue)"
        if record.get("cancel_requested_at"):
            default = "cancelled by launcher cancel"
        elif slurm_state == "PREEMPTED" or (attempts and attempts[-1].get("reason") == "preempted"):
            number = attempts[-1]["attempt"] if attempts else 1
            default = (
                f"preempted in attempt {number}, the last one slurm.max_requeue allows: "
                "not requeued"
            )
        changes.update(state="CANCELLED", ended_at=ended, error=record.get("error") or default)
        if info.get("reason"):
            changes["slurm_reason"], changes["cancelled_by"] = who_cancelled(info["reason"])
    elif state in ("COMPLETED", "FAILED"):
        exits = read_exits(run_dir, restart)
        changes["exit_codes"] = {
            str(r): d["exit_code"]
            for r, d in sorted(exits.items())
            if type(d.get("exit_code")) is int
        }
        missing = [r for r in range(world) if r not in exits]
        failure = first_failure(run_dir, restart)
        slurm = f"Slurm state {slurm_state}, exit {info['exit']}"
        if state == "COMPLETED" and not missing and not failure:
            changes.update(state="COMPLETED", ended_at=ended)
        else:
            if failure:
                changes["failed_rank"] = failure["rank"]
                error = f"{_rank_failed(run_dir, failure)}; {slurm}"
            elif attempts and attempts[-1].get("error"):
                error = f"{attempts[-1]['error']}; {slurm}"
            elif attempts and attempts[-1].get("requeued") is False:
                error = f"stopped ({attempts[-1].get('reason')}), not requeued; {slurm}"
            elif missing:
                # Its log (srun's words, or the wrapper's) is what the status shows.
                changes["failed_rank"] = missing[0]
                error = f"{never_reported(missing)}; {slurm}"
            else:
                error = slurm
            changes.update(state="FAILED", ended_at=ended, error=error)
    if changes.get("state") in runs.FINAL_STATES and "cost" not in record:
        # Once, from this same sacct answer: a final record is not asked about again.
        changes["cost"] = slurm_cost(record, info, completed=changes["state"] == "COMPLETED")
    runs.update_record(run_dir, **changes)
