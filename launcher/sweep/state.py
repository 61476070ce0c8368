"""Sweep directories, the sweep.json state file, its lock, and reading a point's result.

Layout: `<runs_dir>/<name>/sweeps/<sweep_id>/sweep.json`. Each point runs in an ordinary
run directory `<runs_dir>/<name>/pt-<point id>/`, so `launcher status` lists it, and a
point shared by two sweeps of the same job (same resolved config) runs once for both.
All sweeps of one job share one lock, held only while points are claimed and submitted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from launcher import runs
from launcher.errors import BackendError, RunNotFound

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".lock"
SWEEPS = "sweeps"
STATE_VERSION = 1
LOCK_TIMEOUT_S = 600.0
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
# A point with no run record yet.
NEW = "NEW"


def sweeps_root(runs_dir: str | Path, name: str) -> Path:
    return Path(runs_dir) / runs.slug(name) / SWEEPS


def sweep_dir(runs_dir: str | Path, name: str, sweep_id: str) -> Path:
    return sweeps_root(runs_dir, name) / sweep_id


@contextlib.contextmanager
def locked(root: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Exclusive lock over the sweeps of one job, so concurrent invocations never both
    submit a point. Held for a claim, not for a whole local sweep."""
    import filelock

    root.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(root / LOCK_FILE), timeout=timeout_s)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise BackendError(
            f"another `launcher sweep` has held {root / LOCK_FILE} for {timeout_s:.0f} s; "
            "try again when it has submitted"
        ) from None
    try:
        yield
    finally:
        lock.release()


def load(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / SWEEP_FILE).read_text())
    except FileNotFoundError:
        return None


def save(directory: Path, state: dict[str, Any]) -> None:
    state["updated_at"] = runs.now()
    # Compact: a 10,000-point state stays a few MB and writes in well under a second.
    text = json.dumps(state, separators=(",", ":"))
    runs.atomic_write_text(directory / SWEEP_FILE, text + "\n")


def new_state(
    *,
    sweep_id: str,
    name: str,
    backend: str,
    config_file: str | None,
    runs_dir: str,
    keys: tuple[str, ...],
    log_keys: tuple[str, ...],
    metric: str,
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "sweep_id": sweep_id,
        "name": name,
        "backend": backend,
        "config_file": config_file,
        "runs_dir": runs_dir,
        "keys": list(keys),
        "log_keys": list(log_keys),
        "metric": metric,
        "created_at": runs.now(),
        "updated_at": None,
        "points": [],
    }


def new_point(index: int, point_id: str, run_dir: str | Path, overrides: dict[str, Any]) -> dict:
    return {
        "index": index,
        "id": point_id,
        "run_dir": str(run_dir),
        "overrides": overrides,
        "state": NEW,
        "attempts": 0,
        "job_ids": [],
        "submitted_at": None,
    }


def record_state(run_dir: str | Path) -> str:
    """The run record's state, or NEW when the point never started."""
    try:
        return runs.read_record(run_dir)["state"]
    except (RunNotFound, json.JSONDecodeError):
        return NEW


def resolve(ref: str, runs_dir: str | Path) -> Path:
    """A sweep by its folder, its id (or a prefix), or its job name (the latest sweep)."""
    direct = Path(ref)
    if (direct / SWEEP_FILE).is_file():
        return direct
    root = Path(runs_dir)
    by_name = root / runs.slug(ref) / SWEEPS
    found = sorted(by_name.glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    matches = sorted(p.parent for p in root.glob(f"*/{SWEEPS}/*/{SWEEP_FILE}"))
    by_id = [p for p in matches if p.name == ref] or [p for p in matches if p.name.startswith(ref)]
    if len(by_id) == 1:
        return by_id[0]
    if len(by_id) > 1:
        names = ", ".join(p.name for p in by_id[:5])
        raise RunNotFound(f"sweep '{ref}' is ambiguous under {root}: {names}")
    raise RunNotFound(
        f"no sweep '{ref}' under {root} (give a sweep folder, a sweep id or a job name; "
        "--runs-dir sets where to look)"
    )


def read_metric(run_dir: str | Path, metric: str) -> float | None:
    """The point's final value of `metric`: from result.json, else the last line of
    metrics.jsonl that holds it (reading only the end of the file)."""
    run_dir = Path(run_dir)
    with contextlib.suppress(OSError, ValueError):
        result = json.loads((run_dir / RESULT_FILE).read_text())
        value = result.get(metric) if isinstance(result, dict) else None
        if _number(value):
            return float(value)
    try:
        with open(run_dir / METRICS_FILE, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and _number(row.get(metric)):
            return float(row[metric])
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
