"""SweepState, the one owner of sweep.json: merge keeps each point's history, claims under
the lock never hand one point to two processes, and saves are atomic."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from launcher import runs
from launcher.spec import JobSpec
from launcher.sweep import state
from launcher.sweep.define import Point
from launcher.sweep.state import NEW, SweepState
from tests.conftest import ROOT

HEADER = {
    "sweep_id": "s-1",
    "name": "job",
    "backend": "local",
    "config_file": "job.yaml",
    "keys": ("env.X",),
    "log_keys": (),
    "metric": "loss",
}


def _points(*ids: str) -> list[Point]:
    spec = JobSpec(name="job")  # SweepState reads index, id, run id and overrides only
    return [
        Point(index=i, id=pid, overrides={"env.X": str(i)}, spec=spec) for i, pid in enumerate(ids)
    ]


def _open(directory: Path, runs_dir: Path, *ids: str) -> SweepState:
    current = SweepState.open(directory, runs_dir=str(runs_dir), **HEADER)  # type: ignore[arg-type]
    current.merge(_points(*ids), lambda p: str(runs_dir / "job" / p.run_id))
    return current


def test_merge_keeps_attempts_job_ids_and_drops_points_no_longer_swept(tmp_path):
    directory = tmp_path / "sweeps" / "s-1"
    first = _open(directory, tmp_path, "aaa", "bbb", "ccc")
    first.mark_submitted(["aaa", "bbb"], array_id="41")
    first.apply({"aaa": "FAILED"})
    first.save()
    created = first.data["created_at"]

    again = _open(directory, tmp_path, "bbb", "aaa", "ddd")  # reordered, one new, one dropped
    assert again.ids == ["bbb", "aaa", "ddd"]
    a, b, d = again.entry("aaa"), again.entry("bbb"), again.entry("ddd")
    assert (a["attempts"], a["job_ids"], a["state"]) == (1, ["41_0"], "FAILED")
    assert (b["attempts"], b["job_ids"], b["state"]) == (1, ["41_1"], "PENDING")
    assert a["submitted_at"] and a["submitted_at"] == b["submitted_at"]
    assert (d["attempts"], d["job_ids"], d["state"], d["submitted_at"]) == (0, [], NEW, None)
    assert again.get("ccc") is None
    assert again.data["array_job_ids"] == ["41"] and again.data["created_at"] == created
    # The indexes and overrides are this expansion's, not the saved ones.
    assert [e["index"] for e in again.points] == [0, 1, 2]

    again.mark_submitted(["aaa"], array_id="42")
    again.save()
    saved = json.loads((directory / state.SWEEP_FILE).read_text())
    [a] = [p for p in saved["points"] if p["id"] == "aaa"]
    assert a["attempts"] == 2 and a["job_ids"] == ["41_0", "42_0"]
    assert saved["array_job_ids"] == ["41", "42"]


def test_a_fresh_sweep_has_the_same_json_shape_as_before(tmp_path):
    current = _open(tmp_path / "s", tmp_path, "aaa")
    current.save()
    saved = json.loads((tmp_path / "s" / state.SWEEP_FILE).read_text())
    assert sorted(saved) == sorted(
        ["version", "sweep_id", "name", "backend", "config_file", "runs_dir", "keys",
         "log_keys", "metric", "created_at", "updated_at", "points"]
    )  # fmt: skip
    assert saved["points"] == [
        {"index": 0, "id": "aaa", "run_dir": str(tmp_path / "job" / "pt-aaa"),
         "overrides": {"env.X": "0"}, "state": "NEW", "attempts": 0, "job_ids": [],
         "submitted_at": None}
    ]  # fmt: skip


def test_refresh_reads_records_and_claim_force_sets_the_old_run_aside(tmp_path):
    directory = tmp_path / "sweeps" / "s-1"
    current = _open(directory, tmp_path, "aaa", "bbb")
    done = Path(current.entry("aaa")["run_dir"])
    record = runs.new_record(
        run_id="pt-aaa", name="job", backend="local", world_size=1, config_file=None
    )
    record.update(state="COMPLETED", ended_at=runs.now())
    runs.write_record(done, record)
    assert current.refresh() == {"aaa": "COMPLETED", "bbb": NEW}
    assert current.entry("aaa")["state"] == "COMPLETED"

    current.mark_submitted(["aaa"])
    assert current.claim(["aaa", "bbb"], force=True) == ["aaa", "bbb"]
    assert not done.exists()
    assert (directory / "replaced" / "pt-aaa.1" / runs.RECORD).is_file()


CLAIMER = """
import json, sys, time
from pathlib import Path
from launcher.sweep import state
from launcher.sweep.state import SweepState

directory, go, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
seen = {e["id"]: e["attempts"] for e in SweepState.load(directory).points}  # before the lock
order = sorted(seen, reverse=sys.argv[4] == "down")
(out.parent / (out.name + ".ready")).touch()
while not go.exists():
    time.sleep(0.005)
mine = []
for point_id in order:  # one claim per lock hold, as the local loop does
    with state.locked(directory.parent):
        current = SweepState.load(directory)
        for got in current.claim([point_id], force=False, seen=seen):
            current.mark_submitted([got])
            mine.append(got)
        current.save()
out.write_text(json.dumps(mine))
"""


def test_two_processes_claiming_the_same_points_never_both_get_one(tmp_path):
    directory = tmp_path / "sweeps" / "s-1"
    ids = [f"p{i:03d}" for i in range(60)]
    _open(directory, tmp_path, *ids).save()
    go = tmp_path / "go"
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(directory), str(go), str(out), way], cwd=ROOT
        )
        for out, way in zip(outs, ("up", "down"), strict=True)
    ]
    try:
        for out in outs:
            ready = out.parent / (out.name + ".ready")
            for _ in range(600):
                if ready.exists():
                    break
                threading.Event().wait(0.05)
        go.touch()  # both read the snapshot (attempts 0) before either claims
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    a, b = (set(json.loads(out.read_text())) for out in outs)
    assert not a & b, f"claimed twice: {sorted(a & b)}"
    # Both decided from the same snapshot, so without the attempts check under the lock
    # whichever came second would take every point again.
    assert a | b == set(ids)
    final = SweepState.load(directory)
    assert final is not None and [e["attempts"] for e in final.points] == [1] * len(ids)


def test_save_is_atomic_for_a_concurrent_reader(tmp_path):
    directory = tmp_path / "sweeps" / "s-1"
    ids = [f"{i:012x}" for i in range(4000)]  # a few hundred KB: a torn write would show
    current = _open(directory, tmp_path, *ids)
    current.save()
    path = directory / state.SWEEP_FILE
    stop = threading.Event()
    errors: list[str] = []
    reads = 0

    def read() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                errors.append(str(exc))
                return
            reads += 1
            if len(data["points"]) != len(ids):
                errors.append(f"{len(data['points'])} points")
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(40):
            current.mark_submitted(ids[n : n + 100])
            current.save()
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
    assert reads > 0
    assert [p.name for p in directory.iterdir()] == [state.SWEEP_FILE]  # no temp files left


def test_a_save_that_fails_leaves_the_previous_file(tmp_path):
    directory = tmp_path / "s"
    current = _open(directory, tmp_path, "aaa")
    current.save()
    before = (directory / state.SWEEP_FILE).read_bytes()
    current.entry("aaa")["overrides"]["env.X"] = object()  # not JSON
    with pytest.raises(TypeError):
        current.save()
    assert (directory / state.SWEEP_FILE).read_bytes() == before
