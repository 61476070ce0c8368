"""Run directories and run records: where a job's logs, config and state live.

Layout: `<runs_dir>/<name>/<run_id>/` holding `config.yaml` (resolved), `record.json`
(state, attempts, exit codes), `logs/`, `checkpoints/`, `metrics.jsonl`. Every write that
another process may read is atomic (temp file, fsync, rename), so a crash never leaves a
half-written record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from launcher.errors import RunNotFound

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


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable (the directory entry, not just the file)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    write: Callable[[BinaryIO], object],
    *,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> None:
    """Write through `write(fh)` into a temp file in the same folder, fsync, rename, fsync
    the folder: a reader (or a crash) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix or f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_record(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise RunNotFound(f"{run_dir}: no run record ({RECORD}) there") from exc


def write_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    atomic_write_json(Path(run_dir) / RECORD, record)


def update_record(run_dir: str | Path, **changes: Any) -> dict[str, Any]:
    """Read-modify-write of the record. Single writer per run (the supervisor or the CLI)."""
    record = read_record(run_dir)
    record.update(changes)
    write_record(run_dir, record)
    return record


def new_record(
    *, run_id: str, name: str, backend: str, world_size: int, config_file: str | None
) -> dict[str, Any]:
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


def iter_run_dirs(runs_dir: str | Path) -> Iterator[Path]:
    """Every run folder under runs_dir, oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return
    found = [p.parent for p in root.glob(f"*/*/{RECORD}")]
    yield from sorted(found, key=lambda p: p.name)


def find_run(runs_dir: str | Path, ref: str) -> Path:
    """A run by path, by run id, or by job name (its latest run)."""
    direct = Path(ref)
    if (direct / RECORD).is_file():
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


def tail(path: str | Path, lines: int = 20) -> str:
    """The last lines of a log file (reads only the end of big files)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
