"""What a run cost, from real runs: a local 2-process run that fails (wall time x resources,
all of it lost), and on the local Slurm cluster (slurm/start.sh 2, partition debug) a run
that completes, whose CPU-hours must be sacct's own AllocTRES x ElapsedRaw, and a run that is
`scancel`ed, whose status names the user who cancelled it.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from launcher import runs
from tests.conftest import ROOT, launcher_cmd
from tests.slurm_helpers import only_run, require_cluster, wait_file, wait_state

pytestmark = pytest.mark.timeout(900)

FAILS_ON_RANK_1 = """
    import os, sys, time
    if os.environ["RANK"] == "1":
        time.sleep(2)
        sys.exit(3)
    time.sleep(60)  # rank 0 is stopped by the launcher once rank 1 failed
"""


def test_a_failed_local_run_lost_all_it_held(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(FAILS_ON_RANK_1))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "cost",
                "runs_dir": str(tmp_path / "runs"),
                "entrypoint": {"script": str(script)},
                "resources": {"procs_per_node": 2, "cpus_per_proc": 2},
                "local": {"stop_grace_s": 2},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(cfg), "--quiet"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert out.returncode != 0, out.stderr
    run_dir = only_run(tmp_path / "runs")
    assert "cost" not in runs.read_record(run_dir)  # kept by the first status
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={tmp_path / 'runs'}")
    assert status.returncode == 0, status.stderr
    record = runs.read_record(run_dir)
    cost = record["cost"]
    seconds = (
        runs.dt.datetime.fromisoformat(record["ended_at"])
        - runs.dt.datetime.fromisoformat(record["started_at"])
    ).total_seconds()
    assert record["state"] == "FAILED" and seconds >= 2
    assert (cost["cpus"], cost["gpus"]) == (4, 0)  # 2 processes x cpus_per_proc 2
    assert cost["cpu_hours"] == pytest.approx(4 * seconds / 3600, abs=1e-6)
    assert cost["lost_cpu_hours"] == cost["cpu_hours"] and cost["lost_share"] == 1.0
    assert f"cost:     {runs.format_cost(cost)}\n" in status.stdout
    assert "(100%) lost to failures/requeues" in status.stdout
    as_json = launcher_cmd("status", run_dir.name, "--json", f"--runs-dir={tmp_path / 'runs'}")
    assert json.loads(as_json.stdout)[0]["cost"] == cost


POINT = """
import os, sys, time
time.sleep(1)
sys.exit(3 if os.environ["X"] == "1" else 0)
"""


def test_sweep_status_sums_the_points_costs(tmp_path):
    """3 local points, one failing: the line under the table is the sum of their records."""
    (tmp_path / "point.py").write_text(POINT)
    cfg = tmp_path / "sw.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "sw",
                "workdir": str(tmp_path),
                "runs_dir": str(tmp_path / "runs"),
                "entrypoint": {"script": "point.py"},
                "resources": {"procs_per_node": 1, "cpus_per_proc": 3},
                "env": {"X": "0"},
                "sweep": {"grid": {"env.X": ["0", "1", "2"]}, "parallelism": 3},
            }
        )
    )
    first = launcher_cmd("sweep", str(cfg), timeout=240)
    assert first.returncode == 1, first.stderr  # one point failed
    status = launcher_cmd("sweep", "status", "sw", f"--runs-dir={tmp_path / 'runs'}")
    assert status.returncode == 0, status.stderr
    costs = [runs.read_record(d)["cost"] for d in runs.iter_run_dirs(tmp_path / "runs")]
    assert len(costs) == 3 and all(c["cpus"] == 3 for c in costs)
    lost = [c for c in costs if c["lost_share"] == 1.0]
    assert len(lost) == 1 and all(c["lost_share"] == 0 for c in costs if c not in lost)
    total = runs.add_costs(costs)
    assert total["lost_cpu_hours"] == pytest.approx(lost[0]["cpu_hours"])
    line = status.stdout.splitlines()[-1]
    assert line == f"cost of 3 points: {runs.format_cost(total)}", status.stdout


def _ended(tmp_path: Path, backend: str, state: str, config: dict) -> Path:
    run_dir = tmp_path / backend
    run_dir.mkdir()
    (run_dir / runs.CONFIG).write_text(yaml.safe_dump(config))
    record = runs.new_record(run_id="R1", name="t", backend=backend, world_size=2, config_file=None)
    runs.write_record(run_dir, record)
    runs.update_record(
        run_dir,
        state=state,
        started_at="2026-12-01T08:00:00+00:00",
        ended_at="2026-12-01T08:30:00+00:00",
        # What the Docker backend records at start: the run's container has its own limits.
        **({"backend_info": {"container_name": "launcher-R1"}} if backend == "docker" else {}),
    )
    return run_dir


def test_wall_time_x_resources_on_docker_and_local(tmp_path):
    """The arithmetic of the two backends without accounting (no engine needed for it)."""
    box = _ended(
        tmp_path,
        "docker",
        "COMPLETED",
        {"resources": {"gpus_per_node": 0}, "docker": {"cpus": 1.5, "gpu_ids": ["0", "1"]}},
    )
    cost = runs.ensure_cost(box, runs.read_record(box))["cost"]
    assert (cost["cpus"], cost["gpus"], cost["seconds"]) == (1.5, 2, 1800)
    assert (cost["cpu_hours"], cost["gpu_hours"], cost["lost_share"]) == (0.75, 1.0, 0)
    assert runs.read_record(box)["cost"] == cost  # kept: not computed again
    local = _ended(tmp_path, "local", "CANCELLED", {"resources": {"cpus_per_proc": None}})
    cost = runs.ensure_cost(local, runs.read_record(local))["cost"]
    assert (cost["cpus"], cost["cpu_hours"], cost["lost_share"]) == (2, 1.0, 1.0)
    assert runs.format_cost(cost) == (
        "1.00 CPU-h, 0 GPU-h held; 1.00 CPU-h (100%) lost to failures/requeues"
    )


# ---- Slurm: the cluster's own accounting ----

SHORT = """
    import time
    time.sleep(8)
