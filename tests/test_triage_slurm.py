"""Failure causes reproduced for real on the local Slurm cluster (slurm/start.sh 2): each run
folder is read by launcher.causes exactly as `launcher status` does after the refresh.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

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


def _submit(tmp_path: Path, runs_dir: Path, body: str, **sections: dict[str, Any]) -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "job.py").write_text(textwrap.dedent(body))
    data: dict[str, Any] = {
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


def _cause(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    cause = ensure_cause(run_dir, cast(runs.RunRecord, record))["cause"]
    assert cause is not None
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


# --- module not found, segfault, gloo timeout on 2 nodes ------------------------------------
# Submitted together when the module starts (each job: 2 nodes x 1 CPU in debug), so the
# three wait for the cluster once, not three times.

RANK_1_FAILS = """
    import time
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(1)
        {failure}
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for the peer that failed
    time.sleep(120)
"""
# The 3 s timeout is the collective's own group's: the rendezvous across the nodes keeps the
# default one, so a slow task start is not mistaken for the timeout under test.
GLOO_TIMEOUT = """
    import datetime, time
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    quick = dist.new_group(timeout=datetime.timedelta(seconds=3))
    if dist.get_rank() == 1:
        time.sleep(120)  # never reaches the all_reduce
    dist.all_reduce(torch.ones(1), group=quick)
"""
TWO_NODE_JOBS = {
    "test_a_missing_module_on_one_rank_of_two_nodes": RANK_1_FAILS.format(
        failure="import no_such_module_for_launcher"
    ),
    "test_a_segfault_on_one_rank_of_two_nodes_is_a_native_crash": RANK_1_FAILS.format(
        failure="import ctypes; ctypes.string_at(0)"
    ),
    "test_a_gloo_timeout_across_two_nodes_names_the_rank_that_never_arrived": GLOO_TIMEOUT,
}


@pytest.fixture(scope="module")
def two_node_runs(request, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """The run folder of each selected TWO_NODE_JOBS test, all submitted at once."""
    require_cluster()
    selected = {item.name for item in request.session.items}
    submitted: dict[str, Path] = {}
    for name, body in TWO_NODE_JOBS.items():
        if name in selected:
            folder = tmp_path_factory.mktemp("triage-2n")
            (folder / "runs").mkdir()
            submitted[name] = _submit(
                folder,
                folder / "runs",
                body,
                resources={"nodes": 2},
                env={"PYTHONPATH": str(ROOT)},
            )
    yield submitted
    for run_dir in submitted.values():  # none is left running when a test fails early
        job_id = runs.read_record(run_dir).get("backend_info", {}).get("job_id")
        if job_id:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=30)


def _two_node_cause(two_node_runs: dict[str, Path], name: str) -> tuple[dict, dict]:
    run_dir = two_node_runs[name]
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=600)
    assert record["state"] == "FAILED", record
    return record, _cause(run_dir, record)


def test_a_missing_module_on_one_rank_of_two_nodes(two_node_runs):
    _, cause = _two_node_cause(two_node_runs, "test_a_missing_module_on_one_rank_of_two_nodes")
    assert (cause["kind"], cause["rank"], cause["node"]) == ("module_not_found", 1, "node2"), cause
    assert cause["summary"] == "No module named 'no_such_module_for_launcher'"
    assert cause["consequences"] == [0], cause


def test_a_segfault_on_one_rank_of_two_nodes_is_a_native_crash(two_node_runs):
    name = "test_a_segfault_on_one_rank_of_two_nodes_is_a_native_crash"
    record, cause = _two_node_cause(two_node_runs, name)
    assert (cause["kind"], cause["rank"], cause["node"]) == ("native_crash", 1, "node2"), cause
    assert cause["detail"]["signal"] == "SIGSEGV", cause
    assert cause["consequences"] == [0], cause


def test_a_gloo_timeout_across_two_nodes_names_the_rank_that_never_arrived(two_node_runs):
    name = "test_a_gloo_timeout_across_two_nodes_names_the_rank_that_never_arrived"
    _, cause = _two_node_cause(two_node_runs, name)
    assert (cause["kind"], cause["rank"], cause["node"]) == ("collective_timeout", 0, "node1")
    assert cause["detail"]["did_not_arrive"] == [1], cause
    assert "Timed out waiting 3000ms" in cause["detail"]["message"], cause


# --- host out of memory: only where the cluster enforces memory ------------------------------
GREEDY = """
    import time
    chunks = []
    for _ in range(64):
        chunks.append(bytearray(16 * 1024 * 1024))  # touched: bytearray zero-fills
        time.sleep(0.02)
    print("allocated 1 GiB: the limit did not hold", flush=True)
"""


def _memory_enforced() -> str | None:
    """Why this cluster does not kill a job past its --mem (None when it does)."""
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
    ).stdout
    conf = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in out.splitlines())
    )
    if "task/cgroup" not in conf.get("TaskPlugin", ""):
        return f"TaskPlugin={conf.get('TaskPlugin')}: no memory cgroup per job"
    if "MEMORY" not in conf.get("SelectTypeParameters", "").upper():
        return f"SelectTypeParameters={conf.get('SelectTypeParameters')}: memory not tracked"
    return None


def test_a_memory_limit_reached_on_slurm_is_host_oom(tmp_path, runs_dir):
    """Runs once slurm/start.sh turns memory enforcement on (task/cgroup with
    ConstrainRAMSpace, CR_Core_Memory); off today, so it says why and skips."""
    why_not = _memory_enforced()
    if why_not:
        pytest.skip(f"memory enforcement is off on this cluster ({why_not})")
    run_dir = _submit(tmp_path, runs_dir, GREEDY, resources={"mem_gb": 0.25})
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=600)
    assert record["state"] == "FAILED", record
    cause = _cause(run_dir, record)
    assert (cause["kind"], cause["rank"]) == ("host_oom", 0), cause
    assert cause["node"] in ("node1", "node2"), cause
    assert "resources.mem_gb" in cause["hint"]
