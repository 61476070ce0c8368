"""Failure causes reproduced for real in the project image on the real Docker engine: the
run folder each failure leaves is read by launcher.causes exactly as `launcher status` does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher import runs
from launcher.causes import ensure_cause
from tests.conftest import ROOT, launcher_cmd

# One xdist worker runs every docker test, one after another (shared engine and image).
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("docker"), pytest.mark.timeout(400)]

# Touches 1 GiB page by page, so the container's memory limit is reached for certain.
GREEDY = """
    import time
    chunks = []
    for _ in range(64):
        chunks.append(bytearray(16 * 1024 * 1024))
        time.sleep(0.01)
    print("allocated 1 GiB: the limit did not hold", flush=True)
"""


def _run(
    tmp_path: Path, image: str, runs_dir: Path, *extra: str, **sections: dict[str, Any]
) -> runs.RunRecord:
    data: dict[str, Any] = {
        "name": "triage",
        "backend": "docker",
        "workdir": str(ROOT),
        "resources": {"procs_per_node": 1},
        "docker": {"image": image},
        "local": {"stop_grace_s": 2},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet", *extra)
    assert out.returncode == 1, out.stderr + out.stdout
    (run_dir,) = list(runs.iter_run_dirs(runs_dir))
    record = ensure_cause(run_dir, runs.read_record(run_dir))
    assert runs.read_record(run_dir)["cause"] == record["cause"]  # kept
    return record


def test_a_memory_limit_reached_is_host_oom(project_image, runs_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "greedy.py").write_text(textwrap.dedent(GREEDY))
    record = _run_in(work, tmp_path, project_image.tag, runs_dir)
    cause = record["cause"]
    assert record["oom_kills"] >= 1, record  # the supervisor's cgroup, seen inside the container
    assert cause["kind"] == "host_oom", cause
    assert cause["rank"] == 0
    assert "resources.mem_gb" in cause["hint"]


def _run_in(work: Path, tmp_path: Path, image: str, runs_dir: Path) -> runs.RunRecord:
    data = {
        "name": "triage",
        "backend": "docker",
        "workdir": str(work),
        "entrypoint": {"script": "greedy.py"},
        "resources": {"procs_per_node": 1, "mem_gb": 0.25},
        "docker": {"image": image},
        "local": {"stop_grace_s": 2},
    }
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet", "--no-preflight")
    assert out.returncode == 1, out.stderr + out.stdout
    (run_dir,) = list(runs.iter_run_dirs(runs_dir))
    return ensure_cause(run_dir, runs.read_record(run_dir))


def test_a_small_dev_shm_with_loader_workers_is_shm_full(project_image, runs_dir, tmp_path):
    record = _run(
        tmp_path,
        project_image.tag,
        runs_dir,
        "--no-preflight",  # the preflight refuses this shm up front; here: the run's outcome
        entrypoint={"script": "tests/jobs/shm_loader.py"},
        loader={"num_workers": 3, "prefetch_factor": 2, "sample_bytes": 4 * 1024**2},
        train={"micro_batch_size": 8},
        docker={"shm_gb": 0.0625},
    )
    cause = record["cause"]
    assert cause["kind"] == "shm_full", (cause, record.get("error"))
    assert cause["rank"] == 0
    assert "docker.shm_gb" in cause["hint"]


# --- the same causes as the local backend, in a container (tests/test_triage_real.py) ---------

FAIL_ON_RANK_1 = """
    import os, sys, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(0.5)
        {failure}
    import torch
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 waits here for the peer that failed
    time.sleep(30)
"""
# The collective's 3 s timeout is its own group's: the default group (30 min) takes the
# rendezvous, so a slow start under load is not mistaken for the timeout under test.
GLOO_TIMEOUT = """
    import datetime, time
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    quick = dist.new_group(timeout=datetime.timedelta(seconds=3))
    if dist.get_rank() == 1:
        time.sleep(60)  # never reaches the all_reduce
    dist.all_reduce(torch.ones(1), group=quick)
"""
SLEEPER = """
    import os, time
    open(os.path.join(os.environ["LAUNCHER_RUN_DIR"], "up-rank" + os.environ["RANK"]), "w").close()
    time.sleep(300)
"""
TIME_LIMIT_TEST = "test_the_time_limit_in_a_container_is_time_limit"


def _job_config(work: Path, image: str, body: str, **resources) -> Path:
    """A 2-rank job running `body` as job.py from `work` (mounted at /workspace)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.py").write_text(textwrap.dedent(body))
    data = {
        "name": "triage",
        "backend": "docker",
        "workdir": str(work),
        "entrypoint": {"script": "job.py"},
        "resources": {"procs_per_node": 2, **resources},
        "docker": {"image": image},
        "local": {"stop_grace_s": 2},
    }
    cfg = work / "job.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def _cause_of(runs_dir: Path) -> runs.RunRecord:
    (run_dir,) = list(runs.iter_run_dirs(runs_dir))
    record = ensure_cause(run_dir, runs.read_record(run_dir))
    assert runs.read_record(run_dir)["cause"] == record["cause"]  # kept
    return record


