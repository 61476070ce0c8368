"""What a run folder can and cannot make launcher do, for real: a full disk while
checkpointing, pids in a record that kill(2) would read as "every process", FIFOs and
symlinks planted as records or logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launcher import runs
from tests.conftest import ROOT, launcher_cmd


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
        capture_output=True,
    )
    return done.returncode == 0


def test_a_full_disk_while_checkpointing_says_so_and_keeps_the_previous_one(tmp_path):
    import torch

    from launcher.errors import CheckpointError
    from launcher.runtime import checkpoint

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a 1 MiB tmpfs (the file-size-limit test still runs)")
    try:
        folder = disk / "checkpoints"
        first = checkpoint.save(folder, 1, {"w": torch.arange(1000)}, keep_last=3)
        with pytest.raises(CheckpointError) as info:
            checkpoint.save(folder, 2, {"w": torch.zeros(1_000_000)}, keep_last=3)  # 4 MB
        message = str(info.value)
        assert message.startswith(
            f"checkpoint not written: no space left on device at {folder / 'step-000000002.pt'} ("
        )
        assert "KiB free); the previous checkpoint is kept (step-000000001.pt)" in message
        assert "unexpected pos" not in message
        assert sorted(p.name for p in folder.iterdir()) == ["step-000000001.pt"]  # no temp
        assert torch.equal(checkpoint.load(first)["w"], torch.arange(1000))
        assert checkpoint.load_latest(folder)[0] == first
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_file_size_limit_while_checkpointing_is_the_same_clear_error(tmp_path):
    """RLIMIT_FSIZE gives EFBIG (not ENOSPC): the same one line, the old checkpoint kept."""
    code = textwrap.dedent(
        f"""
        import resource, signal, torch
        from pathlib import Path
        from launcher.errors import CheckpointError
        from launcher.runtime import checkpoint
        folder = Path({str(tmp_path / "ck")!r})
        checkpoint.save(folder, 1, {{"w": torch.arange(10)}}, keep_last=3)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us first
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        try:
            checkpoint.save(folder, 2, {{"w": torch.zeros(1_000_000)}}, keep_last=3)
        except CheckpointError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("checkpoint not written: file too large")
    assert "the previous checkpoint is kept (step-000000001.pt)" in out.stdout
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step-000000001.pt"]


def _record(**changes) -> str:
    record = runs.new_record(
        run_id="20000101-000000-cafe00", name="x", backend="local", world_size=1, config_file=None
    )
    return json.dumps(record | {"state": "RUNNING"} | changes)


def _isolated() -> list[str]:
    """A fresh pid namespace: should a regression ever signal -1 or 0, only it suffers."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to confine a regression's signals")
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]


@pytest.mark.parametrize(
    "info",
    [
        {"supervisor_pid": 0},
        {"supervisor_pid": -1},
        {"rank_pids": {"0": 0}},
        {"rank_pids": {"0": -1}},
        {"rank_pids": {"0": 2**70}},
        {"supervisor": {"pid": -1, "start_ticks": 1, "boot_id": "b"}},
        {"ranks": {"0": {"pid": "1; rm -rf /", "start_ticks": 1, "boot_id": "b"}}},
    ],
)
def test_cancel_never_signals_a_pid_that_means_a_group_or_everyone(runs_dir, info):
    run_dir = runs_dir / "x" / "20000101-000000-cafe00"
    run_dir.mkdir(parents=True)
    (run_dir / runs.RECORD).write_text(_record(backend_info=info))
    before = (run_dir / runs.RECORD).read_bytes()
    out = subprocess.run(
        [*_isolated(), sys.executable, "-m", "launcher", "cancel", run_dir.name],
        cwd=ROOT,
        env={**os.environ, "LAUNCHER_RUNS_DIR": str(runs_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
    )
    assert out.returncode == 2, out.stderr
    assert "damaged run record: backend_info." in out.stderr and "process" in out.stderr
    assert (run_dir / runs.RECORD).read_bytes() == before  # nothing acted on it


def test_a_fifo_as_record_or_log_never_hangs_status_or_logs(runs_dir):
    run_dir = runs_dir / "x" / "20000101-000000-cafe00"
    (run_dir / "logs").mkdir(parents=True)
    os.mkfifo(run_dir / runs.RECORD)
    out = launcher_cmd("status", f"--runs-dir={runs_dir}", timeout=30)
    assert out.returncode == 0
    assert f"DAMAGED {run_dir / runs.RECORD}: is not a plain file" in out.stdout
    os.unlink(run_dir / runs.RECORD)
    (run_dir / runs.RECORD).write_text(
        _record(state="FAILED", failed_rank=0, error="rank 0 exited with code 1")
    )
    os.mkfifo(run_dir / "logs" / "rank0.log")
    out = launcher_cmd("status", run_dir.name, f"--runs-dir={runs_dir}", timeout=30)
    assert out.returncode == 0, out.stderr
    assert "cannot read" in out.stdout and "is a FIFO, not a regular file" in out.stdout
    out = launcher_cmd("logs", run_dir.name, f"--runs-dir={runs_dir}", timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.endswith("rank0.log: cannot read this log: is a FIFO, not a regular file\n")


def test_a_symlinked_record_is_not_followed(runs_dir, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"run_id": "TOPSECRET"}))
    run_dir = runs_dir / "x" / "20000101-000000-cafe00"
    run_dir.mkdir(parents=True)
    (run_dir / runs.RECORD).symlink_to(secret)
    out = launcher_cmd("status", "--json", f"--runs-dir={runs_dir}")
    assert out.returncode == 0 and "TOPSECRET" not in out.stdout
    (entry,) = json.loads(out.stdout)
    assert entry["state"] == "DAMAGED" and "symbolic link" in entry["error"]
