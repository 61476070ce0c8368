"""`launcher data verify|manifest` on real files: real PNG/JPEG, real truncation, real pool."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launcher.data import (
    MANIFEST_NAME,
    read_manifest,
    run_manifest_command,
    run_verify_command,
    verify_tree,
)
from launcher.data.verify import _pool_context, format_manifest
from launcher.errors import DataError
from tests.conftest import launcher_cmd


def noise_image(path: Path, seed: int, size: int = 24) -> None:
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size))
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256))] * (size * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A small clean dataset: PNGs, JPEGs in a subfolder, a text file and a JSON file."""
    root = tmp_path / "set"
    for i in range(10):
        noise_image(root / f"img{i}.png", i)
    for i in range(3):
        noise_image(root / "val" / f"v{i}.jpg", 100 + i)
    (root / "labels.txt").write_text("\n".join(str(i % 3) for i in range(10)) + "\n")
    (root / "meta.json").write_text(json.dumps({"classes": 3}))
    return root


def damage(root: Path) -> set[str]:
    """The three kinds of damage the issue names; returns the damaged paths."""
    png = root / "img3.png"
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])  # truncated PNG
    (root / "labels.txt").write_bytes(b"")  # zero-byte file
    noise_image(root / "img5.png", 999)  # still a good image, but not the one in the manifest
    return {"img3.png", "labels.txt", "img5.png"}


def test_verify_finds_exactly_the_truncated_the_empty_and_the_changed_file(dataset, capsys):
    assert run_manifest_command(dataset, jobs=2) == 0
    manifest = read_manifest(dataset / MANIFEST_NAME)
    assert len(manifest) == 15 and MANIFEST_NAME not in manifest
    assert run_verify_command(dataset, manifest=None, jobs=2) == 0
    capsys.readouterr()

    damaged = damage(dataset)
    report = verify_tree(dataset, manifest=dataset / MANIFEST_NAME, jobs=2)
    assert set(report.bad) == damaged
    assert report.files == 15 and report.jobs == 2
    assert "image does not decode" in report.bad["img3.png"][0]
    assert report.bad["labels.txt"][0] == "zero-byte file"
    assert report.bad["img5.png"] == [report.bad["img5.png"][0]]
    assert "differs from the manifest" in report.bad["img5.png"][0]

    # The command picks DIR/SHA256SUMS up by itself, lists the three, and exits non-zero.
    assert run_verify_command(dataset, manifest=None, jobs=2) == 1
    out = capsys.readouterr()
    bad_lines = [line for line in out.out.splitlines() if line.startswith("BAD ")]
    assert sorted(line.split(":")[0][4:] for line in bad_lines) == sorted(damaged)
    assert "15 files" in out.err and "3 bad" in out.err


def test_without_a_manifest_only_structural_damage_is_found(dataset):
    damaged = damage(dataset)
    report = verify_tree(dataset, jobs=1)
    assert set(report.bad) == damaged - {"img5.png"}
    assert report.hashes == {}  # no manifest: no hashing cost


def test_missing_and_unlisted_files_are_bad(dataset):
    assert run_manifest_command(dataset, jobs=1) == 0
    (dataset / "img0.png").unlink()
    noise_image(dataset / "new.png", 7)
    report = verify_tree(dataset, manifest=dataset / MANIFEST_NAME, jobs=1)
    assert report.bad == {
        "img0.png": ["missing (listed in the manifest)"],
        "new.png": ["not in the manifest"],
    }


def test_manifest_is_not_written_over_bad_files(dataset, capsys):
    assert run_manifest_command(dataset, jobs=1) == 0
    before = (dataset / MANIFEST_NAME).read_bytes()
    damage(dataset)
    assert run_manifest_command(dataset, jobs=1) == 1
    assert (dataset / MANIFEST_NAME).read_bytes() == before
    assert "manifest not written" in capsys.readouterr().err


def test_truncation_in_other_formats_is_found(tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    arr = np.arange(1000, dtype=np.float32)
    np.save(root / "good.npy", arr)
    np.save(root / "cut.npy", arr)
    cut = root / "cut.npy"
    cut.write_bytes(cut.read_bytes()[:-100])
    (root / "good.gz").write_bytes(gzip.compress(b"x" * 10_000))
    (root / "cut.gz").write_bytes(gzip.compress(bytes(range(256)) * 100)[:-20])
    (root / "good.json").write_text('{"a": [1, 2, 3]}')
    (root / "cut.json").write_text('{"a": [1, 2')
    shutil.make_archive(str(root / "good"), "zip", root_dir=tmp_path, base_dir="mixed")
    data = (root / "good.zip").read_bytes()
    (root / "cut.zip").write_bytes(data[: len(data) // 2])
    report = verify_tree(root, jobs=1)
    assert set(report.bad) == {"cut.npy", "cut.gz", "cut.json", "cut.zip"}


def test_manifest_round_trip_with_awkward_names_and_sha256sum(tmp_path):
    root = tmp_path / "odd"
    root.mkdir()
    names = ["a b.bin", "back\\slash.txt", "new\nline.txt", "ünï.txt"]
    for i, name in enumerate(names):
        (root / name).write_bytes(f"content {i}".encode())
    assert run_manifest_command(root, jobs=1) == 0
    assert set(read_manifest(root / MANIFEST_NAME)) == set(names)
    assert verify_tree(root, manifest=root / MANIFEST_NAME, jobs=1).ok
    tool = shutil.which("sha256sum")
    if tool:  # the same file checks with coreutils
        done = subprocess.run([tool, "-c", "--quiet", MANIFEST_NAME], cwd=root)
        assert done.returncode == 0
    assert (
        format_manifest(read_manifest(root / MANIFEST_NAME)) == (root / MANIFEST_NAME).read_text()
    )


def test_bad_manifest_line_and_missing_folder_are_one_line_errors(tmp_path):
    (tmp_path / "m").write_text("not-a-hash  x.png\n")
    with pytest.raises(DataError, match=r"m:1: expected '<64 hex digits>  <path>'"):
        read_manifest(tmp_path / "m")
    with pytest.raises(DataError, match="not a folder"):
        verify_tree(tmp_path / "nowhere")


def test_cli_verify_and_manifest_exit_codes(dataset):
    made = launcher_cmd("data", "manifest", str(dataset), "--jobs", "2", timeout=120)
    assert made.returncode == 0, made.stderr
    clean = launcher_cmd("data", "verify", str(dataset), timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    damaged = damage(dataset)
    bad = launcher_cmd(
        "data", "verify", str(dataset), "--manifest", str(dataset / MANIFEST_NAME), "--jobs", "2"
    )
    assert bad.returncode == 1
    listed = {line.split(":")[0][4:] for line in bad.stdout.splitlines() if line.startswith("BAD")}
    assert listed == damaged
    assert "Traceback" not in bad.stderr


def test_pool_avoids_fork_when_the_caller_has_threads(dataset):
    """A process with threads (a progress bar, a server) gets forkserver workers: same result."""
    damaged = damage(dataset)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        assert _pool_context().get_start_method() != "fork"
        report = verify_tree(dataset, jobs=2)
    finally:
        stop.set()
        helper.join()
    assert set(report.bad) == damaged - {"img5.png"}
