"""Run directories and run records: where a job's logs, config and state live.

Layout: `<runs_dir>/<name>/<run_id>/` holding `config.yaml` (resolved), `record.json`
(state, attempts, exit codes), `logs/`, `checkpoints/`, `metrics.jsonl`. Every write that
another process may read is atomic (temp file, fsync, rename), so a crash never leaves a
half-written record.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import re
import reprlib
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NotRequired, TypedDict, cast

from launcher.errors import DamagedRecord, LauncherError, RunNotFound
from launcher.files import (
    atomic_write_text,
    open_regular,
)

RECORD = "record.json"
CONFIG = "config.yaml"
STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED")
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def slug(name: str) -> str:
    """A folder-safe form of a job name (the name itself may hold any character)."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return text[:80] or "job"


def new_run_id() -> str:
    """Sortable by time, unique across concurrent launches."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(3)}"


def run_dir_for(runs_dir: str | Path, name: str, run_id: str) -> Path:
    return Path(runs_dir) / slug(name) / run_id


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class RunRecord(TypedDict):
    """The fields of record.json (`new_record` writes them all; backends update them)."""

    run_id: str
    name: str
    backend: str
    state: str  # one of STATES
    created_at: str
    started_at: str | None
    ended_at: str | None
    world_size: int
    exit_codes: dict[str, int | None]  # rank (as text: JSON keys) -> exit code
    failed_rank: int | None
    error: str | None
    attempts: list[dict[str, Any]]  # Slurm: one per (re)start of the job
    # supervisor_pid, rank_pids, supervisor, ranks, guards, stopped_ranks (local, docker:
    # pids and process identities); container_id, container_name, image (docker); job_id,
    # folder (slurm). Pids here are what `cancel` signals, so they are checked.
    backend_info: dict[str, Any]
    config_file: str | None
    submitted_at: NotRequired[str | None]  # slurm, sweeps
    sweep_dir: NotRequired[str]  # a sweep point's run
    slurm_state: NotRequired[str]
    container_exit_code: NotRequired[int | None]
    submitter: NotRequired[dict[str, Any] | None]  # identity of the process submitting it
    cancel_requested_at: NotRequired[str | None]  # slurm: `launcher cancel` asked for it
    warning: NotRequired[str | None]  # local: ranks stopped (SIGSTOP) while the run goes on
    # Why a run did not complete (launcher/causes.py, triage.Cause.as_dict()), kept once found.
    cause: NotRequired[dict[str, Any] | None]
    # local/docker: rank -> {"code", "ended" (epoch s), "stopped_by_launcher"}.
    rank_ends: NotRequired[dict[str, dict[str, Any]]]
    oom_kills: NotRequired[int]  # local/docker: the cgroup's oom_kill count grew this much
    # Slurm's "by 1000" of "CANCELLED by 1000", with the user named: "by alice (uid 1000)".
    slurm_reason: NotRequired[str | None]
    cancelled_by: NotRequired[dict[str, Any] | None]  # slurm: {"uid": 1000, "user": "alice"}
    # What the run held and lost, written once it ended (`cost_of`, `ensure_cost`).
    cost: NotRequired[dict[str, Any]]


# Upper bounds of numbers that become sizes or kill(2) targets: Linux's largest pid_max, and a
# world size no cluster has (a bigger one would make `logs` list billions of rank files).
PID_MAX = 1 << 22
MAX_WORLD_SIZE = 1 << 20
# A record is a few KiB even after thousands of requeues; anything bigger is not one, and
# `launcher status` must not read a runaway file into memory to find that out.
MAX_RECORD_BYTES = 1 << 20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return _is_int(value) and 0 <= cast(int, value) <= MAX_WORLD_SIZE


def _is_pid(value: object) -> bool:
    # 0 and negative numbers mean "my process group" / "every process" to kill(2).
    return _is_int(value) and 0 < cast(int, value) <= PID_MAX


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_identity(value: object) -> bool:
    """A process identity (backends/local/guard.py: pid, start time, boot id, pid namespace)
    or None; its pid is what gets signalled once the rest matches."""
    if value is None:
        return True
    if not isinstance(value, dict):
        return False
    return (
        ("pid" not in value or _is_pid(value["pid"]))
        and ("start_ticks" not in value or _is_int(value["start_ticks"]))
        and all(isinstance(value.get(k, ""), str) for k in ("boot_id", "pid_ns"))
    )


def _is_name(value: object) -> bool:
    return isinstance(value, str) and value != ""


def _is_dict_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _is_cost(value: object) -> bool:
    if not isinstance(value, dict):
        return False
    numbers = [value.get(k, 0) for k in COST_NUMBERS]
    return all(
        isinstance(n, int | float) and not isinstance(n, bool) and 0 <= n < 1e12 for n in numbers
    )


def _opt(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


def _str_map(check: Callable[[object], bool]) -> Callable[[object], bool]:
    def checked(value: object) -> bool:
        return isinstance(value, dict) and all(
            isinstance(k, str) and check(v) for k, v in value.items()
        )

    return checked


# key -> (check, what it must be); the optional keys may be absent.
_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "run_id": (_is_name, "a non-empty string"),
    "name": (_is_str, "a string"),
    "backend": (_is_name, "a non-empty string"),
    "state": (lambda v: v in STATES, f"one of {', '.join(STATES)}"),
    "created_at": (_is_str, "a time stamp (string)"),
    "started_at": (_opt(_is_str), "a time stamp (string) or null"),
    "ended_at": (_opt(_is_str), "a time stamp (string) or null"),
    "world_size": (_is_count, f"a whole number from 0 to {MAX_WORLD_SIZE}"),
    "exit_codes": (_str_map(_opt(_is_int)), "an object of rank -> exit code (or null)"),
    "failed_rank": (_opt(_is_count), "a rank (whole number >= 0) or null"),
    "error": (_opt(_is_str), "a string or null"),
    "attempts": (_is_dict_list, "a list of objects"),
    "backend_info": (_str_map(lambda _: True), "an object"),
    "config_file": (_opt(_is_str), "a file path (string) or null"),
}
_OPTIONAL_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "submitted_at": (_opt(_is_str), "a time stamp (string) or null"),
    "sweep_dir": (_is_str, "a folder path (string)"),
    "slurm_state": (_is_str, "a string"),
    "container_exit_code": (_opt(_is_int), "a whole number or null"),
    "submitter": (_is_identity, "a process identity (object with a valid pid) or null"),
    "cancel_requested_at": (_opt(_is_str), "a time stamp (string) or null"),
    "warning": (_opt(_is_str), "a string or null"),
    "slurm_reason": (_opt(_is_str), "a string or null"),
    "cancelled_by": (_opt(lambda v: isinstance(v, dict)), "an object or null"),
    "cost": (_is_cost, "an object of non-negative hours and shares"),
}
_BACKEND_INFO: dict[str, tuple[Callable[[object], bool], str]] = {
    "supervisor_pid": (_is_pid, f"a process id (1 to {PID_MAX})"),
    "rank_pids": (_str_map(_is_pid), f"an object of rank -> process id (1 to {PID_MAX})"),
    "supervisor": (_is_identity, "a process identity (object with a valid pid) or null"),
    "ranks": (_str_map(_is_identity), "an object of rank -> process identity"),
    "guards": (_str_map(_is_identity), "an object of rank -> process identity"),
    "stopped_ranks": (_str_map(_is_str), "an object of rank -> text"),
    "job_id": (_is_str, "a string"),
    "folder": (_is_str, "a folder path (string)"),
    "container_id": (_is_str, "a string"),
    "container_name": (_is_str, "a string"),
    "image": (_is_str, "a string"),
}


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 2, 40, 40


def _shown(value: object, limit: int = 60) -> str:
    text = _REPR.repr(value)  # bounded; strings through repr(), so controls come out escaped
    return text if len(text) <= limit else text[: limit - 3] + "..."


# A real record nests four levels (record, attempts, attempt, value); a much deeper one is
# not a record, and printing or re-encoding it could hit Python's recursion limit.
MAX_RECORD_DEPTH = 16


def _too_deep(value: object) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_RECORD_DEPTH:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _problem(
    table: dict[str, tuple[Callable[[object], bool], str]],
    where: dict[str, object],
    *,
    required: bool,
    prefix: str = "",
) -> str | None:
    for key, (check, expected) in table.items():
        if key not in where:
            if required:
                return f"{prefix}{key}: missing (expected {expected})"
        elif not check(where[key]):
            return f"{prefix}{key}: expected {expected}, got {_shown(where[key])}"
    return None


def record_problem(value: object) -> str | None:
    """What makes `value` (parsed record.json) not a run record, or None when it is one."""
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__} {_shown(value)}"
    return (
        _problem(_FIELDS, value, required=True)
        or _problem(_OPTIONAL_FIELDS, value, required=False)
        or _problem(_BACKEND_INFO, value["backend_info"], required=False, prefix="backend_info.")
    )


def _os_why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link (launcher writes records as plain files)"
    return f"cannot read it: {exc.strerror or exc}"


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_record(run_dir: str | Path) -> RunRecord:
    """The run's record, checked field by field: RunNotFound when there is none,
    DamagedRecord (one line: file and why) when it is unreadable, not JSON, or not a record."""
    path = Path(run_dir) / RECORD
    try:
        # NONBLOCK: a FIFO planted as record.json must not hang `launcher status`.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise RunNotFound(f"{run_dir}: no run record ({RECORD}) there") from exc
    except OSError as exc:
        raise DamagedRecord(str(path), _os_why(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a plain file"
            raise DamagedRecord(str(path), f"is {kind} (a record is a JSON file)")
        if info.st_size > MAX_RECORD_BYTES:
            raise DamagedRecord(
                str(path), f"{info.st_size} bytes; a record is at most {MAX_RECORD_BYTES} bytes"
            )
        data = _read_at_most(fd, MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise DamagedRecord(str(path), _os_why(exc)) from None
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:  # grew while we read it
        raise DamagedRecord(str(path), f"more than {MAX_RECORD_BYTES} bytes")
    if not data.strip():
        raise DamagedRecord(str(path), "empty file (expected a JSON object)")
    try:
        value = json.loads(data)
    except RecursionError:
        raise DamagedRecord(str(path), "not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise DamagedRecord(str(path), f"not JSON: {str(exc)[:200]}") from None
    if _too_deep(value):
        raise DamagedRecord(str(path), f"nested more than {MAX_RECORD_DEPTH} levels deep")
    problem = record_problem(value)
    if problem:
        raise DamagedRecord(str(path), problem)
    return cast(RunRecord, value)


def write_record(run_dir: str | Path, record: RunRecord | dict[str, Any]) -> None:
    """Write the record atomically; one that read_record would reject is never written."""
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    problem = record_problem(json.loads(text))
    if problem:
        raise DamagedRecord(str(Path(run_dir) / RECORD), f"not written: {problem}")
    atomic_write_text(Path(run_dir) / RECORD, text)


def update_record(run_dir: str | Path, **changes: Any) -> RunRecord:
    """Read-modify-write of the record. Single writer per run (the supervisor or the CLI)."""
    record = cast(RunRecord, {**read_record(run_dir), **changes})
    write_record(run_dir, record)
    return record


def new_record(
    *, run_id: str, name: str, backend: str, world_size: int, config_file: str | None
) -> RunRecord:
    return {
        "run_id": run_id,
        "name": name,
        "backend": backend,
        "state": "PENDING",
        "created_at": now(),
        "started_at": None,
        "ended_at": None,
        "world_size": world_size,
        "exit_codes": {},
        "failed_rank": None,
        "error": None,
        "attempts": [],
        "backend_info": {},
        "config_file": config_file,
    }


# ---- What a run cost -------------------------------------------------------------------

COST_NUMBERS = ("cpu_hours", "gpu_hours", "lost_cpu_hours", "lost_gpu_hours", "lost_share")
MAX_CONFIG_BYTES = 1 << 20


def cost_of(
    attempts: list[tuple[float, float, float]], *, completed: bool, source: str
) -> dict[str, Any]:
    """What a run held and lost, from (CPUs, GPUs, seconds) per attempt, oldest first.

    Held: CPUs x time and GPUs x time of every attempt; on Slurm the allocation (sacct's
    AllocTRES cpu= and gres/gpu=) x each attempt's ElapsedRaw, elsewhere the run's wall time x
    its processes' CPUs (resources.cpus_per_proc, 1 when unset; docker.cpus for a container
    with that limit) and GPUs. Lost: held time that is not part of a completed result. A
    run that did not complete (FAILED, CANCELLED) lost all of it: a later run resuming its
    checkpoints has its own cost. A COMPLETED run lost every earlier attempt (requeued,
    preempted, failed and retried) in full. That is an upper bound: the launcher does not
    know when a script last saved, so the part of an earlier attempt before its last
    checkpoint, which the next attempt resumed from, counts as lost too. lost_share is
    lost / held, of GPU-hours when the run held GPUs, else of CPU-hours."""
    lost = attempts if not completed else attempts[:-1]
    cpu_h = sum(c * s for c, _, s in attempts) / 3600
    gpu_h = sum(g * s for _, g, s in attempts) / 3600
    lost_cpu_h = sum(c * s for c, _, s in lost) / 3600
    lost_gpu_h = sum(g * s for _, g, s in lost) / 3600
    held, gone = (gpu_h, lost_gpu_h) if gpu_h > 0 else (cpu_h, lost_cpu_h)
    last = attempts[-1] if attempts else (0.0, 0.0, 0.0)
    return {
        "cpu_hours": round(cpu_h, 6),
        "gpu_hours": round(gpu_h, 6),
        "lost_cpu_hours": round(lost_cpu_h, 6),
        "lost_gpu_hours": round(lost_gpu_h, 6),
        # A run that did not complete lost all of it, even when the figures read 0 hours.
        "lost_share": 1.0 if not completed else round(gone / held, 4) if held > 0 else 0.0,
        "attempts": len(attempts),
        "cpus": last[0],
        "gpus": last[1],
        "seconds": round(sum(s for _, _, s in attempts), 3),
        "source": source,
    }


def _seconds_between(start: object, end: object) -> float:
    try:
        begin = dt.datetime.fromisoformat(str(start))
        finish = dt.datetime.fromisoformat(str(end))
        return max(0.0, (finish - begin).total_seconds())
    except (TypeError, ValueError):
        return 0.0


def _resources(run_dir: Path, in_container: bool, world: int) -> tuple[float, float]:
    """(CPUs, GPUs) the run's processes held, from its resolved config.yaml (defaults when
    it is missing or unreadable: one CPU per process, no GPU); a container's own limits
    (docker.cpus, docker.gpu_ids) when it ran in one."""
    import yaml

    config: Any = {}
    try:
        with open_plain(run_dir / CONFIG) as fh:
            text = fh.read(MAX_CONFIG_BYTES)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        config = yaml.load(text, Loader=loader)  # a safe loader (C when built with libyaml)
    except (OSError, yaml.YAMLError):
        pass
    config = config if isinstance(config, dict) else {}
    res = config.get("resources") if isinstance(config.get("resources"), dict) else {}
    box = config.get("docker") if isinstance(config.get("docker"), dict) else {}

    def number(value: object) -> float | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        return float(cast(float, value)) if ok else None

    cpus = world * (number(res.get("cpus_per_proc")) or 1.0)
    gpus = number(res.get("gpus_per_node")) or 0.0
    if in_container:
        cpus = number(box.get("cpus")) or cpus
        ids = box.get("gpu_ids")
        gpus = gpus or float(len(ids) if isinstance(ids, list) else 0)
    return cpus, gpus


def wall_cost(run_dir: str | Path, record: RunRecord) -> dict[str, Any]:
    """A local or Docker run's cost: its wall time (started_at to ended_at) x resources."""
    seconds = _seconds_between(record.get("started_at"), record.get("ended_at"))
    info = record.get("backend_info") or {}
    in_container = "container_name" in info or "container_id" in info
    cpus, gpus = _resources(Path(run_dir), in_container, int(record["world_size"] or 0))
    completed = record["state"] == "COMPLETED"
    return cost_of([(cpus, gpus, seconds)], completed=completed, source="wall time x resources")


