"""Failure causes reproduced for real in the project image on the real Docker engine: the
run folder each failure leaves is read by launcher.causes exactly as `launcher status` does.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

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


def _run(tmp_path: Path, image: str, runs_dir: Path, *extra: str, **sections) -> dict:
    data = {
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


def _run_in(work: Path, tmp_path: Path, image: str, runs_dir: Path) -> dict:
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
