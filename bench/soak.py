"""Soak: the quickstart N times through `launcher run` and through torchrun, side by side.

    python3 bench/soak.py [-n 20] [--config configs/quickstart.yaml] [--keep]

The two alternate (launcher first on even rounds, torchrun first on odd ones, so a load
change on the machine hits both alike). Each attempt is timed from process start to exit.
A launcher attempt fails when `launcher run` exits non-zero or its record is not COMPLETED;
a torchrun attempt when torchrun exits non-zero. Failures are printed with their reason (the
record's error; torchrun's last error lines), then the failure counts and median / p90 /
min / max wall times of each, and the machine's load average before and after. torchrun
gets the config's script and arguments, `--nproc_per_node` = the config's processes and a
free `--master_port` (its default 29500 may be taken by another job on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import config, runs  # noqa: E402

ERROR_MARKERS = ("Error", "error", "terminate called", "Signal", "signal", "Traceback")


@dataclass
class Attempt:
    tool: str
    round: int
    seconds: float
    ok: bool
    reason: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail_reason(text: str, lines: int = 4) -> str:
    """The last lines that look like an error (else the last lines), as one line."""
    found = [line.strip() for line in text.splitlines() if any(m in line for m in ERROR_MARKERS)]
    chosen = found[-lines:] or [line.strip() for line in text.splitlines()[-lines:]]
    return " | ".join(chosen)[:400]


def run_launcher(cfg: str, runs_dir: Path, n: int, timeout: float) -> Attempt:
    folder = runs_dir / f"launcher-{n:03d}"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", cfg, f"runs_dir={folder}", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.monotonic() - start
    found = list(runs.iter_run_dirs(folder)) if folder.is_dir() else []
    record = runs.read_record(found[0]) if found else None
    ok = proc.returncode == 0 and record is not None and record["state"] == "COMPLETED"
    reason = ""
    if not ok:
        if record is not None:
            codes = json.dumps(record.get("exit_codes"))
            reason = f"{record['state']}: {record.get('error') or ''} exit codes {codes}"
        else:
            reason = f"exit {proc.returncode}, no record: {_tail_reason(proc.stderr)}"
    return Attempt("launcher", n, seconds, ok, reason)


def run_torchrun(script: str, args: list[str], nprocs: int, out: Path, n: int, timeout: float):
    folder = out / f"torchrun-{n:03d}"
    folder.mkdir(parents=True)
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nprocs}",
        f"--master_port={_free_port()}",
        script,
        *args,
        "--out",
        str(folder),
    ]
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start
    (folder / "output.log").write_text(proc.stdout + proc.stderr)
    ok = proc.returncode == 0
    reason = "" if ok else f"exit {proc.returncode}: {_tail_reason(proc.stdout + proc.stderr)}"
    return Attempt("torchrun", n, seconds, ok, reason)


def _summary(name: str, attempts: list[Attempt]) -> str:
    times = sorted(a.seconds for a in attempts)
    failed = sum(not a.ok for a in attempts)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return (
        f"{name:<9} {len(attempts) - failed:>3}/{len(attempts)} ok, {failed} failed   "
        f"median {statistics.median(times):6.2f} s  p90 {p90:6.2f} s  "
        f"min {times[0]:6.2f} s  max {times[-1]:6.2f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20, help="rounds (one run of each per round)")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per attempt")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()

    spec = config.load(str(ROOT / args.config), []).spec
    script = spec.entrypoint.script
    if spec.entrypoint.kind != "script" or not script:
        print(f"{args.config}: entrypoint.script: torchrun needs a script", file=sys.stderr)
        return 2
    nprocs = spec.resources.tasks_per_node
    out = Path(tempfile.mkdtemp(prefix="launcher-soak-"))
    load_before = os.getloadavg()
    print(
        f"soak: {args.n} rounds of {args.config} ({nprocs} procs) through `launcher run` and "
        f"torchrun, alternating; {os.cpu_count()} CPUs, load {load_before[0]:.2f} "
        f"{load_before[1]:.2f} {load_before[2]:.2f}; folders under {out}",
        flush=True,
    )
    attempts: list[Attempt] = []
    for n in range(args.n):
        order = ["launcher", "torchrun"] if n % 2 == 0 else ["torchrun", "launcher"]
        for tool in order:
            if tool == "launcher":
                attempt = run_launcher(args.config, out, n, args.timeout)
            else:
                attempt = run_torchrun(
                    script, list(spec.entrypoint.args), nprocs, out, n, args.timeout
                )
            attempts.append(attempt)
            status = "ok  " if attempt.ok else "FAIL"
            print(
                f"  round {n:3d} {tool:<9} {status} {attempt.seconds:6.2f} s  "
                f"load {os.getloadavg()[0]:5.2f}  {attempt.reason}",
                flush=True,
            )
    load_after = os.getloadavg()
    print("\nfailures:")
    failures = [a for a in attempts if not a.ok]
    for a in failures:
        print(f"  {a.tool:<9} round {a.round:3d}: {a.reason}")
    if not failures:
        print("  none")
    print()
    for tool in ("launcher", "torchrun"):
        print(_summary(tool, [a for a in attempts if a.tool == tool]))
    print(
        f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
        f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f} "
        f"({os.cpu_count()} CPUs)"
    )
    if args.keep or failures:
        print(f"run folders kept under {out}")
    else:
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
