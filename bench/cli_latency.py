"""CLI latency and local start-to-exit time against torchrun, side by side.

    python bench/cli_latency.py [--repeat 7]

Prints the median wall time of `launcher --help`, `launcher run configs/quickstart.yaml
--dry-run`, and a 2-process trivial gloo job started by `launcher run` and by
`torchrun --nproc_per_node 2`, with ratios. Targets: --help and --dry-run well under
0.2 s; local start within 1.1x of torchrun.
"""

from __future__ import annotations

import argparse
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
        subprocess.run(
            argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    launcher = [str(BIN / "launcher")]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "trivial.yaml"
        cfg.write_text(
            f"name: trivial\nworkdir: {ROOT}\nruns_dir: {tmp}/runs\n"
            "entrypoint: {script: bench/trivial_gloo.py}\nresources: {procs_per_node: 2}\n"
        )
        rows = [
            (
                "python -c pass (interpreter floor)",
                wall([sys.executable, "-c", "pass"], args.repeat),
            ),
            ("launcher --help", wall([*launcher, "--help"], args.repeat)),
            (
                "launcher run quickstart --dry-run",
                wall([*launcher, "run", "configs/quickstart.yaml", "--dry-run"], args.repeat),
            ),
        ]
        runs = max(3, args.repeat // 2)
        local = wall([*launcher, "run", str(cfg), "--quiet"], runs)
        torchrun = wall(
            [str(BIN / "torchrun"), "--nproc_per_node", "2", "bench/trivial_gloo.py"], runs
        )
    print(f"{'what':<42} {'median s':>9}")
    for name, secs in rows:
        print(f"{name:<42} {secs:>9.3f}")
    print(f"{'launcher run (2 procs, trivial gloo)':<42} {local:>9.3f}")
    print(f"{'torchrun --nproc_per_node 2 (same script)':<42} {torchrun:>9.3f}")
    print(f"ratio launcher / torchrun: {local / torchrun:.2f}x (target <= 1.10x)")
    print(f"--help under 0.2 s: {rows[1][1] < 0.2}; --dry-run under 0.2 s: {rows[2][1] < 0.2}")


if __name__ == "__main__":
    main()
