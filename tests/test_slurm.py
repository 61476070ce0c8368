"""The Slurm backend against the real local cluster (slurm/start.sh): 2 nodes, accounting."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from launcher import config, runs
from launcher.backends.slurm.backend import BACKEND, SlurmBackend
from launcher.errors import BackendError
from tests.conftest import ROOT, launcher_cmd
from tests.slurm_helpers import only_run, require_cluster, wait_file, wait_state

# One xdist worker runs every slurm test, one after another (shared cluster).
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]


@pytest.fixture(autouse=True)
def _cluster():
    require_cluster()


def _config(tmp_path: Path, **sections) -> Path:
    data = {
        "name": "t",
        "backend": "slurm",
        "workdir": str(ROOT),
        "resources": {
            "nodes": 1,
            "procs_per_node": 1,
            "cpus_per_proc": 1,
            "mem_gb": 0.5,
            "time_min": 5,
        },
        "slurm": {"partition": "debug", "signal_delay_s": 30},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _submit(cfg: Path | str, runs_dir: Path, *overrides: str) -> Path:
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", *overrides)
    assert out.returncode == 0, out.stderr
    assert "submitted Slurm job" in out.stdout
    return only_run(runs_dir)


@pytest.mark.parametrize(("nodes", "procs"), [(2, 1), (1, 2)])
def test_quickstart_on_slurm_ranks_end_identical(nodes, procs, runs_dir):
    run_dir = _submit(
        "configs/slurm-2nodes.yaml",
        runs_dir,
        f"resources.nodes={nodes}",
        f"resources.procs_per_node={procs}",
    )
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=240)
    assert record["state"] == "COMPLETED", record
    params = [json.loads((run_dir / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    assert params[0]["sha256"] == params[1]["sha256"]
    assert params[0]["world_size"] == 2
    assert "done: params sha256" in (run_dir / "logs" / "rank1.log").read_text()
    # What --dry-run printed is what submitit wrote and sbatch ran.
    job_id = record["backend_info"]["job_id"]
    submitted = (run_dir / "slurm" / f"{job_id}_submission.sh").read_text()
    assert submitted == (run_dir / "sbatch.sh").read_text()


def test_script_on_two_nodes_reads_ranks_and_keeps_slurm_vars(tmp_path, runs_dir):
    hostile = "a'b\"c $(touch /tmp/pwned-arg); touch /tmp/pwned-semi\ntouch /tmp/pwned-nl"
    cfg = _config(
        tmp_path,
        # The name goes on an #SBATCH line: a newline there is refused (test_security_slurm).
        name=f"env {hostile.splitlines()[0]}",
        entrypoint={"script": "tests/jobs/env_dump.py", "args": [hostile]},
        resources={"nodes": 2, "procs_per_node": 2},
        env={"CUSTOM": hostile},
    )
    run_dir = _submit(cfg, runs_dir)
    record = wait_state(run_dir, runs.FINAL_STATES)
    assert record["state"] == "COMPLETED", record
    seen = sorted(
        (json.loads((run_dir / f"env-rank{r}.json").read_text()) for r in range(4)),
        key=lambda s: int(s["RANK"]),
    )
    assert [s["RANK"] for s in seen] == ["0", "1", "2", "3"]
    assert [s["SLURM_PROCID"] for s in seen] == ["0", "1", "2", "3"]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "0", "1"]
    assert {s["WORLD_SIZE"] for s in seen} == {"4"}
    assert {s["LOCAL_WORLD_SIZE"] for s in seen} == {"2"}
    assert [s["SLURMD_NODENAME"] for s in seen] == ["node1", "node1", "node2", "node2"]
    assert {s["MASTER_ADDR"] for s in seen} == {"node1"}
    assert len({s["MASTER_PORT"] for s in seen}) == 1
    assert {s["CUSTOM"] for s in seen} == {hostile}
    assert seen[0]["argv"] == [hostile]
    assert not list(Path("/tmp").glob("pwned-*"))


def test_callable_on_two_nodes(tmp_path, runs_dir):
    cfg = _config(
        tmp_path, entrypoint={"callable": "tests.jobs.callables:ddp_sum"}, resources={"nodes": 2}
    )
    run_dir = _submit(cfg, runs_dir)
    assert wait_state(run_dir, runs.FINAL_STATES)["state"] == "COMPLETED"
    for rank in (0, 1):
        out = json.loads((run_dir / f"callable-rank{rank}.json").read_text())
        assert out == {"sum": 3.0, "name": "t", "world": 2}


def _progress(min_step: int):
    return lambda p: json.loads(p.read_text() or "{}").get("step", 0) >= min_step


def test_preempted_trainer_resumes_from_its_checkpoint(tmp_path, runs_dir):
    """The built-in trainer on 2 nodes, preempted by a job in a higher-priority partition."""
    STEPS = 4000  # noqa: N806 - long enough (tens of seconds) to be preempted mid-run
    cfg = _config(
        tmp_path,
        resources={"nodes": 2},
        train={
            "model": "mlp",
            "steps": STEPS,
            "global_batch_size": 8,
            "checkpoint_every": 50,
            "log_every": 100,
        },
        loader={"num_workers": 0},
        slurm={"exclusive": True, "max_requeue": 3},
    )
    run_dir = _submit(cfg, runs_dir)
    wait_file("checkpoints/step-*.pt", run_dir, timeout=180)
    subprocess.run(
        ["sbatch", "-p", "high", "-N1", "--exclusive", "-o", "/dev/null", "--wrap", "sleep 2"],
        check=True,
        capture_output=True,
    )
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=300)
    assert record["state"] == "COMPLETED", record
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed and resumed[0]["step"] > 0, "requeued, it must resume from its checkpoint"
    assert [e for e in events if e.get("event") == "end"][-1]["step"] == STEPS
    # At preemption Slurm requeues the job itself (once); the host does not requeue again.
    first = record["attempts"][0]
    assert len(record["attempts"]) >= 2
    assert first.get("requeued") is True or first.get("by") == "slurm", first


def test_time_limit_requeues_until_done(tmp_path, runs_dir):
    # 1 minute limit, USR2 30 s before it: ~30 s of work per attempt for 35 s of steps.
    cfg = _config(
        tmp_path,
        entrypoint={"script": "tests/jobs/resumable.py", "args": ["70", "0.5"]},
        resources={"time_min": 1},
        slurm={"max_requeue": 5},
    )
    run_dir = _submit(cfg, runs_dir)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=300)
    assert record["state"] == "COMPLETED", record
    seen = [json.loads(line) for line in (run_dir / "attempts-seen.jsonl").read_text().splitlines()]
    assert len(seen) >= 2 and seen[-1]["resumed_at"] > 0, seen
    assert json.loads((run_dir / "done-rank0.json").read_text())["step"] == 70


def test_scancel_from_outside_is_cancelled_within_a_minute(tmp_path, runs_dir):
    cfg = _config(tmp_path, entrypoint={"script": "tests/jobs/sleeper.py"})
    run_dir = _submit(cfg, runs_dir)
    wait_file("pid-rank0", run_dir, timeout=120)
    job_id = runs.read_record(run_dir)["backend_info"]["job_id"]
    subprocess.run(["scancel", job_id], check=True)
    start = time.monotonic()
    record = wait_state(run_dir, ("CANCELLED", "FAILED", "COMPLETED"), timeout=60)
    assert record["state"] == "CANCELLED" and time.monotonic() - start < 60
    out = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert "CANCELLED" in out.stdout


def test_failing_rank_is_named_and_launcher_cancel_works(tmp_path, runs_dir):
    cfg = _config(tmp_path, entrypoint={"script": "tests/jobs/crash.py"}, resources={"nodes": 2})
    run_dir = _submit(cfg, runs_dir)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=180)
    assert record["state"] == "FAILED" and record["failed_rank"] == 1, record
    assert "rank 1 on node2 exited with code 3" in record["error"]
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert "simulated CUDA error in rank 1" in status.stdout
    logs = launcher_cmd("logs", run_dir.name, "--rank", "1", f"--runs-dir={runs_dir}")
    assert "simulated CUDA error" in logs.stdout

    sleeper = _config(tmp_path, name="sleepy", entrypoint={"script": "tests/jobs/sleeper.py"})
    out = launcher_cmd("run", str(sleeper), f"runs_dir={runs_dir}")
    assert out.returncode == 0
    sleepy = next(d for d in runs.iter_run_dirs(runs_dir) if d != run_dir)
    assert launcher_cmd("cancel", sleepy.name, f"--runs-dir={runs_dir}").returncode == 0
    assert wait_state(sleepy, runs.FINAL_STATES, timeout=60)["state"] == "CANCELLED"


def test_tasks_that_never_start_make_the_run_failed_not_completed(tmp_path, runs_dir):
    """srun exits 0 when it cannot start the tasks (here: the run folder's logs/ is gone on
    the nodes, as when the run folder is not shared); the run must not be COMPLETED."""
    cfg = _config(
        tmp_path,
        entrypoint={"script": "tests/jobs/env_dump.py"},
        resources={"nodes": 2},
        slurm={"extra": {"begin": "now+8"}},  # time to take the folder away before it starts
    )
    run_dir = _submit(cfg, runs_dir)
    shutil.rmtree(run_dir / "logs")
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=180)
    assert record["state"] == "FAILED", record
    assert record["error"].startswith(
        "rank(s) 0,1 never reported an exit: the tasks did not start "
        "(is the run folder visible on every node?)"
    ), record["error"]
    events = [json.loads(x) for x in (run_dir / "attempts.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["phase"] == "end")
    assert end["exit_code"] == 0 and end["missing"] == [0, 1]  # srun itself said 0
    assert not list(run_dir.glob("env-rank*.json"))


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-j", job_id, "-o", "State"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip()


def test_cancel_of_a_finished_run_says_so_and_keeps_it_completed(tmp_path, runs_dir):
    cfg = _config(tmp_path, entrypoint={"script": "tests/jobs/env_dump.py"})
    run_dir = _submit(cfg, runs_dir)
    job_id = runs.read_record(run_dir)["backend_info"]["job_id"]
    deadline = time.monotonic() + 120
    while _sacct_state(job_id) != "COMPLETED":  # Slurm knows; the record was never refreshed
        assert time.monotonic() < deadline, _sacct_state(job_id)
        time.sleep(1)
    assert runs.read_record(run_dir)["state"] == "PENDING"
    out = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert out.returncode == 1, out
    assert f"run {run_dir.name} already ended COMPLETED; nothing to cancel" in out.stderr
    assert runs.read_record(run_dir)["state"] == "COMPLETED"
    assert _sacct_state(job_id) == "COMPLETED"


def test_refused_submission_ends_failed_with_the_reason(tmp_path, runs_dir):
    cfg = _config(tmp_path, entrypoint={"script": "tests/jobs/env_dump.py"})
    # Past the preflight (which refuses this partition before anything is written): the
    # partition sbatch itself refuses, as when it went away between the check and the submit.
    out = launcher_cmd(
        "run", "--no-preflight", str(cfg), f"runs_dir={runs_dir}", "slurm.partition=nosuch"
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("launcher: error: sbatch refused the job: ") and "partition" in last
    run_dir = only_run(runs_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and record["ended_at"]
    assert record["error"] == last.removeprefix("launcher: error: ")
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert status.returncode == 0 and "FAILED" in status.stdout and "partition" in status.stdout
    cancel = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert cancel.returncode == 1 and "already ended FAILED: sbatch refused" in cancel.stderr


@pytest.fixture
def silent_slurm(tmp_path, monkeypatch):
    """The real Slurm clients pointed at a controller and a slurmdbd that accept the
    connection and never answer (a listening socket nobody reads)."""
    shown = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, timeout=30
    ).stdout
    conf = next(x for x in shown.splitlines() if x.startswith("SLURM_CONF")).split("=")[1]
    lines = Path(conf.strip()).read_text().splitlines()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    for key in ("SlurmctldPort", "AccountingStoragePort"):
        lines = [x for x in lines if not x.startswith(f"{key}=")] + [f"{key}={port}"]
    silent = tmp_path / "slurm.conf"
    silent.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SLURM_CONF", str(silent))
    yield
    sock.close()


def test_a_silent_controller_is_one_error_within_the_timeout(tmp_path, silent_slurm):
    """refresh, cancel and submit each end in one BackendError, no hang, no wrong state."""
    backend = SlurmBackend(timeout_s=3, sbatch_timeout_s=3, cancel_wait_s=0)
    spec = config.load(
        _config(tmp_path, entrypoint={"script": "tests/jobs/env_dump.py"}),
        [f"runs_dir={tmp_path / 'runs'}"],
    ).spec
    run_dir = tmp_path / "runs" / "t" / "R1"
    plan = BACKEND.plan(spec, run_id="R1", run_dir=run_dir, config_file="job.yaml")

    start = time.monotonic()
    with pytest.raises(BackendError, match="sbatch did not answer within 3 s"):
        backend.submit(plan)
    assert time.monotonic() - start < 15
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and "sbatch did not answer" in record["error"]

    runs.update_record(run_dir, state="RUNNING", error=None, backend_info={"job_id": "999999"})
    before = runs.read_record(run_dir)
    start = time.monotonic()
    with pytest.raises(BackendError, match="did not answer within 3 s"):
        backend.refresh([run_dir])
    assert time.monotonic() - start < 10
    with pytest.raises(BackendError, match="scancel 999999 did not answer within 3 s"):
        backend.cancel(run_dir)
    assert time.monotonic() - start < 25
    assert runs.read_record(run_dir) == before  # nothing recorded on a guess


def test_script_whose_interpreter_cannot_import_launcher_runs_on_slurm(tmp_path, runs_dir):
    """entrypoint.python without launcher: the rank wrapper runs with launcher's own
    interpreter, the script with the configured one (it needs only what it imports)."""
    python = "/usr/bin/python3"
    cfg = _config(
        tmp_path,
        entrypoint={"script": "tests/jobs/no_launcher.py", "python": python},
        resources={"nodes": 2},
    )
    run_dir = _submit(cfg, runs_dir)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=180)
    assert record["state"] == "COMPLETED", record
    for rank in (0, 1):
        seen = json.loads((run_dir / f"no-launcher-rank{rank}.json").read_text())
        assert seen == {"executable": python, "launcher": None}


def test_rank_that_dies_before_the_script_starts_is_named_with_its_log_tail(tmp_path, runs_dir):
    """The built-in trainer needs launcher in the job's interpreter: every rank dies at
    `python -m launcher.runtime`; the status names a rank, why, and shows its log."""
    cfg = _config(
        tmp_path,
        # Not the repository (python -m would find launcher in the current folder there).
        workdir=str(tmp_path),
        entrypoint={"python": "/usr/bin/python3"},
        resources={"nodes": 2},
    )
    run_dir = _submit(cfg, runs_dir)
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=180)
    assert record["state"] == "FAILED", record
    assert record["failed_rank"] in (0, 1), record
    assert "No module named 'launcher'" in record["error"], record["error"]
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert f"--- last lines of rank {record['failed_rank']}" in status.stdout, status.stdout
    assert "No module named 'launcher'" in status.stdout


def test_preemption_in_the_last_allowed_attempt_does_not_requeue(tmp_path, runs_dir):
    """slurm.max_requeue holds for Slurm's own requeues too: the last attempt is made
    non-requeueable, so a preemption ends it instead of starting attempt max_requeue + 2."""
    cfg = _config(
        tmp_path,
        entrypoint={
            "script": "examples/plain_train.py",
            "args": ["--steps", "400", "--step-s", "0.25"],
        },
        resources={"procs_per_node": 2},
        slurm={"exclusive": True, "max_requeue": 0},
    )
    run_dir = _submit(cfg, runs_dir)
    wait_file("progress.jsonl", run_dir, timeout=900)  # behind other jobs: a whole node
    job_id = runs.read_record(run_dir)["backend_info"]["job_id"]
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    ).stdout
    assert " Requeue=0 " in f" {shown} ", shown
    node = dict(f.partition("=")[::2] for f in shown.split())["NodeList"]
    subprocess.run(
        ["sbatch", "-p", "high", "-w", node, "-N1", "-n1", "-o", "/dev/null", "--wrap", "sleep 1"],
        check=True,
        capture_output=True,
    )
    record = wait_state(run_dir, runs.FINAL_STATES, timeout=240)
    assert record["state"] in ("CANCELLED", "FAILED"), record
    assert len(record["attempts"]) == 1 and record["attempts"][0]["reason"] == "preempted"
    assert "preempted in attempt 1, the last one slurm.max_requeue allows" in record["error"]
