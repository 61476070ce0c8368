"""The docker backend against the real engine, with the project image built FROM a local base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launcher import runs
from launcher.backends.docker import LABEL
from tests.conftest import ROOT, launcher_cmd, launcher_popen

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
    # Removed after the run: this run's container (other tests' may come and go meanwhile).
    name = record["backend_info"]["container_name"]
    assert name not in [c.name for c in _containers(docker_client)]


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
    # Past the preflight, which refuses this shm up front: the backend's own outcome.
    out = launcher_cmd(
        "run", str(small), f"runs_dir={runs_dir / 'small'}", "--quiet", "--no-preflight"
    )
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
    cfg = _config(tmp_path, project_image.tag, resources={"gpus_per_node": 1, "procs_per_node": 1})
    # Past the preflight (which refuses GPUs here up front), as when the engine changed since.
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--no-preflight")
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("launcher: error: GPUs were asked for") and "Traceback" not in out.stderr
    record = runs.read_record(_only_run(runs_dir))
    assert record["state"] == "FAILED"
    # No container of this run's (other tests' containers may come and go meanwhile).
    assert not docker_client.containers.list(
        all=True, filters={"label": f"{LABEL}={record['run_id']}"}
    )


def test_cancel_stops_the_container(project_image, docker_client, runs_dir, tmp_path):
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


def _ours(client, run_id: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL}={run_id}"})


@pytest.mark.parametrize(
    ("image", "said"),
    [
        ("launcher-nope:missing", "image launcher-nope:missing not found"),
        ("Bad Image!!", "docker refused the container: docker: invalid reference format"),
    ],
)
def test_refused_container_ends_failed_with_the_reason(
    docker_client, runs_dir, tmp_path, image, said
):
    cfg = _config(tmp_path, image)
    # Past the preflight (which refuses both up front), as when the image went away since.
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--no-preflight")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"launcher: error: {said}")
    run_dir = _only_run(runs_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and record["error"].startswith(said)
    assert not _ours(docker_client, record["run_id"])
    status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
    assert json.loads(status.stdout)[0]["error"] == record["error"]  # not "ended without"


def _abandoned(tmp_path: Path, runs_dir: Path, image: str, *, create: bool) -> Path:
    """A real launcher process that recorded the run (and created its container) and died
    before starting it: what a kill -9 at that moment leaves."""
    code = (
        "import sys\n"
        "from launcher import config, runs\n"
        "from launcher.backends.docker import BACKEND, _create\n"
        "from launcher.backends.local.supervisor import prepare_run_dir\n"
        "from launcher.image import connect\n"
        "loaded = config.load(sys.argv[1], [f'runs_dir={sys.argv[2]}'])\n"
        "run_id = runs.new_run_id()\n"
        "run_dir = runs.run_dir_for(sys.argv[2], loaded.spec.name, run_id)\n"
        "plan = BACKEND.plan(loaded.spec, run_id=run_id, run_dir=run_dir, config_file=None)\n"
        "prepare_run_dir(plan, backend='docker')\n"
        "if sys.argv[3] == 'create':\n"
        "    c = _create(connect(), plan.payload['container'], lifeline=True)\n"
        "    runs.update_record(run_dir, backend_info={'container_id': c.id})\n"
        "print(run_dir)\n"
    )
    cfg = _config(tmp_path, image, entrypoint={"script": "tests/jobs/sleeper.py"})
    out = subprocess.run(
        [sys.executable, "-c", code, str(cfg), str(runs_dir), "create" if create else "-"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def test_abandoned_submissions_end_and_leave_no_container(
    project_image, docker_client, runs_dir, tmp_path
):
    created = _abandoned(tmp_path, runs_dir / "a", project_image.tag, create=True)
    run_id = runs.read_record(created)["run_id"]
    assert [c.status for c in _ours(docker_client, run_id)] == ["created"]
    status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir / 'a'}")
    record = json.loads(status.stdout)[0]
    assert record["state"] == "FAILED"
    assert record["error"] == "the launcher died before it started the container"
    assert not _ours(docker_client, run_id)

    nothing = _abandoned(tmp_path, runs_dir / "b", project_image.tag, create=False)
    status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir / 'b'}")
    record = json.loads(status.stdout)[0]
    assert record["state"] == "FAILED"
    assert record["error"] == "the launcher died before it created the container"

    pending = _abandoned(tmp_path, runs_dir / "c", project_image.tag, create=False)
    out = launcher_cmd("cancel", pending.name, f"--runs-dir={runs_dir / 'c'}")
    assert out.returncode == 0, out.stderr
    record = runs.read_record(pending)
    assert record["state"] == "CANCELLED"
    assert record["error"] == "cancelled before its container started"
    assert nothing.is_dir()


def _gone(client, container_id: str) -> bool:
    import docker

    try:
        client.containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


def test_kill_9_of_a_foreground_run_takes_its_container_along(
    project_image, docker_client, runs_dir, tmp_path
):
    cfg = _config(tmp_path, project_image.tag, entrypoint={"script": "tests/jobs/sleeper.py"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_dir = _wait(lambda: list(runs.iter_run_dirs(runs_dir)), 60)[0]
        _wait(lambda: (run_dir / "pid-rank1").exists(), 120)
        container_id = runs.read_record(run_dir)["backend_info"]["container_id"]
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup code of ours runs
        proc.wait()
    start = time.monotonic()
    _wait(lambda: _gone(docker_client, container_id), 60)
    elapsed = time.monotonic() - start
    print(f"container gone {elapsed:.2f}s after kill -9 of the foreground launcher")
    assert elapsed < 30
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED"
    assert "the launcher that ran this in the foreground went away" in record["error"]


def test_time_limit_and_a_stopped_rank_in_a_container(
    project_image, docker_client, runs_dir, tmp_path
):
    """At the time limit every rank gets the stop signal first, a stopped one too (with
    SIGCONT): the plain script saves its checkpoint, then the run ends FAILED."""
    cfg = _config(
        tmp_path,
        project_image.tag,
        entrypoint={"script": SAVER},
        resources={"procs_per_node": 2, "time_min": 1},
        local={"stop_grace_s": 20},
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = _wait(lambda: list(runs.iter_run_dirs(runs_dir)), 60)[0]
    _wait(lambda: (run_dir / "ready-rank0").exists(), 120)
    pid = int((run_dir / "ready-rank0").read_text())  # in the container's PID namespace
    container = docker_client.containers.get(
        runs.read_record(run_dir)["backend_info"]["container_id"]
    )
    assert container.exec_run(["sh", "-c", f"kill -STOP {pid}"]).exit_code == 0
    out, err = proc.communicate(timeout=180)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, err
    assert 60 <= elapsed < 120, elapsed
    assert f"launcher: rank 0 (pid {pid}) is stopped by a signal (state T)" in out + err
    assert "time limit of 1 min reached" in out + err
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED"
    assert record["error"].startswith(
        "time limit of 1 min reached (resources.time_min); every rank got SIGTERM and 20 s to save"
    )
    assert "rank 0" in record["error"] and "stopped by a signal" in record["error"]
    _saved(run_dir, "SIGTERM")
    assert _gone(docker_client, container.id)


# --- your own script, unchanged (issue 12) -------------------------------------------------

SAVER = "tests/jobs/save_on_stop.py"


def _saved(run_dir: Path, signame: str) -> None:
    """The checkpoint the plain script wrote on its stop signal: loadable, from that signal."""
    import torch

    path = run_dir / "checkpoints" / "stopped.pt"
    assert path.is_file(), sorted(p.name for p in run_dir.rglob("*"))
    state = torch.load(path)
    assert state["signal"] == signame and state["step"] >= 1
    assert set(state["model"]) == {"weight", "bias"} and state["optimizer"]["param_groups"]
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: {signame} at step {state['step']}; saved" in log, log


PLAIN_ARGS = ["--steps", "1000000", "--step-s", "0.05"]


def _start_plain(project_image, runs_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """examples/plain_train.py (saves on SIGTERM) under a foreground `launcher run` that
    leads its own process group, as a terminal starts it; returns once training started."""
    cfg = _config(
        tmp_path,
        project_image.tag,
        entrypoint={"script": "examples/plain_train.py", "args": PLAIN_ARGS},
        local={"stop_grace_s": 20},
    )
    proc = launcher_popen("run", str(cfg), f"runs_dir={runs_dir}")
    try:
        run_dir = _wait(lambda: list(runs.iter_run_dirs(runs_dir)), 60)[0]
        progress = run_dir / "progress.jsonl"
        _wait(lambda: progress.is_file() and "start" in progress.read_text(), 120)
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(proc.communicate()[0]) from None
    return proc, run_dir


def _plain_saved(run_dir: Path) -> None:
    """examples/plain_train.py's checkpoint, written through the mount: loadable, at the stop."""
    import torch

    state = torch.load(run_dir / "plain-ckpt.pt")
    assert state["step"] >= 1 and set(state["model"]) == {"weight", "bias"}
    assert state["opt"]["param_groups"]
    events = [json.loads(line)["event"] for line in (run_dir / "progress.jsonl").open()]
    assert events == ["start", "stop"]
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: saved at step {state['step']}" in log, log


