"""Shared fixtures: run the real CLI in-process or as a subprocess, in a temp runs dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Fixtures for tests against the real Docker engine (base image, wheelhouse, project image).
pytest_plugins = ["tests.conftest_docker"]

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True, scope="session")
def _own_loader_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The built-in trainer measures num_workers by default and remembers the result: in a
    cache of this test session's, never the user's ~/.cache (a test that needs an empty one
    sets its own)."""
    path = tmp_path_factory.mktemp("loader-cache") / "loader-picks.json"
    os.environ.setdefault("LAUNCHER_LOADER_CACHE", str(path))


def need(available: bool, what: str) -> None:
    """Skip when a real service is missing, except under CI where that is a failure."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is not available under CI (.ci/run must start it)")
    pytest.skip(f"{what} is not available here")


def launcher_cmd(
    *args: str, cwd: Path | str = ROOT, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m launcher ARGS` as a user would; returns the finished process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launcher_popen(*args: str, cwd: Path | str = ROOT) -> subprocess.Popen:
    """`python -m launcher ARGS` in the background, in a session of its own (so a test can
    send it Ctrl-C or kill its group), stdout and stderr merged."""
    return subprocess.Popen(
        [sys.executable, "-m", "launcher", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a YAML config text into the temp folder and return its path."""

    def write(text: str, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
