"""Preflight against the real Docker engine: each mistake is caught before a container is
created (none carries the job's name), with its one line naming the key and the fix."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from launcher import config, runs
from launcher.backends import docker_preflight
from launcher.backends.base import Check
from launcher.backends.docker import BACKEND
from launcher.preflight import PreflightFailed, gate

pytestmark = pytest.mark.docker


def _job(tmp_path: Path, image: str, extra: str = "") -> Path:
    (tmp_path / "train.py").write_text("print('hello')\n")
    path = tmp_path / "job.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: pf-{tmp_path.name[-20:]}
            backend: docker
            runs_dir: {tmp_path / "runs"}
            workdir: .
            entrypoint:
              script: train.py
            docker:
              image: {image}
            """
        )
        + extra
    )
    return path


def _plan(path: Path, overrides: list[str]):
    loaded = config.load(str(path), overrides)
    run_id = runs.new_run_id()
    run_dir = runs.run_dir_for(loaded.spec.runs_dir, loaded.spec.name, run_id)
    return BACKEND.plan(loaded.spec, run_id=run_id, run_dir=run_dir, config_file=loaded.file)


def _containers(client, plan) -> list[str]:
    name = plan.payload["container"]["name"]
    return [c.name for c in client.containers.list(all=True, filters={"name": name})]


def _caught(client, plan, checks: list[Check]) -> Check:
    failures = [c for c in checks if c.status == "fail"]
    assert failures, [c.line() for c in checks]
    with pytest.raises(PreflightFailed) as info:
        gate(checks)
    assert str(info.value).startswith(failures[0].line()) and "\n" not in str(info.value)
    assert not Path(plan.run_dir).exists()
    assert _containers(client, plan) == []
    return failures[0]


MISTAKES = [
    (
        "image-tag-typo",
        ["docker.image={base}x"],
        "docker.image",
        ["is not in the Docker engine", "did you mean '{base}'"],
    ),
    (
        "build-tag-never-built",
        ["docker.image=null", "image.repository=launcher-never-built"],
        "image",
        ["launcher-never-built:", "launcher build CONFIG"],
    ),
    (
        "gpus-without-nvidia-runtime",
        ["resources.gpus_per_node=1"],
        "resources.gpus_per_node",
        ["1 GPU(s) asked", "no NVIDIA runtime"],
    ),
    ("cpus-over-engine", ["docker.cpus=512"], "docker.cpus", ["512 is more than the engine's"]),
    (
        "memory-over-engine",
        ["resources.mem_gb=4096"],
        "resources.mem_gb",
        ["4096 is more than the engine's"],
    ),
    (
        "shm-too-small-for-the-picks",
        ["docker.shm_gb=0.01", "loader.num_workers=4", "loader.sample_bytes=1000000"],
        "docker.shm_gb",
        ["less than the", "loader picks need", "bus error"],
    ),
    (
        "mount-source-missing",
        ["docker.mounts=['/nonexistent/data:/data:ro']"],
        "docker.mounts[0]",
        ["/nonexistent/data does not exist"],
    ),
    (
        "script-missing-in-the-mounted-workdir",
        ["entrypoint.script=tain.py"],
        "entrypoint.script",
        ["'tain.py' not found", "did you mean 'train.py'"],
    ),
]


@pytest.mark.parametrize(
    "overrides,key,words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES]
)
def test_each_docker_mistake_is_caught_before_a_container(
    tmp_path, docker_client, base_image, overrides, key, words
):
    overrides = [o.format(base=base_image) for o in overrides]
    plan = _plan(_job(tmp_path, base_image), overrides)
    failure = _caught(docker_client, plan, docker_preflight.preflight(plan))
    assert failure.key == key, failure.line()
    for word in words:
        assert word.format(base=base_image) in failure.line(), failure.line()


def test_an_engine_that_does_not_answer_is_one_line(tmp_path, docker_client, base_image):
    plan = _plan(_job(tmp_path, base_image), [])
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = f"unix://{tmp_path}/no-engine.sock"
    try:
        checks = docker_preflight.preflight(plan)
    finally:
        if old is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = old
    failure = _caught(docker_client, plan, checks)
    assert failure.name == "docker.engine"
    assert f"unix://{tmp_path}/no-engine.sock does not answer" in failure.line()
    assert "scripts/docker-start.sh" in failure.line()


def test_a_good_docker_job_passes(tmp_path, docker_client, base_image):
    plan = _plan(_job(tmp_path, base_image), [])
    checks = docker_preflight.preflight(plan)
    assert [c.line() for c in checks if c.status == "fail"] == []
    assert {c.name for c in checks} >= {"docker.engine", "docker.image", "entrypoint.script"}


def test_the_cli_refuses_before_a_container_and_writes_nothing(tmp_path, docker_client, base_image):
    """`launcher run` end to end: exit 2, one line, no container, no run folder."""
    if not hasattr(BACKEND, "preflight"):
        pytest.skip("DockerBackend.preflight is not wired to docker_preflight.py yet")
    import subprocess
    import sys

    path = _job(tmp_path, base_image)
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(path), "resources.gpus_per_node=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "resources.gpus_per_node: 1 GPU(s) asked" in lines[0], lines
    assert not (tmp_path / "runs").exists()
    name = f"launcher-pf-{tmp_path.name[-20:]}"
    assert not [c for c in docker_client.containers.list(all=True) if c.name.startswith(name)]
