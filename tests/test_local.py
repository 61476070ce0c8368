"""The local backend for real: 2 processes, gloo, real torch, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher import runs
from tests.conftest import JOBS, ROOT, launcher_cmd


def _only_run(runs_dir: Path) -> Path:
    found = list(runs.iter_run_dirs(runs_dir))
    assert len(found) == 1, found
    return found[0]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_quickstart_two_ranks_end_identical(runs_dir):
    proc = launcher_cmd("run", "configs/quickstart.yaml", f"runs_dir={runs_dir}")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    run_dir = _only_run(runs_dir)
    record = runs.read_record(run_dir)
    assert record["state"] == "COMPLETED"
    assert record["exit_codes"] == {"0": 0, "1": 0}
    params = [json.loads((run_dir / f"params-rank{r}.json").read_text()) for r in (0, 1)]
    # Each rank saw different data; identical parameters prove gradients were all-reduced.
    assert params[0]["sha256"] == params[1]["sha256"]
    assert params[0]["final_loss"] != params[1]["final_loss"]
    assert params[0]["world_size"] == 2
    assert (run_dir / "checkpoints" / "final.pt").is_file()
    assert "[rank 1] rank 1/2 done" in proc.stdout
    for rank in (0, 1):
        assert "done: params sha256" in (run_dir / "logs" / f"rank{rank}.log").read_text()
    assert (run_dir / "config.yaml").is_file()


def test_script_entrypoint_gets_torchrun_env(runs_dir, write_config):
    cfg = write_config(
        f"""
name: envcheck
workdir: {ROOT}
entrypoint: {{script: tests/jobs/env_dump.py, args: ["a b", "$(echo hi); rm -rf /"]}}
resources: {{procs_per_node: 3}}
env: {{CUSTOM: "it's \\"quoted\\""}}
"""
    )
    proc = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run_dir = _only_run(runs_dir)
    seen = [json.loads((run_dir / f"env-rank{r}.json").read_text()) for r in range(3)]
    assert [s["RANK"] for s in seen] == ["0", "1", "2"]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {s["WORLD_SIZE"] for s in seen} == {"3"}
    assert {s["LOCAL_WORLD_SIZE"] for s in seen} == {"3"}
    assert {s["MASTER_ADDR"] for s in seen} == {"127.0.0.1"}
    assert len({s["MASTER_PORT"] for s in seen}) == 1 and seen[0]["MASTER_PORT"].isdigit()
    assert seen[0]["LAUNCHER_NUM_WORKERS"] is not None
    # Arguments arrive verbatim: nothing went through a shell.
    assert seen[0]["argv"] == ["a b", "$(echo hi); rm -rf /"]
    assert seen[0]["CUSTOM"] == 'it\'s "quoted"'


def test_callable_entrypoint_joins_the_group(runs_dir, write_config):
    cfg = write_config(
        f"""
name: callable-job
workdir: {ROOT}
entrypoint: {{callable: "tests.jobs.callables:ddp_sum"}}
resources: {{procs_per_node: 2}}
"""
    )
    proc = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run_dir = _only_run(runs_dir)
    for rank in (0, 1):
        out = json.loads((run_dir / f"callable-rank{rank}.json").read_text())
        assert out == {"sum": 3.0, "name": "callable-job", "world": 2}


def test_crashing_rank_fails_the_run_fast_and_is_named(runs_dir, write_config):
    cfg = write_config(
        f"name: crash\nworkdir: {ROOT}\nentrypoint: {{script: tests/jobs/crash.py}}\n"
        "resources: {procs_per_node: 2}\nlocal: {stop_grace_s: 2}\n"
    )
    start = time.monotonic()
    proc = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert elapsed < 20, f"the healthy rank (sleeping 120 s) must be stopped, took {elapsed:.1f}s"
    assert "rank 1 exited with code 3" in proc.stderr
    assert "simulated CUDA error in rank 1" in proc.stderr  # the tail of its log
    record = runs.read_record(_only_run(runs_dir))
    assert record["state"] == "FAILED" and record["failed_rank"] == 1
    assert record["exit_codes"]["1"] == 3
    status = launcher_cmd("status", "crash", f"--runs-dir={runs_dir}")
    assert "FAILED" in status.stdout and "simulated CUDA error" in status.stdout


def _start_sleepers(runs_dir: Path, cfg: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = list(runs.iter_run_dirs(runs_dir))
        if found and all((found[0] / f"pid-rank{r}").is_file() for r in (0, 1)):
            return proc, found[0]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("sleepers did not start")


def _sleeper_config(write_config) -> Path:
    return write_config(
        f"name: sleepy\nworkdir: {ROOT}\nentrypoint: {{script: {JOBS / 'sleeper.py'}}}\n"
        "resources: {procs_per_node: 2}\nlocal: {stop_grace_s: 2}\n"
    )


def test_cancel_stops_every_rank(runs_dir, write_config):
    proc, run_dir = _start_sleepers(runs_dir, _sleeper_config(write_config))
    pids = [int((run_dir / f"pid-rank{r}").read_text()) for r in (0, 1)]
    cancel = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert cancel.returncode == 0, cancel.stderr
    proc.wait(timeout=30)
    assert runs.read_record(run_dir)["state"] == "CANCELLED"
    assert not any(_alive(p) for p in pids)
    again = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert again.returncode == 1 and "already ended" in again.stderr


def test_ctrl_c_leaves_no_orphans(runs_dir, write_config):
    proc, run_dir = _start_sleepers(runs_dir, _sleeper_config(write_config))
    pids = [int((run_dir / f"pid-rank{r}").read_text()) for r in (0, 1)]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert runs.read_record(run_dir)["state"] == "CANCELLED"
    assert not any(_alive(p) for p in pids)


def test_killed_supervisor_takes_its_ranks_along(runs_dir, write_config):
    proc, run_dir = _start_sleepers(runs_dir, _sleeper_config(write_config))
    pids = [int((run_dir / f"pid-rank{r}").read_text()) for r in (0, 1)]
    proc.kill()  # SIGKILL: no handler runs; PDEATHSIG must still stop the ranks
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
    assert json.loads(status.stdout)[0]["state"] == "FAILED"


def test_detach_then_logs_follow(runs_dir):
    proc = launcher_cmd("run", "configs/quickstart.yaml", f"runs_dir={runs_dir}", "--detach")
    assert proc.returncode == 0, proc.stderr
    run_dir = _only_run(runs_dir)
    logs = launcher_cmd(
        "logs", run_dir.name, "--rank", "1", "--follow", f"--runs-dir={runs_dir}", timeout=120
    )
    assert logs.returncode == 0
    assert "rank 1/2 done" in logs.stdout
    assert runs.read_record(run_dir)["state"] == "COMPLETED"


def test_dry_run_starts_nothing_and_imports_no_heavy_module(runs_dir):
    code = (
        "import sys, io, contextlib\n"
        "from launcher.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        f"    rc = main(['run', 'configs/quickstart.yaml', 'runs_dir={runs_dir}', '--dry-run'])\n"
        "heavy = [m for m in ('torch', 'docker', 'submitit') if m in sys.modules]\n"
        "print(rc, heavy, 'examples/quickstart_ddp.py' in buf.getvalue())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ},
        check=True,
    )
    assert out.stdout.strip() == "0 [] True"
    assert not any(runs_dir.iterdir())
    helped = launcher_cmd("--help")
    assert helped.returncode == 0 and "run" in helped.stdout
