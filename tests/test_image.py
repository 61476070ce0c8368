"""The training image for real: content-hash tags, cached rebuilds, clear build failures, push.

Builds go through the real Docker engine with the legacy builder (docker SDK), FROM a local
debootstrap base image, with torch installed offline from a wheelhouse.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

from launcher.errors import BackendError, ConfigError
from launcher.image import build_image, context_files, image_tag, run_build_command
from launcher.spec import ImageSpec
from tests.conftest_docker import TEST_REPOSITORY

# One xdist worker runs every docker test, one after another (shared engine and image).
pytestmark = [pytest.mark.docker, pytest.mark.xdist_group("docker")]


def _copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _run(client, image: str, *command: str) -> str:
    out = client.containers.run(image, list(command), network_mode="host", remove=True)
    return out.decode()


def _step(result, prefix: str) -> int:
    """The number of the build step whose instruction starts with `prefix`."""
    for line in result.log:
        if line.startswith("Step ") and " : " in line:
            number, instruction = line[5:].split(" : ", 1)
            if " ".join(instruction.split()).startswith(prefix):
                return int(number.split("/")[0])
    raise AssertionError(f"no step starts with {prefix!r}")


def test_tag_follows_build_inputs_only(tmp_path, project_tree):
    tree = _copy_tree(project_tree, tmp_path / "tree")
    for junk in ("runs/r1/log.txt", ".git/HEAD", "launcher/__pycache__/x.pyc", "data/big.bin"):
        (tree / junk).parent.mkdir(parents=True, exist_ok=True)
        (tree / junk).write_text("x")
    files = context_files(tree)
    assert "launcher/image.py" in files and "docker/Dockerfile" in files
    assert not [f for f in files if f.split("/")[0] in ("runs", ".git", "data")]
    assert not [f for f in files if "__pycache__" in f]

    spec = ImageSpec(repository="launcher-x", base_image="launcher-base:bookworm")
    tag = image_tag(spec, tree)
    assert tag.startswith("launcher-x:") and len(tag.split(":")[1]) == 12
    # Files the Dockerfile never copies (and ignored ones) do not change the image.
    (tree / "notes.md").write_text("not copied into the image")
    (tree / "runs" / "r1" / "log.txt").write_text("y")
    assert image_tag(spec, tree) == tag
    # Code, build args and the base image do.
    (tree / "launcher" / "extra.py").write_text("X = 1\n")
    code_tag = image_tag(spec, tree)
    assert code_tag != tag
    with_arg = ImageSpec(
        repository="launcher-x",
        base_image="launcher-base:bookworm",
        build_args={"USER_UID": "2000"},
    )
    assert image_tag(with_arg, tree) not in (tag, code_tag)
    other_base = ImageSpec(repository="launcher-x", base_image="launcher-base:other")
    assert image_tag(other_base, tree) not in (tag, code_tag)

    with pytest.raises(ConfigError, match="image.wheelhouse"):
        image_tag(ImageSpec(wheelhouse=str(tmp_path / "none")), tree)
    with pytest.raises(ConfigError, match="image.ca_cert"):
        image_tag(ImageSpec(ca_cert=str(tree / "pyproject.toml")), tree)


# The first user of project_image pays for the base image (debootstrap) and a cold build.
@pytest.mark.timeout(1800)
@pytest.mark.docker
def test_image_runs_the_code_as_non_root_and_noop_rebuild_is_instant(
    project_image, project_image_spec, project_tree, docker_client, capsys
):
    assert project_image.tag.startswith(f"{TEST_REPOSITORY}:")
    out = _run(
        docker_client,
        project_image.tag,
        "python",
        "-c",
        "import os, json, torch, yaml, psutil, numpy, launcher; "
        "print(json.dumps([os.getuid(), torch.__version__, launcher.__file__, os.getcwd()]))",
    )
    uid, torch_version, launcher_file, cwd = json.loads(out.strip().splitlines()[-1])
    assert uid != 0
    assert torch_version.startswith("2.13.0")
    assert launcher_file == "/opt/launcher/src/launcher/__init__.py"
    assert cwd == "/workspace"
    # The wheelhouse stays in the build stage, not in the image.
    assert "No such file" in _run(
        docker_client, project_image.tag, "sh", "-c", "ls /opt/launcher/build 2>&1 || true"
    )

    spec = project_image_spec
    again = build_image(spec, project_tree)
    assert not again.built
    assert (again.tag, again.image_id) == (project_image.tag, project_image.image_id)
    assert again.seconds < 5

    capsys.readouterr()
    assert run_build_command(spec, project_tree, no_cache=False, push=False) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == project_image.tag
    assert "up to date" in captured.err


@pytest.mark.timeout(1800)
@pytest.mark.docker
def test_code_only_change_rebuilds_only_the_code_layers(
    tmp_path, project_image, project_image_spec, project_tree, docker_client
):
    tree = _copy_tree(project_tree, tmp_path / "tree")
    (tree / "launcher" / "_image_test_marker.py").write_text("MARK = 'code-only change'\n")
    result = build_image(project_image_spec, tree)
    try:
        assert result.built and result.tag != project_image.tag
        # The dependency install and the venv copy come from the cache ...
        pip_step = _step(result, "RUN set -eu; cd /opt/launcher/build")
        venv_step = _step(result, "COPY --from=deps /opt/venv/")
        assert {pip_step, venv_step} <= set(result.cached_steps), result.log
        # The finished deps stage is tagged, so `docker image prune` keeps that cache.
        assert result.stage_tags == (
            f"{TEST_REPOSITORY}:cache-system",
            f"{TEST_REPOSITORY}:cache-deps",
        )
        # ... and so do their layers: only the code layer on top differs.
        old = docker_client.api.inspect_image(project_image.tag)["RootFS"]["Layers"]
        new = docker_client.api.inspect_image(result.tag)["RootFS"]["Layers"]
        assert len(new) == len(old)
        assert new[:-1] == old[:-1] and new[-1] != old[-1]
        out = _run(
            docker_client,
            result.tag,
            "python",
            "-c",
            "import launcher._image_test_marker as m; print(m.MARK)",
        )
        assert "code-only change" in out
    finally:
        # Only this variant's tag: the cache-STAGE tags belong to the project image too.
        docker_client.api.remove_image(result.tag)


@pytest.mark.docker
def test_failing_step_is_named_and_leaves_no_container(
    tmp_path, project_tree, docker_client, busybox_image
):
    tree = _copy_tree(project_tree, tmp_path / "tree")
    (tree / "docker" / "Broken.dockerfile").write_text(
        f"FROM {busybox_image}\nCOPY launcher/ /opt/launcher/\n"
        "RUN echo marker-output-before-failure && exit 7\n"
    )
    # The build's own containers: from busybox or an image on top of it (ancestor), so other
    # tests' containers coming and going meanwhile do not count.
    mine = {"ancestor": busybox_image}
    before = {c.id for c in docker_client.containers.list(all=True, filters=mine)}
    spec = ImageSpec(repository="launcher-broken", dockerfile="docker/Broken.dockerfile")
    with pytest.raises(BackendError) as caught:
        build_image(spec, tree)
    message = str(caught.value)
    assert "step 3/3 (RUN echo marker-output-before-failure && exit 7)" in message
    assert "returned a non-zero code: 7" in message
    assert "| marker-output-before-failure" in message
    after = {c.id for c in docker_client.containers.list(all=True, filters=mine)}
    assert after <= before  # the failed step's container was removed


def _index_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/six/", timeout=10).close()
        return True
    except OSError:
        return False


@pytest.mark.docker
def test_extra_ca_cert_lets_the_build_use_the_index(
    tmp_path, project_tree, docker_client, base_image
):
    """Containers reach the index only through a proxy that re-signs TLS: give its CA."""
    if not _index_reachable():
        pytest.skip("the package index is not reachable from this machine")
    tree = _copy_tree(project_tree, tmp_path / "tree")
    (tree / "docker" / "requirements.txt").write_text("six\n")
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    spec = ImageSpec(repository="launcher-ca-test", base_image=base_image, ca_cert=str(ca))
    result = build_image(spec, tree)
    try:
        out = _run(
            docker_client,
            result.tag,
            "sh",
            "-c",
            'python -c "import six; print(six.__name__)" && cat "$PIP_CERT"',
        )
        assert out.startswith("six\n")
        assert ca.read_text().strip() in out
    finally:
        for ref in (result.tag, *result.stage_tags):
            docker_client.api.remove_image(ref)


@pytest.mark.docker
def test_push_sends_the_hash_tag_to_the_registry(
    tmp_path, project_tree, docker_client, busybox_image, local_registry
):
    tree = _copy_tree(project_tree, tmp_path / "tree")
    (tree / "docker" / "Small.dockerfile").write_text(
        f"FROM {busybox_image}\nCOPY launcher/ /opt/launcher/\n"
    )
    spec = ImageSpec(
        repository="launcher-push-test",
        dockerfile="docker/Small.dockerfile",
        registry=f"{local_registry}/team",
    )
    result = build_image(spec, tree, push=True)
    version = result.tag.split(":")[1]
    assert result.pushed == f"{local_registry}/team/launcher-push-test:{version}"
    with urllib.request.urlopen(
        f"http://{local_registry}/v2/team/launcher-push-test/tags/list"
    ) as r:
        assert json.load(r)["tags"] == [version]
    for ref in (result.tag, result.pushed):
        docker_client.api.remove_image(ref)

    with pytest.raises(ConfigError, match="image.registry"):
        build_image(
            ImageSpec(repository="launcher-push-test", dockerfile="docker/Small.dockerfile"),
            tree,
            push=True,
        )