def ensure_cost(run_dir: str | Path, record: RunRecord) -> RunRecord:
    """The record with its "cost" once the run ended (computed once, then kept). A
    scheduler's job (a job id: Slurm) gets it from the scheduler's accounting when it ends
    (slurm/status.apply_state); one without is left as it is."""
    if record.get("state") not in FINAL_STATES or "cost" in record:
        return record
    if (record.get("backend_info") or {}).get("job_id"):
        return record
    cost = wall_cost(run_dir, record)
    try:
        return update_record(run_dir, cost=cost)
    except (OSError, LauncherError):
        return cast(RunRecord, {**record, "cost": cost})


def _hours(value: float) -> str:
    if value <= 0:
        return "0"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.2g}"


def format_cost(cost: dict[str, Any]) -> str:
    """`0.42 CPU-h, 0 GPU-h held; 0.10 CPU-h (24%) lost to failures/requeues`."""
    held = f"{_hours(cost.get('cpu_hours', 0))} CPU-h, {_hours(cost.get('gpu_hours', 0))} GPU-h"
    lost = f"{_hours(cost.get('lost_cpu_hours', 0))} CPU-h"
    if cost.get("gpu_hours"):
        lost += f", {_hours(cost.get('lost_gpu_hours', 0))} GPU-h"
    share = float(cost.get("lost_share") or 0)
    return f"{held} held; {lost} ({share:.0%}) lost to failures/requeues"


