"""Slurm: --dry-run wall time against torchx's, and submit-to-first-training-step time.

    python bench/slurm_submit.py [--repeat 5] [--no-submit]

torchx is not a dependency: install it (`pip install torchx`) to get its column. The
submit measurement needs the local cluster (bash slurm/start.sh).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def wall(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_step(runs_dir: Path) -> float:
    """Seconds from `launcher run` start until rank 0 logs its first training step."""
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "launcher"), "run", "configs/slurm-2nodes.yaml", f"runs_dir={runs_dir}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    submitted = time.perf_counter() - start
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for log in runs_dir.glob("*/*/logs/rank0.log"):
            if "step   0" in log.read_text():
                total = time.perf_counter() - start
                print(f"  sbatch accepted after {submitted:.2f} s; first step after {total:.2f} s")
                return total
        time.sleep(0.05)
    raise SystemExit("no training step within 300 s: is the cluster up?")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-submit", action="store_true")
    args = parser.parse_args()
    ours = wall(
        [str(BIN / "launcher"), "run", "configs/slurm-2nodes.yaml", "--dry-run"], args.repeat
    )
    print(f"{'what':<58} {'median s':>9}")
    print(f"{'launcher run configs/slurm-2nodes.yaml --dry-run':<58} {ours:>9.3f}")
    torchx = shutil.which("torchx")
    if torchx:
        theirs = wall(
            [
                torchx,
                "run",
                "--dryrun",
                "--scheduler",
                "slurm",
                "dist.ddp",
                "-j",
                "2x1",
                "--script",
                "examples/quickstart_ddp.py",
            ],
            args.repeat,
        )
        print(f"{'torchx run --dryrun --scheduler slurm dist.ddp -j 2x1':<58} {theirs:>9.3f}")
        print(f"ratio launcher / torchx: {ours / theirs:.2f}x")
    else:
        print("torchx not installed (pip install torchx) - no comparison column")
    if not args.no_submit:
        with tempfile.TemporaryDirectory() as tmp:
            times = [first_step(Path(tmp) / f"r{i}") for i in range(2)]
        print(
            f"submit -> first training step (2 nodes x 1 task, quickstart): "
            f"median {statistics.median(times):.2f} s"
        )


if __name__ == "__main__":
    main()
