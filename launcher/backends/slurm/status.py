"""Slurm's view of jobs: ONE sacct + squeue query per refresh, and one state table.

Runs on the submit host (CLI, sweep status). Both single jobs and array tasks are read
here, so there is one parser and one mapping from Slurm states to launcher states.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.errors import BackendError

SACCT_FIELDS = "JobID,State,ExitCode,Start,End,NodeList"
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


def run_slurm_command(argv: list[str], timeout_s: float = 60) -> str:
    """Run a Slurm client command; its failure (or silence) is a one-line BackendError."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise BackendError(f"{argv[0]} not found: is this a Slurm login node?") from None
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"{shlex.join(argv[:2])} did not answer within {timeout_s:g} s: "
            "is the Slurm controller up?"
        ) from None
    if out.returncode != 0:
        raise BackendError(f"{shlex.join(argv[:2])} failed: {out.stderr.strip()[:300]}")
    return out.stdout


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


def parse_sacct(text: str) -> dict[str, dict[str, str]]:
    """`sacct -X -P -n -o SACCT_FIELDS` lines -> job (or array task) id -> fields."""
    states: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        info = {
            "state": (parts[1].split() or [""])[0],
            "reason": " ".join(parts[1].split()[1:]),  # "CANCELLED by 1000"
            "exit": parts[2],
            "start": parts[3],
            "end": parts[4],
            "nodes": parts[5],
        }
        for job in expand_array_id(parts[0].strip()):
            states[job] = info
    return states


def merge_squeue(states: dict[str, dict[str, str]], text: str) -> None:
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


def query_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """ONE sacct call (plus one squeue, which sees new jobs before sacct) for all these jobs
    and array tasks ('A_i')."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    ids = ",".join(bases)
    states = parse_sacct(
        run_slurm_command(["sacct", "-X", "-P", "-n", "-j", ids, "-o", SACCT_FIELDS])
    )
    try:
        queue = run_slurm_command(["squeue", "-h", "-r", "-j", ids, "-o", "%i|%T"])
    except BackendError:
        queue = ""  # squeue refuses ids it no longer knows; sacct has them
    merge_squeue(states, queue)
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
        elif event["phase"] == "signal":
            att["signalled"] = event["time"]
            att["requeued"] = event.get("requeue", False)
    return [attempts[k] for k in sorted(attempts)]


def first_failure(run_dir: Path) -> dict[str, Any] | None:
    """The rank that failed first (by end time), from the per-task exit files."""
    failures = []
    for path in (run_dir / "exits").glob("rank*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("exit_code") not in (0, None):
            failures.append(data)
    return min(failures, key=lambda d: d["ended"]) if failures else None


def apply_state(run_dir: Path, record: dict[str, Any], info: dict[str, str]) -> None:
    """Bring one run's record up to date with its Slurm job's state."""
    slurm_state = info["state"].rstrip("+")
    state = launcher_state(slurm_state)
    changes: dict[str, Any] = {"attempts": _attempts(run_dir), "slurm_state": slurm_state}
    ended = record.get("ended_at") or runs.now()
    if state in ("PENDING", "RUNNING"):
        changes["state"] = state
        if state == "RUNNING" and not record.get("started_at"):
            changes["started_at"] = runs.now()
    elif state == "COMPLETED":
        changes.update(state="COMPLETED", ended_at=ended)
    elif state == "CANCELLED":
        changes.update(
            state="CANCELLED",
            ended_at=ended,
            error=record.get("error") or "cancelled (scancel or preemption without requeue)",
        )
    elif state == "FAILED":
        failure = first_failure(run_dir)
        error = f"Slurm state {slurm_state}, exit {info['exit']}"
        if failure:
            rank = failure["rank"]
            changes["failed_rank"] = rank
            error = (
                f"rank {rank} on {failure['node']} exited with code {failure['exit_code']} "
                f"(log: {run_dir / 'logs' / f'rank{rank}.log'}); {error}"
            )
        changes.update(state="FAILED", ended_at=ended, error=error)
    runs.update_record(run_dir, **changes)
