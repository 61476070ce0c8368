"""Failure causes reproduced for real: each failure is made by a real job on the local
backend (real processes, real torch with gloo), and its run folder is read by
launcher.causes exactly as `launcher status` does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from launcher import runs
from launcher.causes import ensure_cause

pytestmark = pytest.mark.timeout(300)

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


def run_job(
    tmp_path: Path, body: str, *, procs: int = 2, extra: str = "", time_min: int | None = None
) -> tuple[Path, runs.RunRecord]:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(body))
    # Indented as the line above it before dedent.
    limit = f"\n{' ' * 14}time_min: {time_min}" if time_min is not None else ""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            name: triage
            runs_dir: {tmp_path / "runs"}
            entrypoint:
              script: {script}
            resources:
              procs_per_node: {procs}{limit}
            local:
              stop_grace_s: 2
            """
        )
        + extra
    )
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(cfg), "--quiet"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert out.returncode != 0, out.stderr
    (run_dir,) = list((tmp_path / "runs" / "triage").iterdir())
    record = ensure_cause(run_dir, runs.read_record(run_dir))
    return run_dir, record


def test_an_exception_on_one_rank_is_the_cause_and_the_others_are_consequences(tmp_path):
    body = FAIL_ON_RANK_1.format(failure='raise ValueError("bad batch shape")')
    run_dir, record = run_job(tmp_path, body)
    cause = record["cause"]
    assert cause["kind"] == "python_exception"
    assert cause["rank"] == 1
    assert cause["detail"]["exception"] == "ValueError"
    assert cause["detail"]["where"] == f"{tmp_path / 'job.py'}:7"
    assert cause["consequences"] == [0]
    # Kept in the record: read again, not recomputed.
    assert runs.read_record(run_dir)["cause"] == cause
    status = subprocess.run(
        [sys.executable, "-m", "launcher", "status", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = status.stdout.splitlines()
    assert "cause:    python_exception: ValueError: bad batch shape" in status.stdout
    assert any(line.startswith("started:  rank 1") for line in lines)
    assert "then:     rank(s) 0 stopped or failed because of it" in lines
    hint = next(i for i, line in enumerate(lines) if line.startswith("hint:"))
    tail = next(i for i, line in enumerate(lines) if line.startswith("--- last lines of rank 1"))
    assert hint < tail  # the cause comes above the log tail
    as_json = subprocess.run(
        [sys.executable, "-m", "launcher", "status", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(as_json.stdout)[0]["cause"] == cause


def test_a_missing_module_is_named(tmp_path):
    body = FAIL_ON_RANK_1.format(failure="import no_such_module_for_launcher")
    _, record = run_job(tmp_path, body)
    cause = record["cause"]
    assert cause["kind"] == "module_not_found" and cause["rank"] == 1
    assert "no_such_module_for_launcher" in cause["summary"]


def test_a_segfault_is_a_native_crash(tmp_path):
    body = FAIL_ON_RANK_1.format(failure="import ctypes; ctypes.string_at(0)")
    _, record = run_job(tmp_path, body)
    assert record["cause"]["kind"] == "native_crash"
    assert record["cause"]["rank"] == 1


def test_a_gloo_timeout_names_the_rank_that_never_entered_the_collective(tmp_path):
    # The 3 s timeout is the collective's own group's: the default group keeps the rendezvous,
    # so a rank slow to start under load is not mistaken for the timeout under test.
    body = """
        import datetime, time
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
        quick = dist.new_group(timeout=datetime.timedelta(seconds=3))
        if dist.get_rank() == 1:
            time.sleep(60)  # never reaches the all_reduce
        dist.all_reduce(torch.ones(1), group=quick)
    """
    _, record = run_job(tmp_path, body)
    cause = record["cause"]
    assert cause["kind"] == "collective_timeout" and cause["rank"] == 0
    assert cause["detail"]["did_not_arrive"] == [1]
    assert "Timed out waiting 3000ms" in cause["detail"]["message"], cause


def test_a_missing_interpreter_means_the_job_never_started(tmp_path):
    (tmp_path / "job.py").write_text("print('never runs')\n")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            name: triage
            runs_dir: {tmp_path / "runs"}
            entrypoint:
              script: {tmp_path / "job.py"}
              python: /nonexistent/bin/python3
            """
        )
    )
    # Preflight would refuse this before any run folder exists: skip it to see the run's cause.
    argv = [sys.executable, "-m", "launcher", "run", str(cfg), "--quiet", "--no-preflight"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    (run_dir,) = list((tmp_path / "runs" / "triage").iterdir())
    record = ensure_cause(run_dir, runs.read_record(run_dir))
    assert record["cause"]["kind"] == "never_started"
    assert "/nonexistent/bin/python3" in record["cause"]["summary"]


def test_sweep_status_shows_each_failed_points_cause_and_a_count_by_cause(tmp_path):
    (tmp_path / "point.py").write_text(
        textwrap.dedent(
            """\
            import os
            x = os.environ["X"]
            if x == "1":
                raise ValueError("learning rate too high")
            if x == "2":
                import module_that_is_not_installed
            """
        )
    )
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            name: causes
            workdir: {tmp_path}
            runs_dir: {tmp_path / "runs"}
            entrypoint: {{script: point.py}}
            resources: {{procs_per_node: 1}}
            env: {{X: "0"}}
            sweep:
              grid: {{env.X: ["0", "1", "2", "3"]}}
              parallelism: 2
            """
        )
    )
    (tmp_path / "point.py").write_text(
        (tmp_path / "point.py").read_text() + 'if x == "3":\n    raise ValueError("again")\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "launcher", "sweep", str(cfg)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 1, run.stderr
    (sweep_dir,) = [p for p in (tmp_path / "runs" / "causes" / "sweeps").iterdir() if p.is_dir()]
    status = subprocess.run(
        [sys.executable, "-m", "launcher", "sweep", "status", str(sweep_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "failed points by cause: python_exception 2, module_not_found 1" in status.stdout
    assert "[python_exception] ValueError: learning rate too high" in status.stdout
    assert "[module_not_found] No module named 'module_that_is_not_installed'" in status.stdout


def test_the_time_limit_is_time_limit_not_the_ranks_it_stopped(tmp_path):
    body = """
        import time
        time.sleep(300)
    """
    # 1 min: the smallest limit resources.time_min takes.
    _, record = run_job(tmp_path, body, procs=1, time_min=1)
    cause = record["cause"]
    assert record["error"].startswith("time limit of 1 min reached"), record["error"]
    assert cause["kind"] == "time_limit", cause
    assert cause["rank"] is None and "resources.time_min" in cause["hint"]


def test_launcher_cancel_is_cancelled_not_the_ranks_it_stopped(tmp_path):
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            """\
            import os, time
            run_dir = os.environ["LAUNCHER_RUN_DIR"]
            open(os.path.join(run_dir, "up-rank" + os.environ["RANK"]), "w").close()
            time.sleep(300)
            """
        )
    )
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        textwrap.dedent(
            f"""\
            name: triage
            runs_dir: {tmp_path / "runs"}
            entrypoint:
              script: {tmp_path / "job.py"}
            resources:
              procs_per_node: 2
            local:
              stop_grace_s: 2
            """
        )
    )
    launcher = [sys.executable, "-m", "launcher"]
    out = subprocess.run(
        [*launcher, "run", str(cfg), "--detach"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    (run_dir,) = list((tmp_path / "runs" / "triage").iterdir())
    deadline = time.monotonic() + 60
    while not all((run_dir / f"up-rank{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, runs.read_record(run_dir)
        time.sleep(0.2)
    cancel = subprocess.run(
        [*launcher, "cancel", str(run_dir)], capture_output=True, text=True, timeout=60
    )
    assert cancel.returncode == 0, cancel.stderr
    deadline = time.monotonic() + 30
    while runs.read_record(run_dir)["state"] != "CANCELLED":  # the supervisor records the end
        assert time.monotonic() < deadline, runs.read_record(run_dir)
        time.sleep(0.2)
    record = ensure_cause(run_dir, runs.read_record(run_dir))
    cause = record["cause"]
    # `launcher cancel` sends the supervisor SIGTERM; it stops every rank and says so.
    assert (cause["kind"], cause["summary"]) == ("cancelled", "cancelled by SIGTERM"), record
    assert cause["rank"] is None and cause["consequences"] == []
