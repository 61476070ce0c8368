"""Sweeps on the real local Slurm cluster (slurm/start.sh): job arrays, chunking to
MaxArraySize, squeue/sacct, failed points resubmitted alone, and the report."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import runs
from launcher.sweep import execute, plan, state
from tests.conftest import ROOT, need

# One xdist worker runs every slurm test, one after another (shared cluster).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

# A callable job: one submitit process per task, the cheapest tiny job on Slurm.
TINY_JOB = """
import json, os

def point(spec):
    x, y = int(spec.env["X"]), int(spec.env["Y"])
    if os.path.exists(os.path.join(spec.env["MARKERS"], f"fail-{x}")):
        raise RuntimeError(f"point X={x} fails on purpose")
    with open(os.path.join(os.environ["LAUNCHER_RUN_DIR"], "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"loss": (x - 3) ** 2 + y / 100}) + "\\n")
    return 0
"""


def _slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def slurm_sweep(tmp_path: Path, runs_dir: Path):
    need(_slurm_up(), "the local Slurm cluster (bash slurm/start.sh)")
    (tmp_path / "tinyjob.py").write_text(TINY_JOB)
    markers = tmp_path / "markers"
    markers.mkdir()

    def write(xs: int, ys: int, extra: str = "") -> Path:
        path = tmp_path / "sweep.yaml"
        path.write_text(
            f"""
name: slurm-sweep
workdir: {tmp_path}
runs_dir: {runs_dir}
backend: slurm
entrypoint: {{callable: "tinyjob:point"}}
resources: {{time_min: 5}}
env: {{X: "0", Y: "0", MARKERS: "{markers}"}}
sweep:
  grid: {{env.X: {[str(i) for i in range(xs)]}, env.Y: {[str(i) for i in range(ys)]}}}
{extra}
"""
        )
        return path

    write.markers = markers  # type: ignore[attr-defined]
    return write


@pytest.fixture
def arrays_to_cancel():
    """Array job ids a test submitted: cancelled at the end, so a failed test leaves no
    tasks on the shared cluster (scancel of an ended job is harmless)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, check=False)


def _launcher(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _array_ids(stderr: str) -> list[str]:
    for line in stderr.splitlines():
        if "submitted array job(s)" in line:
            return line.rsplit(")", 1)[1].strip().split(", ")
    raise AssertionError(f"no array job ids in: {stderr}")


def _wait_until_done(sweep_dir: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        current = json.loads((sweep_dir / "sweep.json").read_text())
        states = state.current_states(current["points"], "slurm")
        if not any(s in state.WAITING for s in states.values()):
            return states
        assert time.monotonic() < deadline, f"sweep not done after {timeout_s} s: {states}"
        time.sleep(3)


def test_200_point_grid_runs_as_chunked_arrays_and_failed_points_rerun_alone(
    slurm_sweep, runs_dir, arrays_to_cancel
):
    cfg = slurm_sweep(10, 20, "  metric: loss")
    (slurm_sweep.markers / "fail-7").touch()  # the 20 points with X=7 fail
    proc = _launcher("sweep", str(cfg), "slurm.max_array_size=50")
    assert proc.returncode == 0, proc.stderr
    assert "200 points on slurm; submitting 200; skipping none" in proc.stderr
    arrays = _array_ids(proc.stderr)
    arrays_to_cancel.extend(arrays)
    assert len(arrays) == 4  # 200 points in arrays of at most 50 tasks

    # The queue holds them as arrays ("A_[i-j]" while pending, "A_i" once started).
    queue = subprocess.run(
        ["squeue", "-h", "-j", ",".join(arrays), "-o", "%i %F %K"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert queue.strip() and {line.split()[1] for line in queue.splitlines()} <= set(arrays)
    assert all("_" in line.split()[0] for line in queue.splitlines())
    [sweep_dir] = [p.parent for p in (runs_dir / "slurm-sweep" / "sweeps").glob("*/sweep.json")]
    scripts = sorted((sweep_dir / "slurm").glob("chunk-*.sh"))
    assert [s.read_text().count("#SBATCH --array=0-49%50") for s in scripts] == [1, 1, 1, 1]

    states = _wait_until_done(sweep_dir, timeout_s=900)
    assert sorted(states.values()).count("COMPLETED") == 180
    assert sorted(states.values()).count("FAILED") == 20

    # sacct knows every task of every array.
    acct = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", ",".join(arrays), "-o", "JobID,State"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tasks = dict(line.split("|")[:2] for line in acct.splitlines())
    assert len(tasks) == 200 and all(t.split("_")[0] in arrays for t in tasks)

    # Each point is an ordinary run record with its array task's job id.
    current = json.loads((sweep_dir / "sweep.json").read_text())
    first = current["points"][0]
    record = runs.read_record(first["run_dir"])
    assert record["backend_info"]["job_id"] == first["job_ids"][-1] == f"{arrays[0]}_0"
    assert (Path(first["run_dir"]) / "config.yaml").is_file()

    # Rerun: nothing new without --retry-failed; with it, only the 20 failed points.
    again = _launcher("sweep", str(cfg), "slurm.max_array_size=50")
    assert "submitting 0; skipping 200 (180 completed, 20 failed)" in again.stderr
    (slurm_sweep.markers / "fail-7").unlink()
    retry = _launcher("sweep", str(cfg), "slurm.max_array_size=50", "--retry-failed", "--wait",
                      timeout=600)  # fmt: skip
    arrays_to_cancel.extend(_array_ids(retry.stderr))
    assert retry.returncode == 0, retry.stderr
    assert "submitting 20; skipping 180 (180 completed)" in retry.stderr
    assert len(_array_ids(retry.stderr)) == 1
    current = json.loads((sweep_dir / "sweep.json").read_text())
    tries = {p["overrides"]["env.X"]: p["attempts"] for p in current["points"]}
    assert tries == {str(x): 2 if x == 7 else 1 for x in range(10)}

    status = _launcher("sweep", "status", str(sweep_dir))
    assert "200 points: 200 completed" in status.stdout, status.stdout + status.stderr
    report = _launcher("sweep", "report", "slurm-sweep", "--runs-dir", str(runs_dir))
    assert report.returncode == 0, report.stderr
    with open(sweep_dir / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 200 and all(r["loss"] for r in rows)
    best = min(rows, key=lambda r: float(r["loss"]))
    assert (best["env.X"], best["env.Y"]) == ("3", "0")
    assert (sweep_dir / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_chunks_follow_the_clusters_max_array_size(slurm_sweep, runs_dir):
    from launcher.backends.slurm.status import cluster_max_array_size

    limit = cluster_max_array_size()  # `scontrol show config`
    # One point more than an array may hold: two arrays, submitted held and cancelled.
    ys = math.ceil((limit + 1) / 2)
    cfg = slurm_sweep(2, ys)
    prepared = plan.prepare(str(cfg), [])
    assert len(prepared.points) == 2 * ys > limit
    code = execute.run(prepared, execute.Options(hold=True))
    assert code == 0
    current = json.loads((prepared.directory / "sweep.json").read_text())
    arrays = current["array_job_ids"]
    try:
        assert len(arrays) == 2
        sizes = [
            sum(p["job_ids"][-1].startswith(f"{a}_") for p in current["points"]) for a in arrays
        ]
        assert sizes == [limit, 2 * ys - limit]
        states = state.current_states(current["points"][:3] + current["points"][-3:], "slurm")
        assert set(states.values()) == {"PENDING"}  # held: queued, no record yet
    finally:
        subprocess.run(["scancel", *arrays], check=True)
    deadline = time.monotonic() + 60
    while True:
        states = state.current_states(current["points"][:3] + current["points"][-3:], "slurm")
        if set(states.values()) == {"CANCELLED"}:
            break
        assert time.monotonic() < deadline, states
        time.sleep(2)
    # Cancelled points count as failed: the next run resubmits them with --retry-failed.
    assert not list(runs.iter_run_dirs(runs_dir))


REQUEUE_JOB = """
import os, signal, subprocess, time
restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
print(f"restart {restarts}", flush=True)
if restarts == 0:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(75))  # checkpoint-and-exit
    # As Lightning does: ask for a requeue. launcher's scontrol shim hands it to the host,
    # which stops the ranks with the job's stop signal (TERM) and requeues the task once.
    job = os.environ["SLURM_ARRAY_JOB_ID"] + "_" + os.environ["SLURM_ARRAY_TASK_ID"]
    subprocess.run(["scontrol", "requeue", job], check=True)
    time.sleep(300)
"""


def test_a_requeued_array_task_resumes_its_own_point(tmp_path, runs_dir, arrays_to_cancel):
    need(_slurm_up(), "the local Slurm cluster (bash slurm/start.sh)")
    (tmp_path / "requeue.py").write_text(REQUEUE_JOB)
    cfg = tmp_path / "requeue.yaml"
    cfg.write_text(
        f"""
name: requeue-sweep
workdir: {tmp_path}
runs_dir: {runs_dir}
backend: slurm
entrypoint: {{script: requeue.py}}
resources: {{procs_per_node: 1, time_min: 5}}
slurm: {{signal_delay_s: 10}}
sweep: {{grid: {{env.X: ["0"]}}}}
"""
    )
    proc = _launcher("sweep", str(cfg))
    assert proc.returncode == 0, proc.stderr
    [array] = _array_ids(proc.stderr)
    arrays_to_cancel.append(array)
    [sweep_dir] = [p.parent for p in (runs_dir / "requeue-sweep" / "sweeps").glob("*/sweep.json")]
    # The run dir appears when the array task starts and resolves its point.
    run_dir = Path(json.loads((sweep_dir / "sweep.json").read_text())["points"][0]["run_dir"])
    log = run_dir / "logs" / "rank0.log"
    deadline = time.monotonic() + 120
    while "restart 0" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the array task did not start"
        time.sleep(1)
    # The job asks for its own requeue (see REQUEUE_JOB); Slurm's early USR2 is held by the
    # host until EndTime - signal_delay_s, so it is not what a 4-minute test can wait for.
    states = _wait_until_done(sweep_dir, timeout_s=240)
    assert list(states.values()) == ["COMPLETED"]
    starts = [line for line in log.read_text().splitlines() if line.startswith("restart")]
    assert starts == ["restart 0", "restart 1"]
    task_log = (sweep_dir / "slurm" / f"{array}_0_0_log.out").read_text()
    assert task_log.count(f"array task {array}_0 runs {run_dir}") == 1
    assert task_log.count(f"array task {array}_0 resumes (requeued) {run_dir}") == 1
