"""Your own script on the real Slurm cluster: every task's rank wrapper starts a script through
the same exit runner as the local and Docker ranks, so the injected gloo exit race
(tests/jobs/holdwork.c) that aborts a rank finalizing the interpreter cannot abort it."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher import runs
from tests.conftest import launcher_cmd
from tests.slurm_helpers import only_run, require_cluster, wait_state
from tests.test_user_scripts_exit import holdwork, race_config, unwrapped_copy

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm"), pytest.mark.timeout(900)]

__all__ = ["holdwork"]  # the fixture, shared with the local test


def _run(folder: Path, holdwork: Path, script: str) -> tuple[Path, dict]:
    cfg = race_config(
        folder,
        holdwork,
        script,
        backend="slurm",
        slurm="{partition: debug, max_requeue: 0}",
    )
    out = launcher_cmd("run", str(cfg), timeout=120)
    assert out.returncode == 0, out.stderr
    run_dir = only_run(folder / "runs")
    return run_dir, wait_state(run_dir, runs.FINAL_STATES, timeout=600)


def test_injected_exit_race_aborts_an_unwrapped_slurm_rank_and_not_the_runner(tmp_path, holdwork):
    require_cluster()
    run_dir, record = _run(tmp_path / "control", holdwork, unwrapped_copy(tmp_path / "control"))
    assert record["state"] == "FAILED", record  # the injection still reproduces the abort
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "terminate called without an active exception" in log, log

    run_dir, record = _run(tmp_path / "runner", holdwork, "tests/jobs/exit_race.py")
    assert record["state"] == "COMPLETED", record
    for rank in (0, 1):
        assert (tmp_path / "runner" / f"flag.{rank}").exists()  # main() returned, then it left
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "keeps finished work 10" in log and "terminate called" not in log, log
