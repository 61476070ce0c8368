"""Throughput of `launcher data verify` (files/s) on small images, with 1 and with all CPUs.

    python bench/data_verify.py [--files 2000] [--size 64] [--repeat 3]

Writes the images into a temp folder (page cache warm: this measures decode + hash, not the
disk), then times verify_tree with 1 process and with every usable CPU, without and with a
sha256 manifest. Prints a table; the best of --repeat runs per row.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from PIL import Image

from launcher.data.verify import usable_cpus, verify_tree, write_manifest


def make_images(root: Path, count: int, size: int) -> int:
    """Half PNG, half JPEG, of random noise (the worst case for decoders); returns bytes."""
    total = 0
    for i in range(count):
        im = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
        path = root / f"{i // 500:03d}" / (f"{i:05d}.png" if i % 2 == 0 else f"{i:05d}.jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
        total += path.stat().st_size
    return total


def best_of(repeat: int, **kwargs) -> tuple[float, int]:
    best = float("inf")
    bad = 0
    for _ in range(repeat):
        start = time.perf_counter()
        report = verify_tree(**kwargs)
        best = min(best, time.perf_counter() - start)
        bad = len(report.bad)
    return best, bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    cpus = usable_cpus()
    with tempfile.TemporaryDirectory(prefix="launcher-bench-") as tmp:
        root = Path(tmp) / "set"
        nbytes = make_images(root, args.files, args.size)
        manifest = Path(tmp) / "SHA256SUMS"
        report = verify_tree(root, jobs=cpus, want_hashes=True)
        write_manifest(manifest, report.hashes)

        print(
            f"{args.files} images ({args.size}x{args.size} px, half PNG half JPEG, "
            f"{nbytes / 1e6:.1f} MB); {cpus} usable CPUs; {platform.processor() or '?'}; "
            f"Python {platform.python_version()}; best of {args.repeat}"
        )
        print(f"{'processes':>9}  {'checks':<18}{'seconds':>8}  {'files/s':>8}  {'bad':>4}")
        rows = [(1, None), (cpus, None), (1, manifest), (cpus, manifest)]
        for jobs, man in rows:
            seconds, bad = best_of(args.repeat, root=root, jobs=jobs, manifest=man)
            what = "decode + sha256" if man else "decode"
            print(f"{jobs:>9}  {what:<18}{seconds:>8.2f}  {args.files / seconds:>8.0f}  {bad:>4}")


if __name__ == "__main__":
    main()
