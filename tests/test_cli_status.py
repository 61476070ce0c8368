"""`launcher status`, `logs` and `cancel` over run folders that are damaged, hostile or whose
backend cannot answer: one line per problem, the other runs still shown, never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from launcher import runs
from launcher.cli import main
from tests.conftest import JOBS, ROOT, launcher_cmd

STATUS_EXAMPLES = 150
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def real_local_run(runs_dir: Path, tmp_path: Path, *, name: str = "ok", exit_code: int = 0):
    """A finished local run, for real: its script prints terminal escapes to its log."""
    script = tmp_path / f"{runs.slug(name)}.py"
    script.write_text(
        "import sys\n"
        "print('hello \\x1b]0;pwned\\x07 title \\x1b[2J cleared \\x1b[31mred', flush=True)\n"
        "print('second line\\tend', flush=True)\n"
        f"raise SystemExit({exit_code})\n"
    )
    cfg = tmp_path / f"{runs.slug(name)}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "workdir": str(tmp_path),
                "entrypoint": {"script": str(script)},
                "resources": {"procs_per_node": 1},
            }
        )
    )
    before = set(runs.iter_run_dirs(runs_dir))
    out = launcher_cmd("run", str(cfg), f"runs_dir={runs_dir}", "--quiet")
    assert out.returncode == (1 if exit_code else 0), out.stderr
    (run_dir,) = set(runs.iter_run_dirs(runs_dir)) - before
    return run_dir


def plant(runs_dir: Path, name: str, run_id: str, content: bytes | None) -> Path:
    run_dir = runs_dir / name / run_id
    run_dir.mkdir(parents=True)
    if content is not None:
        (run_dir / runs.RECORD).write_bytes(content)
    return run_dir


def good(**changes) -> bytes:
    record = runs.new_record(
        run_id="x", name="n", backend="local", world_size=1, config_file=None
    ) | {"state": "COMPLETED"}
    return json.dumps(record | changes).encode()


DAMAGE = {
    "empty": b"",
    "notjson": b"{not json",
    "binary": b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
    "list": b"[1, 2]",
    "shape": good(world_size="two"),
    "backend": good(backend="kubernetes"),
    "badpid": good(state="RUNNING", backend_info={"supervisor_pid": -1}),
}


def plant_all_damage(runs_dir: Path) -> dict[str, Path]:
    planted = {
        key: plant(runs_dir, f"bad-{key}", f"20000101-00000{i}-dead{i:02d}", content)
        for i, (key, content) in enumerate(DAMAGE.items())
    }
    folder = plant(runs_dir, "bad-folder", "20000101-000010-dead10", None)
    (folder / runs.RECORD).mkdir()
    planted["folder"] = folder
    huge = plant(runs_dir, "bad-huge", "20000101-000011-dead11", None)
    with open(huge / runs.RECORD, "wb") as fh:
        fh.truncate(4 << 30)  # sparse 4 GiB
    planted["huge"] = huge
    return planted


def test_status_names_each_damaged_run_and_shows_the_others(runs_dir, tmp_path):
    real = real_local_run(runs_dir, tmp_path)
    planted = plant_all_damage(runs_dir)
    out = launcher_cmd("status", f"--runs-dir={runs_dir}")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("RUN ")
    damaged = [line for line in lines if line.startswith("DAMAGED ")]
    assert len(damaged) == len(planted)
    for run_dir in planted.values():
        (line,) = [d for d in damaged if d.startswith(f"DAMAGED {run_dir / runs.RECORD}: ")]
        assert len(line) < 300, line
    assert any("unknown backend 'kubernetes'" in d for d in damaged)
    assert any("backend_info.supervisor_pid: expected a process id" in d for d in damaged)
    (row,) = [line for line in lines if line.startswith(real.name)]
    assert " COMPLETED " in row
    as_json = json.loads(launcher_cmd("status", "--json", f"--runs-dir={runs_dir}").stdout)
    states = {Path(r["run_dir"]).name: r["state"] for r in as_json}
    assert states[real.name] == "COMPLETED"
    assert sorted(states.values()).count("DAMAGED") == len(planted)


@pytest.mark.parametrize("key", ["notjson", "binary", "backend", "folder", "huge", "badpid"])
def test_status_logs_and_cancel_of_a_damaged_run_say_one_line_and_exit_2(runs_dir, key):
    run_dir = plant_all_damage(runs_dir)[key]
    for verb in (["status"], ["logs"], ["cancel"], ["logs", "--follow"]):
        for ref in (run_dir.name, str(run_dir)):
            out = launcher_cmd(*verb, ref, f"--runs-dir={runs_dir}", timeout=60)
            assert out.returncode == 2, (verb, out.stdout, out.stderr)
            assert out.stdout == ""
            (line,) = out.stderr.splitlines()
            assert line.startswith(f"launcher: error: {run_dir / runs.RECORD}: damaged run record:")


def test_terminal_escapes_from_names_errors_and_logs_are_shown_not_obeyed(runs_dir, tmp_path):
    run_dir = real_local_run(runs_dir, tmp_path, name="evil\x1b[31mjob\x1b]0;t\x07", exit_code=3)
    # A run folder someone else can write to: the error text is theirs too.
    runs.update_record(run_dir, error="failed \x1b[2J\x1b[1;1H all is fine \u202eexe.txt")
    for args in (["status"], ["status", run_dir.name], ["status", "--json"]):
        out = launcher_cmd(*args, f"--runs-dir={runs_dir}")
        assert out.returncode == 0, out.stderr
        assert not UNSAFE.search(out.stdout + out.stderr), out.stdout
    shown = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}").stdout
    assert " evil\\x1b[31mjob\\x1b] " in shown  # the NAME column: 20 characters
    assert "failed \\x1b[2J\\x1b[1;1H all is fine \\u202eexe.txt" in shown
    assert "hello \\x1b]0;pwned\\x07 title \\x1b[2J cleared \\x1b[31mred" in shown  # log tail
    logs = launcher_cmd("logs", run_dir.name, f"--runs-dir={runs_dir}")
    assert logs.returncode == 0 and not UNSAFE.search(logs.stdout)
    assert logs.stdout.endswith("\\x1b[31mred\nsecond line\tend\n")  # lines and tabs kept
    raw = subprocess.run(
        [sys.executable, "-m", "launcher", "logs", run_dir.name, "--raw", f"--runs-dir={runs_dir}"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    assert raw.stdout == (run_dir / "logs" / "rank0.log").read_bytes()
    assert b"\x1b[2J" in raw.stdout


def test_a_runs_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    out = launcher_cmd("status", f"--runs-dir={tmp_path / 'runs'}")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"launcher: error: {tmp_path / 'runs'}: the runs dir is not a folder\n"


def _without_root_powers() -> list[str]:
    """As root, drop the capabilities that ignore file modes, so chmod 000 means something."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop root's file-mode override")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def test_unreadable_runs_dir_and_run_folders_are_one_line_each(runs_dir, tmp_path):
    real = real_local_run(runs_dir, tmp_path)
    locked = plant(runs_dir, "locked", "20000101-000000-aaaaaa", good())
    hidden = plant(runs_dir, "hidden", "20000101-000000-bbbbbb", good())
    status = [*_without_root_powers(), sys.executable, "-m", "launcher", "status"]
    try:
        os.chmod(locked.parent, 0o000)  # cannot list the job's folder
        os.chmod(hidden, 0o600)  # can list it, cannot look inside the run folder
        out = subprocess.run(
            [*status, f"--runs-dir={runs_dir}"], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 0 and out.stderr == "", out.stderr
        assert f"DAMAGED {locked.parent}: cannot list this folder: Permission denied" in out.stdout
        assert f"DAMAGED {hidden}: cannot look into it: Permission denied" in out.stdout
        assert any(
            line.startswith(real.name) and " COMPLETED " in line for line in out.stdout.splitlines()
        )
        os.chmod(runs_dir, 0o000)
        out = subprocess.run(
            [*status, f"--runs-dir={runs_dir}"], cwd=ROOT, capture_output=True, text=True
        )
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == (
            f"launcher: error: {runs_dir}: cannot list the runs dir: Permission denied\n"
        )
    finally:
        os.chmod(runs_dir, 0o755)
        os.chmod(locked.parent, 0o755)
        os.chmod(hidden, 0o755)


# --- a backend that cannot answer ------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when this returns: nothing listens


@pytest.mark.slurm
@pytest.mark.xdist_group("slurm")
def test_status_without_a_slurm_controller_shows_every_run_last_known(runs_dir, tmp_path):
    from tests.slurm_helpers import require_cluster, wait_file, wait_state

    require_cluster()
    slurm_cfg = tmp_path / "slurm.yaml"
    slurm_cfg.write_text(
        yaml.safe_dump(
            {
                "name": "on-slurm",
                "backend": "slurm",
                "workdir": str(ROOT),
                "entrypoint": {"script": "tests/jobs/sleeper.py"},
                "resources": {"nodes": 1, "procs_per_node": 1, "mem_gb": 0.5, "time_min": 5},
                "slurm": {"partition": "debug"},
            }
        )
    )
    submitted = launcher_cmd("run", str(slurm_cfg), f"runs_dir={runs_dir}")
    assert submitted.returncode == 0, submitted.stderr
    (slurm_run,) = runs.iter_run_dirs(runs_dir)
    try:
        wait_file("pid-rank0", slurm_run, timeout=120)
        assert wait_state(slurm_run, ("RUNNING",), timeout=60)["state"] == "RUNNING"
        local_run = _local_run_whose_supervisor_was_killed(runs_dir, tmp_path)
        assert slurm_run.name < local_run.name  # so Slurm is asked first, and fails first

        # The same cluster's config, but its controller and database on a port nobody serves.
        dead = tmp_path / "dead-slurm"
        dead.mkdir()
        port = _closed_port()
        conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
        conf, count = re.subn(
            r"(?m)^(SlurmctldPort|AccountingStoragePort)=.*$", rf"\g<1>={port}", conf
        )
        assert count == 2, "expected SlurmctldPort= and AccountingStoragePort= lines"
        (dead / "slurm.conf").write_text(conf)
        env = {"SLURM_CONF": str(dead / "slurm.conf")}

        out = launcher_cmd("status", f"--runs-dir={runs_dir}", env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        (warning,) = out.stderr.splitlines()
        assert warning.startswith("launcher: slurm status unavailable: sacct -X failed: ")
        assert warning.endswith("; showing the last known state")
        rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
        assert " RUNNING " in rows[slurm_run.name]  # its last known state
        # The local backend was still asked: its run's supervisor is gone, so it FAILED.
        assert (
            " FAILED " in rows[local_run.name] and "supervisor process died" in rows[local_run.name]
        )
        one = launcher_cmd("status", slurm_run.name, f"--runs-dir={runs_dir}", env=env)
        assert one.returncode == 0 and " RUNNING " in one.stdout
        assert one.stderr.count("\n") == 1 and "slurm status unavailable" in one.stderr
    finally:
        launcher_cmd("cancel", slurm_run.name, f"--runs-dir={runs_dir}")
    assert wait_state(slurm_run, runs.FINAL_STATES, timeout=60)["state"] == "CANCELLED"


def _local_run_whose_supervisor_was_killed(runs_dir: Path, tmp_path: Path) -> Path:
    cfg = tmp_path / "sleepy.yaml"
    cfg.write_text(
        f"name: sleepy\nworkdir: {ROOT}\nentrypoint: {{script: {JOBS / 'sleeper.py'}}}\n"
        "resources: {procs_per_node: 1}\nlocal: {stop_grace_s: 2}\n"
    )
    before = set(runs.iter_run_dirs(runs_dir))
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "run", str(cfg), f"runs_dir={runs_dir}", "--quiet"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(runs.iter_run_dirs(runs_dir)) - before
        if new and (next(iter(new)) / "pid-rank0").is_file():
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError("the local sleeper did not start")
    (run_dir,) = new
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    pid = int((run_dir / "pid-rank0").read_text())
    deadline = time.monotonic() + 10  # PDEATHSIG stops the rank; never leave it behind
    while time.monotonic() < deadline and _is_sleeper(pid):
        time.sleep(0.1)
    if _is_sleeper(pid):
        os.kill(pid, signal.SIGKILL)
    assert runs.read_record(run_dir)["state"] == "RUNNING"
    return run_dir


def _is_sleeper(pid: int) -> bool:
    try:
        return b"sleeper.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# --- property: whatever the run folders hold, status answers ------------------------------

CONTENT = st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=12),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
    st.tuples(
        st.sampled_from(["state", "name", "error", "world_size", "backend", "backend_info"]),
        st.none() | st.integers() | st.text() | st.sampled_from(runs.STATES),
    ).map(lambda kv: good(**{kv[0]: kv[1]})),
    st.builds(  # valid records with hostile text: status must print them, escaped
        lambda name, error, state: good(name=name, error=error, state=state),
        st.text(),
        st.none() | st.text(),
        st.sampled_from(runs.STATES),
    ),
)


@given(st.lists(CONTENT, min_size=1, max_size=4))
@settings(
    max_examples=STATUS_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_status_over_any_run_folders_never_raises(tmp_path_factory, contents):
    for content in contents:
        assume(b'"slurm"' not in content and b'"docker"' not in content)  # local only here
    root = tmp_path_factory.mktemp("runs")
    dirs = [plant(root, f"job{i}", f"2000-{i}", c) for i, c in enumerate(contents)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["status", f"--runs-dir={root}"])
        codes = [main(["status", str(d), f"--runs-dir={root}"]) for d in dirs]
    assert code == 0 and set(codes) <= {0, 2}
    event(f"{codes.count(2)} of {len(codes)} damaged")
    text = out.getvalue() + err.getvalue()
    assert not UNSAFE.search(text)
    lines = out.getvalue().split("\n", len(dirs) + 1)
    table = lines[1 : len(dirs) + 1]
    assert len(table) == len(dirs)
    assert all(line.startswith(("DAMAGED ", "x ")) for line in table), table
    assert "Traceback" not in text