def _run_job(tmp_path: Path, image: str, runs_dir: Path, body: str) -> runs.RunRecord:
    cfg = _job_config(tmp_path / "work", image, body)
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == 1, out.stderr + out.stdout
    return _cause_of(runs_dir)


@pytest.fixture(scope="module", autouse=True)
def _time_limit_run(request, project_image, tmp_path_factory) -> Iterator[tuple | None]:
    """The 1-minute time limit (the smallest resources.time_min) starts first and runs out
    while the other tests of this module run, so it adds a few seconds, not a minute."""
    if not any(item.name == TIME_LIMIT_TEST for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("time-limit")
    runs_dir = folder / "runs"
    body = "import time\ntime.sleep(300)\n"
    cfg = _job_config(folder / "work", project_image.tag, body, time_min=1)
    argv = [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}", "--quiet"]
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc, runs_dir, time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_an_exception_on_one_rank_in_a_container_and_the_other_is_a_consequence(
    project_image, runs_dir, tmp_path
):
    body = FAIL_ON_RANK_1.format(failure='raise ValueError("bad batch shape")')
    cause = _run_job(tmp_path, project_image.tag, runs_dir, body)["cause"]
    assert cause["kind"] == "python_exception", cause
    assert cause["rank"] == 1 and cause["consequences"] == [0], cause
    assert cause["detail"]["exception"] == "ValueError"
    assert cause["detail"]["where"] == "/workspace/job.py:7"  # the user's file in the container


def test_a_missing_module_in_a_container_is_named(project_image, runs_dir, tmp_path):
    body = FAIL_ON_RANK_1.format(failure="import no_such_module_for_launcher")
    cause = _run_job(tmp_path, project_image.tag, runs_dir, body)["cause"]
    assert (cause["kind"], cause["rank"], cause["consequences"]) == ("module_not_found", 1, [0])
    assert cause["summary"] == "No module named 'no_such_module_for_launcher'"
    assert "the image" in cause["hint"]


def test_a_segfault_in_a_container_is_a_native_crash(project_image, runs_dir, tmp_path):
    body = FAIL_ON_RANK_1.format(failure="import ctypes; ctypes.string_at(0)")
    record = _run_job(tmp_path, project_image.tag, runs_dir, body)
    cause = record["cause"]
    assert record["exit_codes"]["1"] == -11, record["exit_codes"]
    assert (cause["kind"], cause["rank"], cause["consequences"]) == ("native_crash", 1, [0])
    assert cause["detail"]["signal"] == "SIGSEGV"


def test_a_gloo_timeout_in_a_container_names_the_rank_that_never_arrived(
    project_image, runs_dir, tmp_path
):
    cause = _run_job(tmp_path, project_image.tag, runs_dir, GLOO_TIMEOUT)["cause"]
    assert cause["kind"] == "collective_timeout" and cause["rank"] == 0, cause
    assert cause["detail"]["did_not_arrive"] == [1], cause
    assert "Timed out waiting 3000ms" in cause["detail"]["message"], cause


def test_launcher_cancel_of_a_container_run_is_cancelled(project_image, runs_dir, tmp_path):
    cfg = _job_config(tmp_path / "work", project_image.tag, SLEEPER)
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--detach")
    assert out.returncode == 0, out.stderr + out.stdout
    (run_dir,) = list(runs.iter_run_dirs(runs_dir))
    deadline = time.monotonic() + 120
    while not all((run_dir / f"up-rank{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, runs.read_record(run_dir)
        time.sleep(0.2)
    cancel = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert cancel.returncode == 0, cancel.stderr
    record = _cause_of(runs_dir)
    assert record["state"] == "CANCELLED", record
    cause = record["cause"]
    # `launcher cancel` stops the container: its supervisor gets SIGTERM and says so.
    assert (cause["kind"], cause["summary"]) == ("cancelled", "cancelled by SIGTERM"), cause
    assert cause["rank"] is None and cause["consequences"] == []


def test_the_time_limit_in_a_container_is_time_limit(_time_limit_run):
    assert _time_limit_run is not None
    proc, runs_dir, started = _time_limit_run
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 1, out
    assert time.monotonic() - started >= 60
    record = _cause_of(runs_dir)
    assert record["error"].startswith("time limit of 1 min reached"), record["error"]
    cause = record["cause"]
    assert cause["kind"] == "time_limit", cause
    assert cause["rank"] is None and "resources.time_min" in cause["hint"]
