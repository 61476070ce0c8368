"""Image build times side by side: cold build, no-op rebuild, code-only rebuild.

    python bench/image_build.py [--base-image NAME:TAG] [--wheelhouse DIR] [--keep]

Needs a Docker engine (scripts/docker-start.sh). By default it builds FROM the local debootstrap
base image (scripts/make-base-image.sh) with torch from a wheelhouse (offline), as the tests do.
Builds read a snapshot of the project tree, so the live tree is never touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.image import build_image, connect, context_files  # noqa: E402
from launcher.spec import ImageSpec  # noqa: E402

CACHE = Path(os.environ.get("LAUNCHER_CACHE_DIR", Path.home() / ".cache" / "launcher"))


def _base_image(name: str) -> str:
    subprocess.run(["bash", str(ROOT / "scripts" / "make-base-image.sh"), name], check=True)
    return name


def _wheelhouse() -> Path:
    folder = CACHE / "wheelhouse-py311"
    if list(folder.glob("torch-2.13.0*.whl")):
        return folder
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    cmd += ["--python-version", "3.11", "--dest", str(folder), "torch==2.13.0"]
    cmd += ["--requirement", str(ROOT / "docker" / "requirements.txt")]
    subprocess.run(cmd, check=True)
    return folder


def _snapshot(dest: Path) -> Path:
    for rel in context_files(ROOT):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel, follow_symlinks=False)
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-image", default="launcher-base:bookworm")
    parser.add_argument("--wheelhouse", help="default: pip download into ~/.cache/launcher")
    parser.add_argument("--keep", action="store_true", help="keep the bench images")
    args = parser.parse_args()

    client = connect()
    base = _base_image(args.base_image)
    wheels = Path(args.wheelhouse) if args.wheelhouse else _wheelhouse()
    repository = f"launcher-bench-{os.getpid()}"
    spec = ImageSpec(repository=repository, base_image=base, wheelhouse=str(wheels))
    wheel_mb = sum(p.stat().st_size for p in wheels.glob("*.whl")) / 1e6
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="image-bench-") as tmp:
        tree = _snapshot(Path(tmp) / "tree")
        scenarios = [
            ("cold build (no cache)", lambda: build_image(spec, tree, no_cache=True)),
            ("no-op rebuild", lambda: build_image(spec, tree)),
            ("code-only rebuild", lambda: _code_change(spec, tree)),
        ]
        for name, run in scenarios:
            started = time.monotonic()
            result = run()
            wall = time.monotonic() - started
            results.append(result)
            cached = f"{len(result.cached_steps)}/{result.total_steps}" if result.built else "-"
            rows.append((name, wall, "yes" if result.built else "no (up to date)", cached))
    size = results[0].size_bytes

    print(f"\nimage build, base {base}, wheelhouse {wheel_mb:.0f} MB, image {size / 1e9:.2f} GB")
    print(f"{'scenario':<24} {'seconds':>8}  {'built':<16} {'steps from cache':>16}")
    for name, wall, built, cached in rows:
        print(f"{name:<24} {wall:>8.1f}  {built:<16} {cached:>16}")
    cold = results[0]
    slow = sorted(enumerate(cold.step_seconds, 1), key=lambda s: -s[1])[:4]
    steps = {i: line.split(" : ", 1)[1] for i, line in _steps(cold.log)}
    print("\nslowest steps of the cold build:")
    for number, seconds in slow:
        text = " ".join(steps.get(number, "?").split())
        print(f"  {seconds:6.1f}s  step {number}: {text[:70]}")

    if not args.keep:
        refs = {r.tag for r in results} | {t for r in results for t in r.stage_tags}
        for ref in sorted(refs):
            client.api.remove_image(ref)
    client.close()
    return 0


def _steps(log: tuple[str, ...]):
    for line in log:
        if line.startswith("Step ") and " : " in line:
            yield int(line[5:].split("/")[0]), line


def _code_change(spec: ImageSpec, tree: Path):
    (tree / "launcher" / "_bench_marker.py").write_text(f"STAMP = {time.time()!r}\n")
    return build_image(spec, tree)


if __name__ == "__main__":
    raise SystemExit(main())