@pytest.mark.parametrize("how", ["launcher cancel", "Ctrl-C"])
def test_plain_example_saves_in_a_container_and_the_run_is_cancelled(
    project_image, docker_client, runs_dir, tmp_path, how
):
    proc, run_dir = _start_plain(project_image, runs_dir, tmp_path)
    container_id = runs.read_record(run_dir)["backend_info"]["container_id"]
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    else:
        cancel = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
        assert cancel.returncode == 0, cancel.stderr
    out = proc.communicate(timeout=90)[0]
    assert proc.returncode == 130, out
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED"
    assert record["error"] == ("stopped by SIGINT" if how == "Ctrl-C" else "stopped by SIGTERM")
    assert record["exit_codes"] == {"0": 0, "1": 0}  # both saved and exited by themselves
    assert "get SIGTERM to save and exit, SIGKILL after 20 s" in out
    _plain_saved(run_dir)
    _wait(lambda: _gone(docker_client, container_id), 30)


def test_job_interpreter_without_launcher_in_a_container(project_image, runs_dir, tmp_path):
    """The image's system python (/usr/bin/python3) has no launcher (only /opt/venv does):
    the supervisor runs with the image's launcher python, the ranks with this one."""
    cfg = _config(
        tmp_path,
        project_image.tag,
        entrypoint={"script": "tests/jobs/no_launcher.py", "python": "/usr/bin/python3"},
    )
    plan = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--dry-run")
    assert "command:   python -m launcher.backends.local" in plan.stdout, plan.stdout
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == 0, out.stderr + out.stdout
    run_dir = _only_run(runs_dir)
    assert runs.read_record(run_dir)["state"] == "COMPLETED"
    for rank in (0, 1):
        seen = json.loads((run_dir / f"no-launcher-rank{rank}.json").read_text())
        assert seen == {"executable": "/usr/bin/python3", "launcher": None}


def test_rank_that_cannot_start_in_a_container_is_named_with_its_log(
    project_image, runs_dir, tmp_path
):
    cfg = _config(
        tmp_path,
        project_image.tag,
        entrypoint={"script": SAVER, "python": "/opt/nowhere/python"},
    )
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == 1
    run_dir = _only_run(runs_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and record["failed_rank"] == 0
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert "cannot start rank 0: No such file or directory: /opt/nowhere/python" in status.stdout
    assert "--- last lines of rank 0" in status.stdout
    assert "launcher guard: cannot start the rank: No such file or directory" in status.stdout


def _wait(check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s")