def add_costs(costs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' costs summed (a sweep's points); lost_share of the sums."""
    total = {k: sum(float(c.get(k) or 0) for c in costs) for k in COST_NUMBERS[:4]}
    held, gone = total["cpu_hours"], total["lost_cpu_hours"]
    if total["gpu_hours"] > 0:
        held, gone = total["gpu_hours"], total["lost_gpu_hours"]
    return {**total, "lost_share": gone / held if held > 0 else 0.0}


class RunsDirError(LauncherError):
    """The runs folder itself cannot be listed (not a folder, no permission)."""

    exit_code = 2


def scan_runs(runs_dir: str | Path) -> tuple[list[Path], dict[Path, str]]:
    """The run folders under runs_dir (`<name>/<run_id>/` holding a record.json, readable or
    not), oldest first, and the folders that could not be looked into, with why."""
    root = Path(runs_dir)
    if not os.path.lexists(root):
        return [], {}
    try:
        names = sorted(os.scandir(root), key=lambda e: e.name)
    except NotADirectoryError:
        raise RunsDirError(f"{root}: the runs dir is not a folder") from None
    except OSError as exc:
        raise RunsDirError(f"{root}: cannot list the runs dir: {exc.strerror or exc}") from None
    found: list[Path] = []
    unreadable: dict[Path, str] = {}
    for name in names:
        if name.name.startswith(".") or not name.is_dir(follow_symlinks=False):
            continue
        try:
            entries = sorted(os.scandir(name.path), key=lambda e: e.name)
        except OSError as exc:
            unreadable[Path(name.path)] = f"cannot list this folder: {exc.strerror or exc}"
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                os.lstat(os.path.join(entry.path, RECORD))
            except FileNotFoundError:
                continue  # not a run folder (a sweep's folder, say)
            except OSError as exc:
                unreadable[Path(entry.path)] = f"cannot look into it: {exc.strerror or exc}"
                continue
            found.append(Path(entry.path))
    return sorted(found, key=lambda p: p.name), unreadable


def iter_run_dirs(runs_dir: str | Path) -> Iterator[Path]:
    """Every run folder under runs_dir, oldest first."""
    yield from scan_runs(runs_dir)[0]


def find_run(runs_dir: str | Path, ref: str) -> Path:
    """A run by path, by run id, or by job name (its latest run)."""
    direct = Path(ref)
    if os.path.lexists(direct / RECORD):  # damaged or not: read_record says which
        return direct
    runs = list(iter_run_dirs(runs_dir))
    by_id = [p for p in runs if p.name == ref or p.name.startswith(ref)]
    if len(by_id) == 1:
        return by_id[0]
    if len(by_id) > 1:
        raise RunNotFound(f"run '{ref}' is ambiguous: {', '.join(p.name for p in by_id[:5])}")
    by_name = [p for p in runs if p.parent.name == slug(ref)]
    if by_name:
        return by_name[-1]
    raise RunNotFound(f"no run '{ref}' under {runs_dir} (see `launcher status`)")


def open_plain(path: str | Path) -> BinaryIO:
    """Open a file for reading only when it is a plain file (symlinks followed): a FIFO or
    device planted in a run folder (as a log, say) must not block `status` or stream to the
    terminal forever."""
    return open_regular(path, follow_symlinks=True)


def tail(path: str | Path, lines: int = 20) -> str:
    """The last lines of a log file (reads only the end of big files), as printable text."""
    try:
        with open_plain(path) as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return printable(f"(cannot read {path}: {exc.strerror or exc})")
    return printable("\n".join(data.splitlines()[-lines:]), keep_lines=True)


# What a terminal may act on: C0 and C1 controls (ESC starts colour, cursor, title and
# hyperlink sequences; CR overwrites a line), DEL, bidirectional overrides (text shown in
# another order than it is), and lone surrogates (which cannot even be encoded for output).
_OTHER_UNSAFE = r"\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_IN_LINE = re.compile(rf"[\x00-\x1f{_OTHER_UNSAFE}]")
_UNSAFE_IN_LOG = re.compile(rf"[\x00-\x08\x0b-\x1f{_OTHER_UNSAFE}]")  # keeps \t and \n


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, *, keep_lines: bool = False) -> str:
    """`text` safe to print to a terminal: every control character shown as `\\x1b` (or
    `\\u202e`) instead of acting. keep_lines keeps newlines and tabs (log tails), turning
    CRLF into LF; otherwise they are escaped too, so a value always stays on its line."""
    text = str(text)
    if keep_lines:
        return _UNSAFE_IN_LOG.sub(_escape, text.replace("\r\n", "\n"))
    return _UNSAFE_IN_LINE.sub(_escape, text)
