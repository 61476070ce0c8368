"""Fixtures for tests against the real Docker engine (scripts/docker-start.sh starts one).

No registry is reachable here, so the base image is made locally (debootstrap, cached) and
torch comes from a wheelhouse. tests/conftest.py imports these fixtures so every test module
can use them. Under CI a missing engine is a failure, elsewhere a skip.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.errors import BackendError
from launcher.spec import ImageSpec

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CACHE = Path(os.environ.get("LAUNCHER_CACHE_DIR", Path.home() / ".cache" / "launcher"))
BASE_IMAGE = "launcher-base:bookworm"
BUSYBOX_IMAGE = "launcher-base:busybox"
TEST_REPOSITORY = "launcher-test"
# The local CPU build; never an unpinned torch.
TORCH = "torch==2.13.0"
# The debootstrap base image runs Debian bookworm's python3.
IMAGE_PYTHON = "3.11"


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (under CI the Docker tests must run, not skip)")
    pytest.skip(reason)


def _make_base(*args: str) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "make-base-image.sh"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return args[-1]


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client for the local engine."""
    from launcher.image import connect

    try:
        client = connect()
    except BackendError as exc:
        _missing(str(exc))
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """Debian bookworm with python3, pip and venv, imported from a cached debootstrap tarball."""
    return _make_base(BASE_IMAGE)


@pytest.fixture(scope="session")
def busybox_image(docker_client) -> str:
    """A 2 MB static-busybox image, for builds and containers that need no Python."""
    return _make_base("--busybox", BUSYBOX_IMAGE)


@pytest.fixture(scope="session")
def wheelhouse() -> Path:
    """Wheels for docker/requirements.txt (torch pinned) for the base image's Python, cached."""
    requirements = (ROOT / "docker" / "requirements.txt").read_text()
    folder = CACHE / f"wheelhouse-py{IMAGE_PYTHON.replace('.', '')}"
    stamp = folder / ".complete"
    wanted = f"{TORCH}\n{requirements}"
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            "--python-version",
            IMAGE_PYTHON,
            "--dest",
            str(folder),
            TORCH,
            "--requirement",
            str(ROOT / "docker" / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stamp.write_text(wanted)
    return folder


@pytest.fixture(scope="session")
def project_tree(tmp_path_factory) -> Path:
    """A snapshot of the build context (root minus .dockerignore) that tests may edit copies of.

    Builds read the snapshot, not the live tree, so an edit during the session cannot make an
    image and the code next to it disagree.
    """
    from launcher.image import context_files

    tree = tmp_path_factory.mktemp("project-tree")
    for rel in context_files(ROOT):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tree / rel, follow_symlinks=False)
    return tree


@pytest.fixture(scope="session")
def project_image_spec(base_image, wheelhouse) -> ImageSpec:
    """The image section that builds the project image here: local base, offline torch."""
    return ImageSpec(repository=TEST_REPOSITORY, base_image=base_image, wheelhouse=str(wheelhouse))


@pytest.fixture(scope="session")
def project_image(docker_client, project_tree, project_image_spec):
    """The project's training image (docker/Dockerfile) built FROM the local base image.

    Returns launcher.image.BuildResult; `.tag` is the image to run. Kept after the session:
    its tag is the content hash, so the next session finds it up to date.
    """
    import docker
    from launcher.image import build_image

    result = build_image(project_image_spec, project_tree)
    # Tags of earlier sessions' code differ only in their code layer, but they pile up. Only
    # day-old ones go: another session on this engine may be running a recent one.
    for image in docker_client.images.list(name=TEST_REPOSITORY):
        created = image.attrs.get("Created", "")[:19]
        age_s = time.time() - calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%S"))
        for ref in image.tags:
            version = ref.rsplit(":", 1)[1]
            if ref in (result.tag, *result.stage_tags) or len(version) != 12 or age_s < 86400:
                continue
            with contextlib.suppress(docker.errors.APIError):
                docker_client.api.remove_image(ref)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory, docker_client) -> Iterator[str]:
    """A registry on 127.0.0.1 (Debian's docker-registry); yields its host:port.

    The engine trusts 127.0.0.0/8 registries over plain HTTP, so no TLS setup is needed.
    """
    binary = shutil.which("docker-registry")
    if binary is None:
        _missing("docker-registry is not installed (scripts/docker-start.sh installs it)")
    folder = tmp_path_factory.mktemp("registry")
    address = f"127.0.0.1:{_free_port()}"
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"http:\n  addr: {address}\n"
    )
    log = (folder / "registry.log").open("w")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://{address}/v2/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"docker-registry did not start: {(folder / 'registry.log').read_text()}"
                    )
                time.sleep(0.1)
        yield address
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
