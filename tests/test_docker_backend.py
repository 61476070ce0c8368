"""The docker backend against the real engine, with the project image built FROM a local base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.backends.docker import LABEL
from tests.conftest import ROOT, launcher_cmd

# One xdist worker runs every docker test, one after another (shared engine and image).
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("docker")]


def _config(tmp_path: Path, image: str, **sections) -> Path:
    data = {
        "name": "dock",
        "backend": "docker",
        "workdir": str(ROOT),
        "resources": {"procs_per_node": 2},
        "docker": {"image": image},
        "local": {"stop_grace_s": 2},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _containers(client) -> list:
    return client.containers.list(all=True, filters={"label": LABEL})


def _only_run(runs_dir: Path) -> Path:
    (found,) = list(runs.iter_run_dirs(runs_dir))
    return found


def test_quickstart_in_a_container(project_image, docker_client, runs_dir):
    before = len(_containers(docker_client))
    out = launcher_cmd(
        "run", "configs/docker.yaml", f"docker.image={project_image.tag}", f"runs_dir={runs_dir}"
    )
    assert out.returncode == 0, out.stderr + out.stdout
    run_dir = _only_run(runs_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "COMPLETED" and record["container_exit_code"] == 0
    params = [json.loads((run_dir / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert params[0]["sha256"] == params[1]["sha256"]
    assert (run_dir / "checkpoints" / "final.pt").is_file()  # written through the mount
    assert "rank 1/2 done" in (run_dir / "logs" / "rank1.log").read_text()
    assert "[rank 0] rank 0/2 done" in out.stdout  # streamed from the container
    assert len(_containers(docker_client)) == before  # removed after the run


def test_failing_job_reaches_status(project_image, docker_client, runs_dir, tmp_path):
    cfg = _config(tmp_path, project_image.tag, entrypoint={"script": "tests/jobs/crash.py"})
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == 1
    record = runs.read_record(_only_run(runs_dir))
    assert record["state"] == "FAILED" and record["failed_rank"] == 1
    assert record["exit_codes"]["1"] == 3 and record["container_exit_code"] == 1
    status = launcher_cmd("status", "dock", f"--runs-dir={runs_dir}")
    assert "rank 1 exited with code 3" in status.stdout
    assert "simulated CUDA error in rank 1" in status.stdout


def test_shm_sizing_lets_loader_workers_run(project_image, runs_dir, tmp_path):
    base = {
        "entrypoint": {"script": "tests/jobs/shm_loader.py"},
        "resources": {"procs_per_node": 1},
        "loader": {"num_workers": 3, "prefetch_factor": 2, "sample_bytes": 4 * 1024**2},
        "train": {"micro_batch_size": 8},
    }
    small = _config(tmp_path, project_image.tag, **base, docker={"shm_gb": 0.0625})
    out = launcher_cmd("run", str(small), f"runs_dir={runs_dir / 'small'}", "--quiet")
    assert out.returncode == 1, "64 MB /dev/shm (Docker's default) must not hold these batches"
    log = (_only_run(runs_dir / "small") / "logs" / "rank0.log").read_text()
    assert "shared memory" in log or "shm" in log or "Bus error" in log, log[-2000:]

    sized = _config(tmp_path, project_image.tag, **base)
    plan = launcher_cmd("run", str(sized), f"runs_dir={runs_dir / 'sized'}", "--dry-run")
    assert "/dev/shm:  384 MiB" in plan.stdout, plan.stdout
    out = launcher_cmd("run", str(sized), f"runs_dir={runs_dir / 'sized'}", "--quiet")
    assert out.returncode == 0, out.stderr
    log = (_only_run(runs_dir / "sized") / "logs" / "rank0.log").read_text()
    assert "with 3 workers, prefetch 2: ok" in log


def test_gpus_without_gpu_runtime_is_one_clear_line(
    project_image, docker_client, runs_dir, tmp_path
):
    before = {c.id for c in docker_client.containers.list(all=True)}
    cfg = _config(tmp_path, project_image.tag, resources={"gpus_per_node": 1, "procs_per_node": 1})
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}")
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("launcher: error: GPUs were asked for") and "Traceback" not in out.stderr
    assert {c.id for c in docker_client.containers.list(all=True)} == before
    assert runs.read_record(_only_run(runs_dir))["state"] == "FAILED"


def test_cancel_stops_the_container(project_image, docker_client, runs_dir, tmp_path):
    import time

    cfg = _config(tmp_path, project_image.tag, entrypoint={"script": "tests/jobs/sleeper.py"})
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--detach")
    assert out.returncode == 0, out.stderr
    run_dir = _only_run(runs_dir)
    deadline = time.monotonic() + 60
    while not (run_dir / "pid-rank1").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}").returncode == 0
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED"
    ours = record["backend_info"]["container_id"]
    left = [c for c in _containers(docker_client) if c.id == ours]
    assert not left or left[0].status == "exited"  # auto-remove may still be finishing
