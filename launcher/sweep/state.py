"""Sweep directories, the sweep.json state file (`SweepState`, its one owner), its lock,
where each point stands, and reading a point's result.

Layout: `<runs_dir>/<name>/sweeps/<sweep_id>/sweep.json`. Each point runs in an ordinary
run directory `<runs_dir>/<name>/pt-<point id>/`, so `launcher status` lists it, and a
point shared by two sweeps of the same job (same resolved config) runs once for both.
All sweeps of one job share one lock, held only while points are claimed and submitted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, TypeGuard

from launcher import runs
from launcher.errors import BackendError, RunNotFound

if TYPE_CHECKING:
    from launcher.sweep.define import Point

SWEEP_FILE = "sweep.json"
LOCK_FILE = ".lock"
SWEEPS = "sweeps"
STATE_VERSION = 1
LOCK_TIMEOUT_S = 600.0
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
# A point with no run record yet.
NEW = "NEW"
ACTIVE = ("PENDING", "RUNNING")
# Submitted as an array task, but the batched query does not know the task yet.
SUBMITTED = "SUBMITTED"
WAITING = (*ACTIVE, SUBMITTED)


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


class SweepEntry(TypedDict):
    """One point in sweep.json (the JSON stays as it was; this types it)."""

    index: int
    id: str
    run_dir: str
    overrides: dict[str, Any]
    state: str
    attempts: int
    job_ids: list[str]
    submitted_at: str | None


class SweepFile(TypedDict):
    """sweep.json: what the sweep is, and every point with its history."""

    version: int
    sweep_id: str
    name: str
    backend: str
    config_file: str | None
    runs_dir: str
    keys: list[str]
    log_keys: list[str]
    metric: str
    created_at: str
    updated_at: str | None
    # Written once the first array is queued (array backends only).
    array_job_ids: NotRequired[list[str]]
    points: list[SweepEntry]


def new_point(
    index: int,
    point_id: str,
    run_dir: str | Path,
    overrides: dict[str, Any],
    history: SweepEntry | None = None,
) -> SweepEntry:
    """A point's entry; `history`: the saved entry of the same point, whose state,
    attempts, job ids and submission time carry over."""
    old: Mapping[str, Any] = history or {}
    return {
        "index": index,
        "id": point_id,
        "run_dir": str(run_dir),
        "overrides": overrides,
        "state": old.get("state", NEW),
        "attempts": old.get("attempts", 0),
        "job_ids": old.get("job_ids", []),
        "submitted_at": old.get("submitted_at"),
    }


class SweepState:
    """The one owner of sweep.json: every change to a point's entry goes through here.

    Changes that decide who submits a point (`claim`, `mark_submitted`) must happen between
    `load`/`open` and `save` under `locked()`, so a second invocation sees them.
    """

    def __init__(self, directory: Path, data: SweepFile) -> None:
        self.directory = directory
        self.data = data
        self._by_id = {entry["id"]: entry for entry in data["points"]}

    # --- reading and writing the file ---

    @classmethod
    def load(cls, directory: Path) -> SweepState | None:
        """The sweep as saved; None when it was never saved."""
        try:
            data = json.loads((directory / SWEEP_FILE).read_text())
        except FileNotFoundError:
            return None
        return cls(directory, data)

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        sweep_id: str,
        name: str,
        backend: str,
        config_file: str | None,
        runs_dir: str,
        keys: tuple[str, ...],
        log_keys: tuple[str, ...],
        metric: str,
    ) -> SweepState:
        """This expansion's header, with the saved points (if any) kept until `merge`."""
        old = cls.load(directory)
        data: SweepFile = {
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
        if old is not None:
            data["created_at"] = old.data.get("created_at", data["created_at"])
            data["array_job_ids"] = old.data.get("array_job_ids", [])
            data["points"] = old.data["points"]
        return cls(directory, data)

    def save(self) -> None:
        """Atomically (temp file, fsync, rename): a reader never sees half a file."""
        self.data["updated_at"] = runs.now()
        # Compact: a 10,000-point state stays a few MB and writes in well under a second.
        text = json.dumps(self.data, separators=(",", ":"))
        runs.atomic_write_text(self.directory / SWEEP_FILE, text + "\n")

    def merge(self, points: Iterable[Point], run_dir: Callable[[Point], str]) -> None:
        """The points of this expansion, in its order; a point seen before keeps its state,
        attempts, job ids and submission time (points no longer in the sweep are dropped)."""
        before = self._by_id
        merged = [
            new_point(p.index, p.id, run_dir(p), p.overrides, before.get(p.id)) for p in points
        ]
        self.data["points"] = merged
        self._by_id = {entry["id"]: entry for entry in merged}

    # --- views ---

    @property
    def points(self) -> list[SweepEntry]:
        return self.data["points"]

    @property
    def ids(self) -> list[str]:
        return [entry["id"] for entry in self.data["points"]]

    def entry(self, point_id: str) -> SweepEntry:
        return self._by_id[point_id]

    def get(self, point_id: str) -> SweepEntry | None:
        return self._by_id.get(point_id)

    def count(self, states: Iterable[str]) -> int:
        wanted = set(states)
        return sum(entry["state"] in wanted for entry in self.data["points"])

    # --- changes ---

    def refresh(self, *, only_states: Iterable[str] | None = None) -> dict[str, str]:
        """Bring points' states up to date (one batched query per backend) and apply them:
        every point, or those whose stored state is in `only_states` (a loop that polls
        the running ones)."""
        if only_states is None:
            entries = self.data["points"]
        else:
            wanted = set(only_states)
            entries = [e for e in self.data["points"] if e["state"] in wanted]
        found = current_states(entries, self.data["backend"])
        self.apply(found)
        return found

    def apply(self, states: dict[str, str]) -> None:
        for point_id, now in states.items():
            self._by_id[point_id]["state"] = now

    def claim(
        self, point_ids: Iterable[str], *, force: bool, seen: dict[str, int] | None = None
    ) -> list[str]:
        """The points this invocation may submit now: with `seen` (attempts when it decided,
        before it held the lock), only those nobody submitted since. `force`: an earlier
        run's folder moves under the sweep's `replaced/`, so the point starts clean."""
        claimed = []
        for point_id in point_ids:
            entry = self._by_id[point_id]
            if seen is not None and entry["attempts"] != seen[point_id]:
                continue  # another invocation took it
            if force and entry["state"] != NEW:
                _set_aside(Path(entry["run_dir"]), self.directory, entry["attempts"])
            claimed.append(point_id)
        return claimed

    def mark_submitted(self, point_ids: list[str], array_id: str | None = None) -> None:
        """One more attempt of each point, now PENDING; an array's task i is point_ids[i]
        with job id `ARRAY_i`."""
        stamp = runs.now()
        for task, point_id in enumerate(point_ids):
            entry = self._by_id[point_id]
            entry["attempts"] += 1
            entry["submitted_at"] = stamp
            entry["state"] = "PENDING"
            if array_id is not None:
                entry["job_ids"] = [*entry["job_ids"], f"{array_id}_{task}"]
        if array_id is not None:
            self.data["array_job_ids"] = [*self.data.get("array_job_ids", []), array_id]


def _set_aside(run_dir: Path, directory: Path, attempt: int) -> None:
    """--force: keep the previous run's folder (under the sweep dir) and start clean."""
    if run_dir.exists():
        target = directory / "replaced" / f"{run_dir.name}.{attempt}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(run_dir, target)


# --- where each point stands -------------------------------------------------------------


def current_states(entries: Sequence[SweepEntry], backend: str) -> dict[str, str]:
    """Point id -> state, brought up to date with one batched query per backend (not one
    per point): `refresh` for runs with a record, and for array tasks that have not written
    theirs yet (or whose record is from an earlier attempt) the array backend's one query."""
    from launcher.backends import get_backend

    found: dict[str, str] = {}
    active: dict[str, list[tuple[str, Path]]] = {}
    queued: dict[str, str] = {}
    for entry in entries:
        run_dir = entry["run_dir"]
        job_ids = entry.get("job_ids") or []
        record = _read_record(run_dir)
        info = (record or {}).get("backend_info") or {}
        if job_ids and info.get("job_id") != job_ids[-1]:
            queued[entry["id"]] = job_ids[-1]  # this attempt's task has not started yet
            continue
        if record is None or (record["state"] == "PENDING" and not info):
            # Never started, or a record written just before a submission that failed.
            found[entry["id"]] = NEW
            continue
        found[entry["id"]] = record["state"]
        if record["state"] in ACTIVE:
            active.setdefault(record["backend"], []).append((entry["id"], Path(run_dir)))
    for backend_name, items in active.items():
        get_backend(backend_name).refresh([folder for _, folder in items])
        for point_id, folder in items:
            found[point_id] = record_state(folder)
    if queued:
        array = get_backend(backend).array
        # Only an array backend writes job ids before a task has a record.
        tasks = array.task_states(sorted(set(queued.values()))) if array else {}
        for point_id, job_id in queued.items():
            found[point_id] = tasks.get(job_id, SUBMITTED)
    return found


def _read_record(run_dir: str) -> dict[str, Any] | None:
    """The run record, or None when the point has no (readable) record yet."""
    try:
        with open(os.path.join(run_dir, runs.RECORD), "rb") as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


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


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
