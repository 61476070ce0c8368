"""Hardening of the local backend, for real: records are checked against the processes they
name before anything is signalled; nothing a rank started outlives a SIGKILLed supervisor;
a refused or abandoned submission ends with a reason; the final state comes from the ranks'
exits; time_min is enforced and a stopped rank is reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import runs
from tests.conftest import JOBS, ROOT, launcher_cmd


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _wait_for(check, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _only_run(runs_dir: Path) -> Path:
    return _wait_for(lambda: list(runs.iter_run_dirs(runs_dir)), 60, "the run dir")[0]


def _launch(runs_dir: Path, cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _config(
    write_config, script: str, *args: str, procs: int = 2, time_min: int = 5, grace: float = 2
) -> Path:
    return write_config(
        f"name: hardening\nworkdir: {ROOT}\n"
        f"entrypoint: {{script: {JOBS / script}, args: {json.dumps(list(args))}}}\n"
        f"resources: {{procs_per_node: {procs}, time_min: {time_min}}}\n"
        f"local: {{stop_grace_s: {grace}}}\n"
    )


def _sleeper() -> subprocess.Popen:
    """An unrelated process that leads its own group, as a process reusing a pid would."""
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


# --- 7: nothing a rank started outlives a SIGKILLed supervisor ---------------------------


@pytest.mark.parametrize("mode", ["foreground", "detached"])
def test_sigkilled_supervisor_leaves_no_grandchild(runs_dir, write_config, mode):
    cfg = _config(write_config, "spawner.py")
    proc = _launch(runs_dir, cfg, *(["--detach"] if mode == "detached" else []))
    run_dir = _only_run(runs_dir)
    spawned = [
        json.loads(
            _wait_for(
                lambda r=r: (
                    (run_dir / f"spawned-rank{r}.json").is_file()
                    and (run_dir / f"spawned-rank{r}.json").read_text()
                ),
                60,
                f"rank {r}'s processes",
            )
        )
        for r in (0, 1)
    ]
    pids = [pid for ranks in spawned for pid in ranks.values()]
    assert all(_alive(p) for p in pids)
    supervisor = _wait_for(
        lambda: runs.read_record(run_dir)["backend_info"].get("supervisor_pid"), 30, "supervisor"
    )
    if mode == "foreground":
        assert supervisor == proc.pid
    os.kill(supervisor, signal.SIGKILL)
    proc.wait(timeout=30)
    start = time.monotonic()
    _wait_for(lambda: not any(_alive(p) for p in pids), 15, "every process of the run to end")
    elapsed = time.monotonic() - start
    print(f"{mode}: {len(pids)} processes gone {elapsed:.2f}s after SIGKILL of the supervisor")
    assert elapsed < 10  # grace 2 s
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "the supervisor is gone: sending SIGTERM to the rank" in log
    status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
    record = json.loads(status.stdout)[0]
    assert record["state"] == "FAILED"
    assert "its ranks were stopped with it" in record["error"]


def test_rank_that_exits_leaves_no_process_behind(runs_dir, write_config):
    cfg = _config(write_config, "spawner.py", "exit")
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == 0, out.stderr
    run_dir = _only_run(runs_dir)
    assert runs.read_record(run_dir)["state"] == "COMPLETED"
    for rank in (0, 1):
        pids = json.loads((run_dir / f"spawned-rank{rank}.json").read_text())
        assert not any(_alive(p) for p in pids.values()), pids
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "the rank exited; stopping 3 process(es) it left running" in log


def _spawned_run(runs_dir: Path, write_config) -> tuple[Path, list[int]]:
    """A detached run whose ranks each left three processes; returns their pids (no ranks)."""
    proc = _launch(runs_dir, _config(write_config, "spawner.py"), "--detach")
    assert proc.wait(timeout=60) == 0
    run_dir = _only_run(runs_dir)
    files = [run_dir / f"spawned-rank{r}.json" for r in (0, 1)]
    _wait_for(lambda: all(f.is_file() for f in files), 60, "the ranks' processes")
    _wait_for(lambda: runs.read_record(run_dir)["state"] == "RUNNING", 30, "RUNNING")
    spawned = [json.loads(f.read_text()) for f in files]
    return run_dir, [pid for s in spawned for key, pid in s.items() if key != "rank"]


def test_sigkilled_guard_fails_the_run_and_leaves_nothing(runs_dir, write_config):
    run_dir, left = _spawned_run(runs_dir, write_config)
    guard = runs.read_record(run_dir)["backend_info"]["guards"]["0"]["pid"]
    os.kill(guard, signal.SIGKILL)  # rank 0 dies by PDEATHSIG; its children come to the supervisor
    _wait_for(lambda: runs.read_record(run_dir)["state"] == "FAILED", 30, "FAILED")
    _wait_for(lambda: not any(_alive(p) for p in left), 10, "the leftovers to end")
    record = runs.read_record(run_dir)
    assert record["failed_rank"] == 0 and "rank 0 was killed by SIGKILL" in record["error"]


def test_cancel_ends_what_survived_a_sigkill_of_supervisor_and_guards(runs_dir, write_config):
    run_dir, left = _spawned_run(runs_dir, write_config)
    info = runs.read_record(run_dir)["backend_info"]
    watchers = [info["supervisor"]["pid"], *(g["pid"] for g in info["guards"].values())]
    for pid in watchers:  # stopped first, so none of them sees the others die
        os.kill(pid, signal.SIGSTOP)
    for pid in watchers:
        os.kill(pid, signal.SIGKILL)
    _wait_for(lambda: not any(_alive(p) for p in watchers), 10, "supervisor and guards to die")
    time.sleep(1)
    assert all(_alive(p) for p in left)  # orphans now: only the run's marker names them
    out = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert out.returncode == 0, out.stderr
    _wait_for(lambda: not any(_alive(p) for p in left), 10, "the orphans to end")
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED"
    assert f"killed {len(left)} leftover process(es) of the run" in record["error"]


# --- 5: cancel checks identities before any signal ---------------------------------------


def _dead_run(runs_dir: Path, write_config) -> Path:
    """A run whose supervisor was SIGKILLed: the record still says RUNNING."""
    proc = _launch(runs_dir, _config(write_config, "sleeper.py"), "--detach")
    assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    run_dir = _only_run(runs_dir)
    _wait_for(lambda: (run_dir / "pid-rank1").exists(), 60, "the ranks")
    _wait_for(lambda: runs.read_record(run_dir)["state"] == "RUNNING", 30, "RUNNING")
    info = runs.read_record(run_dir)["backend_info"]
    os.kill(info["supervisor_pid"], signal.SIGKILL)
    ranks = list(info["rank_pids"].values())
    _wait_for(lambda: not any(_alive(p) for p in ranks), 15, "the ranks to stop")
    assert runs.read_record(run_dir)["state"] == "RUNNING"
    return run_dir


def _reuse_pids(run_dir: Path, pid: int) -> None:
    """Every pid of the record now names `pid` (its start time is the old process's)."""
    record = runs.read_record(run_dir)
    info = record["backend_info"]
    info["supervisor_pid"] = pid
    for ident in [info.get("supervisor"), *(info.get("ranks") or {}).values()]:
        if ident:
            ident["pid"] = pid
    for ident in (info.get("guards") or {}).values():
        ident["pid"] = pid
    info["rank_pids"] = dict.fromkeys(info["rank_pids"], pid)
    runs.update_record(run_dir, backend_info=info)


def test_cancel_leaves_a_process_that_reused_a_recorded_pid_alive(runs_dir, write_config):
    run_dir = _dead_run(runs_dir, write_config)
    bystander = _sleeper()
    try:
        _reuse_pids(run_dir, bystander.pid)
        out = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
        assert out.returncode == 0, out.stderr
        time.sleep(0.5)
        assert bystander.poll() is None, "cancel signalled a process that is not the run's"
        assert f"pid {bystander.pid} now belongs to another process" in out.stderr
        assert "rank 0:" in out.stderr and "supervisor:" in out.stderr
        assert "left alone" in out.stderr
        record = runs.read_record(run_dir)
        assert record["state"] == "CANCELLED"
        assert "now belongs to another process" in record["error"]
    finally:
        bystander.kill()
        bystander.wait()


def test_status_does_not_take_a_reused_supervisor_pid_for_the_supervisor(runs_dir, write_config):
    run_dir = _dead_run(runs_dir, write_config)
    bystander = _sleeper()
    try:
        _reuse_pids(run_dir, bystander.pid)
        status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
        record = json.loads(status.stdout)[0]
        assert record["state"] == "FAILED", record
        assert "the supervisor process died" in record["error"]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_record_without_identities_is_never_signalled(runs_dir, write_config):
    """A record from before identities (bare pids) cannot be checked: nothing is signalled."""
    run_dir = _dead_run(runs_dir, write_config)
    bystander = _sleeper()
    try:
        info = runs.read_record(run_dir)["backend_info"]
        legacy = {
            "supervisor_pid": 999999,
            "rank_pids": dict.fromkeys(info["rank_pids"], bystander.pid),
        }
        runs.update_record(run_dir, backend_info=legacy)
        out = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
        assert out.returncode == 0, out.stderr
        time.sleep(0.5)
        assert bystander.poll() is None
        assert "no process identity recorded" in out.stderr
    finally:
        bystander.kill()
        bystander.wait()


# --- 8: refused or abandoned submissions end with a reason --------------------------------


def test_nul_byte_in_an_argument_is_one_line_and_starts_nothing(runs_dir, write_config):
    cfg = write_config(
        f"name: nul\nworkdir: {ROOT}\nentrypoint: {{script: {JOBS / 'env_dump.py'}, "
        'args: ["a\\0b"]}\n'
    )
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "entrypoint.args[0]" in line and "NUL" in line
    assert not list(runs.iter_run_dirs(runs_dir))


def test_supervisor_refusing_a_plan_records_failed(runs_dir, write_config):
    """What exec refuses after the run was recorded (a NUL planted in plan.json, as no config
    can give one now) ends FAILED with the reason and one line, not a PENDING record."""
    from launcher.backends.local.backend import BACKEND
    from launcher.backends.local.supervisor import PLAN_FILE, prepare_run_dir

    plan = _plan(runs_dir, write_config)
    prepare_run_dir(plan)
    payload = json.loads((plan.run_dir / PLAN_FILE).read_text())
    payload["procs"][1]["argv"].append("a\0b")
    (plan.run_dir / PLAN_FILE).write_text(json.dumps(payload))
    out = subprocess.run(
        [sys.executable, "-m", "launcher.backends.local", str(plan.run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("launcher: error: cannot start rank 1: embedded null byte")
    record = runs.read_record(plan.run_dir)
    assert record["state"] == "FAILED" and record["failed_rank"] == 1
    assert "embedded null byte" in record["error"]
    assert BACKEND.log_files(plan.run_dir)  # the run is still a normal one to look at


def _plan(runs_dir: Path, write_config, script: str = "sleeper.py"):
    from launcher import config
    from launcher.backends.local.backend import BACKEND

    loaded = config.load(str(_config(write_config, script)), [f"runs_dir={runs_dir}"])
    run_id = runs.new_run_id()
    run_dir = runs.run_dir_for(runs_dir, loaded.spec.name, run_id)
    return BACKEND.plan(loaded.spec, run_id=run_id, run_dir=run_dir, config_file=loaded.file)


def test_missing_interpreter_fails_the_run_with_one_line(runs_dir, write_config):
    cfg = _config(write_config, "sleeper.py")
    # Past the preflight (which refuses it up front): a file can vanish between the two.
    out = launcher_cmd(
        "run",
        str(cfg),
        f"runs_dir={runs_dir}",
        "entrypoint.python=/nonexistent/py",
        "--no-preflight",
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "launcher: error: cannot start rank 0: No such file or directory: /nonexistent/py"
    )
    record = runs.read_record(_only_run(runs_dir))
    assert record["state"] == "FAILED" and record["failed_rank"] == 0


def _abandoned_submission(runs_dir: Path, write_config, *, hold: bool = False):
    """A real launcher process that wrote the PENDING record and then died (or, with
    `hold`, still runs): what a kill -9 between record and start leaves."""
    plan = _plan(runs_dir, write_config)
    code = (
        "import pickle, sys, time\n"
        "from launcher.backends.local.supervisor import prepare_run_dir\n"
        "prepare_run_dir(pickle.loads(sys.stdin.buffer.read()))\n"
        "print('written', flush=True)\n"
        f"time.sleep({300 if hold else 0})\n"
    )
    import pickle

    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=False,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(pickle.dumps(plan))
    proc.stdin.close()
    assert proc.stdout.readline() == b"written\n"
    if not hold:
        proc.wait(timeout=30)
    return plan.run_dir, proc


def test_cancel_of_a_pending_run_without_supervisor_ends_it(runs_dir, write_config):
    run_dir, _ = _abandoned_submission(runs_dir, write_config)
    assert runs.read_record(run_dir)["state"] == "PENDING"
    out = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
    assert out.returncode == 0, out.stderr
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED" and record["error"] == "cancelled before it started"


def test_status_ends_a_pending_run_only_once_its_launcher_is_gone(runs_dir, write_config):
    run_dir, proc = _abandoned_submission(runs_dir, write_config, hold=True)
    try:
        status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
        assert json.loads(status.stdout)[0]["state"] == "PENDING"  # still submitting
    finally:
        proc.kill()
        proc.wait()
    status = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
    record = json.loads(status.stdout)[0]
    assert record["state"] == "FAILED"
    assert record["error"] == "the launcher process died before the run started; nothing ran"


# --- 11: final state from the ranks' exits; time_min; stopped ranks -----------------------


def _sigterm_pending(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & (
            1 << (signal.SIGTERM - 1)
        ):
            return True
    return False


def test_cancel_after_every_rank_exited_0_is_completed(runs_dir, write_config):
    proc = _launch(runs_dir, _config(write_config, "wait_for_go.py"), "--detach")
    assert proc.wait(timeout=60) == 0
    run_dir = _only_run(runs_dir)
    _wait_for(lambda: all((run_dir / f"ready-rank{r}").exists() for r in (0, 1)), 60, "ready")
    _wait_for(lambda: runs.read_record(run_dir)["state"] == "RUNNING", 30, "RUNNING")
    supervisor = runs.read_record(run_dir)["backend_info"]["supervisor_pid"]
    ranks = [int((run_dir / f"ready-rank{r}").read_text()) for r in (0, 1)]
    os.kill(supervisor, signal.SIGSTOP)
    try:
        (run_dir / "go").write_text("")
        # Every rank exited 0 while the supervisor could not notice.
        _wait_for(lambda: all(_state(p) in (None, "Z") for p in ranks), 30, "the ranks to exit")
        time.sleep(0.5)  # their guards exit too, and wait to be reaped
        cancel = subprocess.Popen(
            [sys.executable, "-m", "launcher", "cancel", run_dir.name, f"--runs-dir={runs_dir}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(lambda: _sigterm_pending(supervisor), 30, "cancel's SIGTERM")
    finally:
        os.kill(supervisor, signal.SIGCONT)
    out, err = cancel.communicate(timeout=60)
    record = runs.read_record(run_dir)
    assert record["state"] == "COMPLETED", record
    assert record["exit_codes"] == {"0": 0, "1": 0}
    assert cancel.returncode == 1
    assert "ended COMPLETED before the stop took effect" in err


def test_time_limit_stops_a_stopped_rank_and_says_so(runs_dir, write_config):
    """The stop signal comes first at the time limit, with SIGCONT to a stopped rank: the
    plain script (tests/jobs/save_on_stop.py) saves its checkpoint, then the run fails."""
    import torch

    cfg = _config(write_config, "save_on_stop.py", time_min=1, grace=20)
    plan = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--dry-run")
    assert "time limit: 1 min" in plan.stdout
    start = time.monotonic()
    proc = _launch(runs_dir, cfg, "--quiet")
    run_dir = _only_run(runs_dir)
    _wait_for(
        lambda: (run_dir / "ready-rank1").exists() and (run_dir / "ready-rank0").exists(),
        60,
        "ranks",
    )
    pids = [int((run_dir / f"ready-rank{r}").read_text()) for r in (0, 1)]
    os.kill(pids[0], signal.SIGSTOP)
    _wait_for(lambda: runs.read_record(run_dir).get("warning"), 10, "the stopped-rank note")
    assert (
        f"rank 0 (pid {pids[0]}) was stopped by a signal (state T)"
        in (runs.read_record(run_dir)["warning"])
    )
    _, err = proc.communicate(timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert 60 <= elapsed < 90, elapsed
    assert f"launcher: rank 0 (pid {pids[0]}) is stopped by a signal (state T)" in err
    assert "launcher: run FAILED: time limit of 1 min reached" in err
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED"
    assert record["error"].startswith(
        "time limit of 1 min reached (resources.time_min); every rank got SIGTERM and 20 s"
    )
    assert "rank 0" in record["error"] and "stopped by a signal" in record["error"]
    assert not any(_alive(p) for p in pids)
    saved = torch.load(run_dir / "checkpoints" / "stopped.pt")
    assert saved["signal"] == "SIGTERM" and saved["step"] >= 1
    assert record["exit_codes"] == {"0": 0, "1": 0}  # both saved and exited by themselves