"""
SLEEPER = """
    import time
    open("started", "w").close()
    time.sleep(600)
"""


def _submit(
    tmp_path: Path, runs_dir: Path, body: str, entrypoint: dict | None = None, **slurm
) -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "job.py").write_text(textwrap.dedent(body))
    data = {
        "name": "cost",
        "backend": "slurm",
        "workdir": str(work),
        "entrypoint": entrypoint or {"script": "job.py"},
        "resources": {"nodes": 1, "procs_per_node": 2, "cpus_per_proc": 1, "mem_gb": 0.5},
        "slurm": {"partition": "debug", **slurm},
    }
    if entrypoint:  # a job of tests/jobs: it runs from the repository
        data["workdir"] = str(ROOT)
        data["resources"] = {**data["resources"], "time_min": 1}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}")
    assert out.returncode == 0, out.stderr + out.stdout
    return only_run(runs_dir)


def _sacct_rows(job_id: str) -> list[tuple[int, int]]:
    """(CPUs, seconds) of every attempt, as a user would ask sacct for them."""
    out = subprocess.run(
        ["sacct", "-X", "-D", "-P", "-n", "-j", job_id, "-o", "AllocTRES,ElapsedRaw"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    rows = []
    for line in out.splitlines():
        tres, _, elapsed = line.partition("|")
        cpus = dict(item.split("=", 1) for item in tres.split(",") if "=" in item).get("cpu", "0")
        rows.append((int(cpus), int(elapsed)))
    return rows


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_completed_slurm_run_costs_what_sacct_says(tmp_path, runs_dir):
    require_cluster()
    run_dir = _submit(tmp_path, runs_dir, SHORT)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=600)
    assert record["state"] == "COMPLETED", record
    cost = record["cost"]
    rows = _sacct_rows(record["backend_info"]["job_id"])
    # A preemption from `high` (other tests use it) requeues the run: then the earlier
    # attempts are what it lost.
    assert rows and rows[-1][0] == 2  # 2 processes x cpus_per_proc 1
    assert rows[-1][1] >= 8
    assert cost["cpu_hours"] == pytest.approx(sum(c * s for c, s in rows) / 3600, abs=1e-6)
    assert cost["lost_cpu_hours"] == pytest.approx(
        sum(c * s for c, s in rows[:-1]) / 3600, abs=1e-6
    )
    assert (cost["attempts"], cost["gpu_hours"]) == (len(rows), 0)
    assert cost["source"] == "sacct AllocTRES x ElapsedRaw"
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert f"cost:     {runs.format_cost(cost)}\n" in status.stdout, status.stdout


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_slurm_run_requeued_at_its_time_limit_lost_its_earlier_attempts(tmp_path, runs_dir):
    """1-minute limit, USR2 30 s before it: ~30 s of work per attempt for 35 s of steps, so
    the run completes in its second (or a later) attempt; sacct -D has a row per attempt."""
    require_cluster()
    job = {"script": "tests/jobs/resumable.py", "args": ["70", "0.5"]}
    run_dir = _submit(tmp_path, runs_dir, "", job, max_requeue=5, signal_delay_s=30)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=600)
    assert record["state"] == "COMPLETED", record
    rows = _sacct_rows(record["backend_info"]["job_id"])
    assert len(rows) >= 2 and len(record["attempts"]) == len(rows), (rows, record["attempts"])
    cost = record["cost"]
    earlier = sum(c * s for c, s in rows[:-1]) / 3600
    assert earlier > 0 and cost["lost_cpu_hours"] == pytest.approx(earlier, abs=1e-6)
    assert cost["cpu_hours"] == pytest.approx(sum(c * s for c, s in rows) / 3600, abs=1e-6)
    assert cost["lost_share"] == pytest.approx(earlier / cost["cpu_hours"], abs=1e-3)
    assert 0 < cost["lost_share"] < 1


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_a_scancelled_slurm_run_names_who_cancelled_it(tmp_path, runs_dir):
    require_cluster()
    run_dir = _submit(tmp_path, runs_dir, SLEEPER, max_requeue=0)
    wait_file("started", tmp_path / "work", timeout=600)
    job_id = runs.read_record(run_dir)["backend_info"]["job_id"]
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=120)
    assert record["state"] == "CANCELLED", record
    uid = os.getuid()
    user = pwd.getpwuid(uid).pw_name
    assert record["cancelled_by"] == {"uid": uid, "user": user}
    assert record["slurm_reason"] == f"by {user} (uid {uid})"
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert f"cause:    cancelled: cancelled by {user} (uid {uid})\n" in status.stdout, status.stdout
    assert runs.read_record(run_dir)["cost"]["lost_share"] == 1.0  # it did not complete
