"""examples/accelerate_train.py (configs/accelerate.yaml), the real accelerate package, on the
local backend with 2 processes: it trains as one DDP job of 2, saves its state on Ctrl-C (the
stop signal, SIGTERM, reaches every process), the run is CANCELLED with both processes
exiting 0, and a second run resumes from that state to the end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher import runs
from tests.conftest import ROOT, launcher_popen
from tests.test_user_scripts_local import _wait_for

pytest.importorskip("accelerate")


def _config(folder: Path, ckpt: Path, steps: int, step_s: float) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "accelerate.yaml").read_text())
    data["workdir"] = str(ROOT)
    data["runs_dir"] = str(folder / "runs")
    data["entrypoint"]["args"] = [
        *["--steps", str(steps), "--step-s", str(step_s), "--ckpt-dir", str(ckpt)]
    ]
    data["local"] = {"stop_grace_s": 30}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _events(ckpt: Path) -> list[dict]:
    path = ckpt / "progress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ends(run_dir: Path) -> dict[int, tuple[str, int, str]]:
    """process index -> (saved at | done at, step, weights) from each rank's log."""
    found = {}
    for rank in (0, 1):
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        match = re.search(r"process (\d)/2: (saved at|done at) step (\d+), weights (\S+)", log)
        assert match, log
        found[int(match.group(1))] = (match.group(2), int(match.group(3)), match.group(4))
    return found


def test_accelerate_example_saves_on_ctrl_c_and_resumes_to_the_end(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    first = _config(tmp_path / "first", ckpt, steps=1_000_000, step_s=0.05)
    proc = launcher_popen("run", str(first))
    try:
        _wait_for(lambda: _events(ckpt), 180, "the start")
        run_dir = next(runs.iter_run_dirs(tmp_path / "first" / "runs"))
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out = proc.communicate(timeout=90)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    record = runs.read_record(run_dir)
    assert record["state"] == "CANCELLED" and record["error"] == "stopped by SIGINT", record
    assert record["exit_codes"] == {"0": 0, "1": 0}, record  # both saved and left by themselves
    ends = _ends(run_dir)
    assert set(ends) == {0, 1}  # two processes of one job: accelerate read the torchrun variables
    (how0, stopped, weights0), (how1, stopped1, weights1) = ends[0], ends[1]
    assert how0 == how1 == "saved at" and stopped == stopped1 >= 1
    assert weights0 == weights1  # DDP kept the processes identical
    assert (ckpt / "accelerate-step.txt").read_text() == str(stopped)
    state = ckpt / "accelerate-state"
    assert (state / "random_states_0.pkl").is_file() and (state / "random_states_1.pkl").is_file()
    assert [(e["event"], e["processes"]) for e in _events(ckpt)] == [("start", 2), ("stop", 2)]

    total = stopped + 20
    second = _config(tmp_path / "second", ckpt, steps=total, step_s=0.0)
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(second)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run_dir = next(runs.iter_run_dirs(tmp_path / "second" / "runs"))
    assert runs.read_record(run_dir)["state"] == "COMPLETED"
    events = _events(ckpt)
    assert [(e["event"], e["step"]) for e in events[2:]] == [("start", stopped), ("end", total)]
    ends = _ends(run_dir)
    assert ends[0][:2] == ends[1][:2] == ("done at", total) and ends[0][2] == ends[1][2]
    assert ends[0][2] != weights0  # it trained on from the saved weights
