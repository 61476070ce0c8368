"""What finding a failure's cause (and keeping every run's cost) costs `launcher status` and
`launcher sweep status`.

1,000 finished local runs (10% failed, each with two rank logs holding a traceback), and a
1,000-point sweep with 100 failed points. Each command is timed (CPU seconds, user + sys,
of a fresh interpreter each time, as a user runs it) four ways:
  old    the code before causes (a worktree at c91d342, default /work/before), or before
         costs (`--before /work/before-cost`: `git archive a822cf5`)
  first  this code, no cause or cost in the records yet: the first call finds and writes
         100 causes and 1,000 costs
  held   this code, every cause and cost already in its record (every later call)
  off    this code with the cause step turned off (causes.ensure_cause returns the record
         as it is): what the rest of this code costs, so held/off is the cause step alone
Target: `held` at most 20% over `off` (and `old`, where nothing else changed since).
`old` is the second call of the code before (its first may keep causes of its own).

    python3 bench/status_causes.py [--repeat 7] [--before /work/before]
    python3 bench/status_causes.py --before /work/before-cost   # the cost step
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import runs  # noqa: E402

N_RUNS = 1000
FAILED_EVERY = 10
LOG = """step 10 loss 2.31
Traceback (most recent call last):
  File "/work/job/train.py", line 42, in <module>
    loss = model(batch)
  File "/work/job/model.py", line 17, in forward
    raise ValueError(f"bad batch shape {x.shape}")
