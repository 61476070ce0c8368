"""Your own script, unchanged, on the local backend: what it gets on `launcher cancel`,
Ctrl-C and the time limit (the job's stop signal, then SIGKILL after the grace), an
interpreter without launcher, and ranks that fail before or after their script ran.
Real processes, real signals, real torch (gloo)."""

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
from tests.conftest import ROOT, launcher_cmd, launcher_popen

SAVER = "tests/jobs/save_on_stop.py"


def _config(write_config, script: str, **extra: str) -> Path:
    lines = [
        "name: mine",
        f"workdir: {ROOT}",
        f"entrypoint: {{script: {script}}}",
        "resources: {procs_per_node: 2}",
        "local: {stop_grace_s: 20}",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return write_config("\n".join(lines) + "\n")


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _start(runs_dir: Path, cfg: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """`launcher run` in the foreground, as the leader of its own process group (what a
    terminal makes of a command), once every rank has trained a step."""
    proc = launcher_popen("run", str(cfg), f"runs_dir={runs_dir}", *extra)
    try:
        run_dir = _wait_for(lambda: list(runs.iter_run_dirs(runs_dir)), 60, "the run dir")[0]
        _wait_for(lambda: all((run_dir / f"ready-rank{r}").is_file() for r in (0, 1)), 120, "ranks")
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(proc.communicate()[0]) from None
    return proc, run_dir


def _saved(run_dir: Path, signame: str) -> dict:
    """The checkpoint the script wrote on its stop signal: there, loadable, from that signal."""
    import torch

    path = run_dir / "checkpoints" / "stopped.pt"
    assert path.is_file(), sorted(p.name for p in run_dir.rglob("*"))
    state = torch.load(path)
    assert state["signal"] == signame
    assert state["step"] >= 1
    assert set(state["model"]) == {"weight", "bias"}
    assert state["optimizer"]["param_groups"]
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: {signame} at step {state['step']}; saved" in log, log
    return state


# examples/plain_train.py: a plain DDP script that saves on SIGTERM, unchanged from torchrun.
PLAIN = "examples/plain_train.py"
PLAIN_ARGS = '["--steps", "1000000", "--step-s", "0.05"]'


def _plain_config(write_config) -> Path:
    return write_config(
        f"name: plain\nworkdir: {ROOT}\n"
        f"entrypoint: {{script: {PLAIN}, args: {PLAIN_ARGS}}}\n"
        "resources: {procs_per_node: 2}\nlocal: {stop_grace_s: 20}\n"
    )


def _start_plain(runs_dir: Path, cfg: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        run_dir = _wait_for(lambda: list(runs.iter_run_dirs(runs_dir)), 60, "the run dir")[0]
        progress = run_dir / "progress.jsonl"
        _wait_for(lambda: progress.is_file() and "start" in progress.read_text(), 120, "start")
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(proc.communicate()[0]) from None
    return proc, run_dir


def _plain_saved(run_dir: Path) -> None:
    """examples/plain_train.py's checkpoint: there, loadable, written at the stop."""
    import torch

    state = torch.load(run_dir / "plain-ckpt.pt")
    assert state["step"] >= 1 and set(state["model"]) == {"weight", "bias"}
    assert state["opt"]["param_groups"]
    events = [json.loads(line)["event"] for line in (run_dir / "progress.jsonl").open()]
    assert events == ["start", "stop"]
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert f"rank {rank}: saved at step {state['step']}" in log, log
        assert "got SIGTERM: sending SIGTERM to the rank" in log


@pytest.mark.parametrize("how", ["launcher cancel", "Ctrl-C"])
def test_plain_example_saves_its_checkpoint_and_the_run_is_cancelled(runs_dir, write_config, how):
    proc, run_dir = _start_plain(runs_dir, _plain_config(write_config))
    if how == "Ctrl-C":
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    else:
        cancel = launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}")
        assert cancel.returncode == 0, cancel.stderr
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130, out
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED"
    assert record["error"] == ("stopped by SIGINT" if how == "Ctrl-C" else "stopped by SIGTERM")
    assert record["exit_codes"] == {"0": 0, "1": 0}  # they saved and exited by themselves
    assert all(end["stopped_by_launcher"] for end in record["rank_ends"].values())
    assert "rank(s) 0, 1 get SIGTERM to save and exit, SIGKILL after 20 s" in out
    _plain_saved(run_dir)


def test_configured_stop_signal_reaches_the_script(runs_dir, write_config):
    cfg = _config(write_config, SAVER)
    proc, run_dir = _start(runs_dir, cfg, "entrypoint.stop_signal=USR2")
    assert launcher_cmd("cancel", run_dir.name, f"--runs-dir={runs_dir}").returncode == 0
    proc.communicate(timeout=60)
    assert runs.read_record(run_dir)["state"] == "CANCELLED"
    _saved(run_dir, "SIGUSR2")
    assert json.loads((run_dir / "plan.json").read_text())["stop_signal"] == "USR2"


def test_a_script_that_ignores_the_stop_signal_is_killed_after_the_grace(runs_dir, write_config):
    cfg = _config(write_config, "tests/jobs/ignore_term.py", local="{stop_grace_s: 2}")
    proc, run_dir = _start(runs_dir, cfg)
    pids = [int((run_dir / f"ready-rank{r}").read_text()) for r in (0, 1)]
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=60)[0]
    elapsed = time.monotonic() - start
    assert proc.returncode == 130, out
    assert 2 <= elapsed < 10, elapsed
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED"
    assert record["exit_codes"] == {"0": -9, "1": -9}
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "ignoring SIGTERM" in log  # it got the stop signal first
    assert not any(Path(f"/proc/{p}").exists() for p in pids)


def test_time_limit_applies_only_when_set(runs_dir, write_config):
    unset = launcher_cmd("run", str(_config(write_config, SAVER)), "--dry-run")
    assert unset.returncode == 0, unset.stderr
    assert "time limit: none (resources.time_min not set)" in unset.stdout
    assert "stop:       SIGTERM to every rank" in unset.stdout
    assert "SIGKILL 20 s later" in unset.stdout
    limited = launcher_cmd(
        "run", str(_config(write_config, SAVER)), "resources.time_min=7", "--dry-run"
    )
    assert "time limit: 7 min" in limited.stdout
    trainer = write_config("name: t\nresources: {procs_per_node: 1}\n", "trainer.yaml")
    builtin = launcher_cmd("run", str(trainer), "--dry-run")
    assert "stop:       SIGUSR2 to every rank" in builtin.stdout  # the built-in trainer's


def _venv_without_launcher(tmp_path: Path) -> Path:
    """A venv of this Python with no pip and no site-packages of the outer one: it has the
    standard library only, so it cannot import launcher (or torch)."""
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import launcher"], cwd=tmp_path, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'launcher'" in probe.stderr
    return python


@pytest.mark.parametrize("mode", ["foreground", "detached"])
def test_job_interpreter_without_launcher_runs_the_job(runs_dir, write_config, tmp_path, mode):
    python = _venv_without_launcher(tmp_path)
    cfg = _config(write_config, "tests/jobs/no_launcher.py")
    extra = ["--detach"] if mode == "detached" else []
    out = launcher_cmd(
        "run", str(cfg), f"runs_dir={runs_dir}", f"entrypoint.python={python}", *extra
    )
    assert out.returncode == 0, out.stderr + out.stdout
    run_dir = list(runs.iter_run_dirs(runs_dir))[0]
    _wait_for(lambda: runs.read_record(run_dir)["state"] in runs.FINAL_STATES, 60, "the end")
    assert runs.read_record(run_dir)["state"] == "COMPLETED"
    for rank in (0, 1):
        seen = json.loads((run_dir / f"no-launcher-rank{rank}.json").read_text())
        assert seen == {"executable": str(python), "launcher": None}


def test_rank_whose_interpreter_is_missing_is_named_with_the_reason_in_its_log(
    runs_dir, write_config
):
    cfg = _config(write_config, SAVER)
    out = launcher_cmd(
        "run",
        str(cfg),
        f"runs_dir={runs_dir}",
        "entrypoint.python=/nonexistent/py",
        "--no-preflight",
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    run_dir = list(runs.iter_run_dirs(runs_dir))[0]
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and record["failed_rank"] == 0
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert "cannot start rank 0: No such file or directory: /nonexistent/py" in status.stdout
    assert "--- last lines of rank 0" in status.stdout
    assert (
        "launcher guard: cannot start the rank: No such file or directory: /nonexistent/py"
        in status.stdout
    )


def test_rank_whose_script_is_missing_is_named_with_its_log(runs_dir, write_config):
    cfg = _config(write_config, "tests/jobs/no_such_script.py")
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--no-preflight", "--quiet")
    assert out.returncode == 1
    run_dir = list(runs.iter_run_dirs(runs_dir))[0]
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and record["failed_rank"] in (0, 1)
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    rank = record["failed_rank"]
    assert f"rank {rank} exited with code 2" in status.stdout
    assert f"--- last lines of rank {rank}" in status.stdout
    assert "can't open file" in status.stdout and "no_such_script.py" in status.stdout


def test_a_rank_that_aborts_at_interpreter_exit_fails_the_run(runs_dir, write_config):
    """Its work was done (and said so), then std::terminate at exit: SIGABRT is a failure,
    named as one, never a success."""
    cfg = _config(write_config, "tests/jobs/abort_at_exit.py")
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == 1, out.stderr
    run_dir = list(runs.iter_run_dirs(runs_dir))[0]
    assert (run_dir / "done-rank0").is_file()
    record = runs.read_record(run_dir)
    assert record["state"] == "FAILED" and record["failed_rank"] == 0
    assert record["exit_codes"] == {"0": -6, "1": 0}
    assert record["error"].startswith(
        "rank 0 aborted (SIGABRT); its log says 'terminate called without an active "
        "exception'; every other rank exited 0"
    )
    assert record["rank_ends"]["0"]["stopped_by_launcher"] is False
    status = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}")
    assert "rank 0: work done" in status.stdout and "terminate called" in status.stdout
