"""Failure causes reproduced for real on the local Slurm cluster (slurm/start.sh 2): each run
folder is read by launcher.causes exactly as `launcher status` does after the refresh.
"""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.causes import ensure_cause
from tests.conftest import ROOT, launcher_cmd
from tests.slurm_helpers import only_run, require_cluster, wait_file, wait_state

# One xdist worker runs every slurm test, one after another (shared cluster).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(900)]

FAIL_ON_RANK_1 = """
    import time
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(1)
        raise ValueError("bad batch shape")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for the peer that failed
    time.sleep(120)
"""
SLEEPER = """
    import time
    open("started", "w").close()
    time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _cluster():
    require_cluster()


def _submit(tmp_path: Path, runs_dir: Path, body: str, **sections) -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "job.py").write_text(textwrap.dedent(body))
    data = {
        "name": "triage",
        "backend": "slurm",
        "workdir": str(work),
        "entrypoint": {"script": "job.py"},
        "resources": {"nodes": 1, "procs_per_node": 1, "cpus_per_proc": 1, "mem_gb": 0.5},
        "slurm": {"partition": "debug", "max_requeue": 0},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}")
    assert out.returncode == 0, out.stderr + out.stdout
    return only_run(runs_dir)


def _cause(run_dir: Path, record: dict) -> dict:
    cause = ensure_cause(run_dir, record)["cause"]
    assert runs.read_record(run_dir)["cause"] == cause  # kept in the record
    return cause


def test_an_exception_on_one_rank_of_two_nodes(tmp_path, runs_dir):
    run_dir = _submit(
        tmp_path, runs_dir, FAIL_ON_RANK_1, resources={"nodes": 2}, env={"PYTHONPATH": str(ROOT)}
    )
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=600)
    assert record["state"] == "FAILED", record
    cause = _cause(run_dir, record)
    assert cause["kind"] == "python_exception", cause
    assert (cause["rank"], cause["node"]) == (1, "node2"), cause
    assert cause["detail"]["exception"] == "ValueError"
    assert cause["detail"]["where"] == f"{tmp_path / 'work' / 'job.py'}:8"
    assert cause["consequences"] == [0], cause
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert "ValueError: bad batch shape" in status.stdout, status.stdout


def test_the_time_limit_without_requeue_is_time_limit(tmp_path, runs_dir):
    run_dir = _submit(
        tmp_path, runs_dir, SLEEPER, resources={"time_min": 1}, slurm={"signal_delay_s": 30}
    )
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=600)
    assert record["state"] in ("FAILED", "CANCELLED"), record
    cause = _cause(run_dir, record)
    assert cause["kind"] == "time_limit", (cause, record.get("error"), record.get("slurm_state"))
    assert "resources.time_min" in cause["hint"]


def test_scancel_by_the_user_is_cancelled(tmp_path, runs_dir):
    run_dir = _submit(tmp_path, runs_dir, SLEEPER)
    wait_file("started", tmp_path / "work", timeout=600)
    job_id = runs.read_record(run_dir)["backend_info"]["job_id"]
    subprocess.run(["scancel", job_id], check=True, timeout=30)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=120)
    assert record["state"] == "CANCELLED", record
    cause = _cause(run_dir, record)
    assert cause["kind"] == "cancelled", cause
    if record.get("slurm_reason"):  # kept by status.apply_state: who cancelled
        assert cause["summary"] == f"cancelled {record['slurm_reason']}", cause
    else:  # until it is: the backend's own words, never a guessed "someone"
        assert cause["summary"] == record["error"], cause


def test_preempted_with_no_requeue_left_is_preempted(tmp_path, runs_dir):
    # Exclusive on its node, preempted by a 1-CPU job in `high` on that node only: no other
    # job on the cluster is touched.
    run_dir = _submit(tmp_path, runs_dir, SLEEPER, slurm={"exclusive": True})
    wait_file("started", tmp_path / "work", timeout=600)
    job_id = runs.read_record(run_dir)["backend_info"]["job_id"]
    node = subprocess.run(
        ["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    assert node, f"job {job_id} is not running"
    high = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-w", node, "-n1", "-o", "/dev/null"]
        + ["--wrap", "sleep 2"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    try:
        record = wait_state(run_dir, runs.FINAL_STATES, timeout=300)
    finally:
        # Never left pending: it would preempt whatever runs on that node next.
        subprocess.run(["scancel", high.split(";")[0]], capture_output=True, timeout=30)
    assert record["state"] in ("CANCELLED", "FAILED"), record
    cause = _cause(run_dir, record)
    assert cause["kind"] == "preempted", (cause, record.get("error"), record.get("attempts"))
    assert "slurm.max_requeue" in cause["hint"]