ValueError: bad batch shape torch.Size([8, 3])
"""
STOPPED = "step 10 loss 2.31\nKeyboardInterrupt\n"


def _record(run_id: str, name: str, failed: bool, **extra) -> dict:
    record = {
        "run_id": run_id,
        "name": name,
        "backend": "local",
        "state": "FAILED" if failed else "COMPLETED",
        "created_at": "2026-12-01T08:00:00+00:00",
        "started_at": "2026-12-01T08:00:01+00:00",
        "ended_at": "2026-12-01T08:05:00+00:00",
        "world_size": 2,
        "exit_codes": {"0": 1, "1": -15} if failed else {"0": 0, "1": 0},
        "failed_rank": 0 if failed else None,
        "error": "rank 0 exited with code 1" if failed else None,
        "attempts": [],
        "backend_info": {},
        "config_file": None,
        **extra,
    }
    if failed:
        record["rank_ends"] = {
            "0": {"code": 1, "ended": 100.0, "stopped_by_launcher": False},
            "1": {"code": -15, "ended": 101.0, "stopped_by_launcher": True},
        }
        record["oom_kills"] = 0
    return record


def _write_run(run_dir: Path, record: dict) -> None:
    (run_dir / "logs").mkdir(parents=True)
    runs.write_record(run_dir, record)
    if record["state"] == "FAILED":
        (run_dir / "logs" / "rank0.log").write_text("x" * 20_000 + "\n" + LOG)
        (run_dir / "logs" / "rank1.log").write_text("x" * 20_000 + "\n" + STOPPED)


def make(root: Path) -> tuple[Path, Path, list[Path], list[Path], list[Path], list[Path]]:
    """runs/ with 1,000 runs, and a 1,000-point sweep; every run and point, the failed
    runs and points."""
    runs_dir = root / "runs"
    failed: list[Path] = []
    every: list[Path] = []
    for i in range(N_RUNS):
        run_dir = runs_dir / "bench" / f"20261201-080000-{i:06x}"
        bad = i % FAILED_EVERY == 0
        _write_run(run_dir, _record(run_dir.name, "bench", bad))
        failed += [run_dir] if bad else []
        every.append(run_dir)
    failed_points: list[Path] = []
    every_point: list[Path] = []
    sweep_dir = root / "sweeps" / "sw" / "sweeps" / "s1"
    sweep_dir.mkdir(parents=True)
    points = []
    for i in range(N_RUNS):
        run_dir = root / "sweeps" / "sw" / f"p{i:04d}"
        bad = i % FAILED_EVERY == 0
        _write_run(run_dir, _record(run_dir.name, "sw", bad, sweep_dir=str(sweep_dir)))
        failed_points += [run_dir] if bad else []
        every_point.append(run_dir)
        points.append(
            {
                "index": i,
                "id": f"p{i:04d}",
                "run_dir": str(run_dir),
                "overrides": {"train.lr": 10.0 ** -(i % 5)},
                "state": "FAILED" if bad else "COMPLETED",
                "attempts": 1,
                "job_ids": [],
                "submitted_at": "2026-12-01T08:00:00+00:00",
            }
        )
    sweep = {
        "version": 1,
        "sweep_id": "s1",
        "name": "sw",
        "backend": "local",
        "config_file": None,
        "runs_dir": str(root / "sweeps"),
        "keys": ["train.lr"],
        "log_keys": [],
        "metric": "loss",
        "created_at": "2026-12-01T08:00:00+00:00",
        "updated_at": None,
        "points": points,
    }
    runs.atomic_write_text(sweep_dir / "sweep.json", json.dumps(sweep))
    return runs_dir, sweep_dir, every, failed, every_point, failed_points


def forget(run_dirs: list[Path]) -> None:
    """Take the kept cause and cost out of these records: the next call finds them again."""
    for run_dir in run_dirs:
        record = runs.read_record(run_dir)
        if "cause" in record or "cost" in record:
            record.pop("cause", None)
            record.pop("cost", None)
            runs.write_record(run_dir, record)


# `python -m launcher` with the cause step turned off (both commands call it through the module).
OFF = (
    "import sys, launcher.causes as c; c.ensure_cause = lambda run_dir, record: record; "
    "from launcher.cli import main; sys.argv[0] = 'launcher'; raise SystemExit(main())"
)


def timed(argv: list[str], pythonpath: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # cwd too: `python -m` puts the working folder before PYTHONPATH on sys.path.
    out = subprocess.run(argv, env=env, cwd=pythonpath, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time (user + sys) of the command: on a shared, loaded machine the wall time
    # mostly measures the other jobs.
    took = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {out.stderr[-2000:]}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--before", type=Path, default=Path("/work/before"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="status-causes-") as tmp:
        runs_dir, sweep_dir, every_run, failed_runs, every_point, failed_points = make(Path(tmp))
        py = [sys.executable, "-m", "launcher"]
        commands = {
            "status (1,000 runs)": (
                [*py, "status", f"--runs-dir={runs_dir}"],
                every_run,
                failed_runs,
            ),
            "sweep status (1,000 points)": (
                [*py, "sweep", "status", str(sweep_dir)],
                every_point,
                failed_points,
            ),
        }
        print(f"{'command':<28} {'old':>8} {'first':>8} {'held':>8} {'off':>8}  held/off  held/old")
        for label, (argv, every, failed) in commands.items():
            seen: dict[str, list[float]] = {"old": [], "first": [], "held": [], "off": []}
            off = [sys.executable, "-c", OFF, *argv[3:]]
            for _ in range(args.repeat):
                forget(every)
                # The code before costs keeps causes too: its first call finds them, so the
                # second is the one to compare with `held`.
                timed(argv, args.before)
                seen["old"].append(timed(argv, args.before))
                forget(every)
                seen["first"].append(timed(argv, ROOT))
                seen["held"].append(timed(argv, ROOT))
                seen["off"].append(timed(off, ROOT))
            med = {k: statistics.median(v) for k, v in seen.items()}
            print(
                f"{label:<28} {med['old']:>7.3f}s {med['first']:>7.3f}s {med['held']:>7.3f}s"
                f" {med['off']:>7.3f}s  {med['held'] / med['off']:>7.2f}x"
                f"  {med['held'] / med['old']:>7.2f}x"
            )
            kinds = {str((runs.read_record(d).get("cause") or {}).get("kind")) for d in failed}
            print(f"{'':<28} causes kept in the {len(failed)} failed records: {sorted(kinds)}")
            costed = sum(1 for d in every if "cost" in runs.read_record(d))
            print(f"{'':<28} costs kept: {costed} of {len(every)} records")
        print(f"medians of {args.repeat}, CPU s (user+sys), a fresh interpreter per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
