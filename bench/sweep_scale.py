"""Sweep scale: plan + submit time for 1,000 and 10,000 points, and `sweep status` time.

    python bench/sweep_scale.py [--points 1000 10000] [--status-points 1000] [--no-slurm]

For each size it times, in this process:
  - plan:   load + expand + validate every point + plan (local: every point's process plan;
            Slurm: every point checked to fit one array script),
  - submit: Slurm, when `sinfo` answers: claim under the lock, chunk files, one real
            `sbatch --hold` per array (so nothing runs; each is cancelled at once, outside
            the timing, as every task counts against MaxJobCount), sweep.json.
            Local: claiming and writing sweep.json (points then start as slots free up).
and prints the 10x/1x ratio (10.0 = linear). Then `launcher sweep status` for a finished
1,000-point local sweep (records + metrics on disk), in process and as the CLI, and for
1,000 queued Slurm array tasks (no records yet: one sacct + one squeue).
Target: 10,000 points planned and submitted in under 5 s.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher import runs  # noqa: E402
from launcher.sweep import execute, plan, report, state  # noqa: E402


def write_config(folder: Path, points: int, backend: str) -> Path:
    cols = 10
    rows = points // cols
    path = folder / f"bench-{backend}-{points}.yaml"
    a = ", ".join(f"'{i}'" for i in range(rows))
    b = ", ".join(f"'{i}'" for i in range(cols))
    path.write_text(
        f"""
name: bench-{backend}-{points}
workdir: {folder}
runs_dir: {folder / "runs"}
backend: {backend}
entrypoint: {{script: point.py}}
resources: {{procs_per_node: 1, time_min: 5}}
sweep:
  grid: {{env.A: [{a}], env.B: [{b}]}}
"""
    )
    return path


def slurm_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def job_budget() -> int:
    """Array tasks the controller can take now: MaxJobCount counts every task, and ended
    or cancelled ones until MinJobAge has passed (`scontrol show jobs` lists them)."""
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    limit = next(
        int(line.split("=")[1]) for line in conf.splitlines() if line.startswith("MaxJobCount")
    )
    jobs = subprocess.run(
        ["scontrol", "show", "jobs", "-o"], capture_output=True, text=True
    ).stdout.splitlines()
    used = 0
    for line in jobs:
        tasks = next((f for f in line.split() if f.startswith("ArrayTaskId=")), "")
        ranges = tasks.removeprefix("ArrayTaskId=").split("%")[0]
        count = 0
        for part in filter(None, ranges.split(",")):
            lo, _, hi = part.partition("-")
            count += int(hi or lo) - int(lo) + 1 if lo.isdigit() else 1
        used += max(1, count)
    return limit - used


def plan_and_submit(folder: Path, points: int, backend: str) -> dict[str, float]:
    cfg = write_config(folder, points, backend)
    start = time.perf_counter()
    prepared = plan.prepare(str(cfg), [])
    planned = time.perf_counter()
    assert len(prepared.points) == points
    out = {"plan_s": planned - start, **prepared.timings}
    array = prepared.backend.array
    if array is not None:
        # What `launcher sweep` does (claim under the lock, chunk files, one sbatch per
        # array, sweep.json after each), with each array submitted held and cancelled at
        # once: every array task counts against the test cluster's MaxJobCount (10,000).
        arrays: list[str] = []
        cancel_s = 0.0
        # Real held submission when the controller has room for every task (plus a margin
        # for other users); else `sbatch --test-only` (same round trip, no job created).
        test_only = job_budget() < points + 1000
        out["mode"] = "sbatch --test-only" if test_only else "sbatch --hold"

        def cancel(array_id: str, ids: list[str]) -> None:
            nonlocal cancel_s
            if not array_id:
                return  # --test-only: nothing was created
            arrays.append(array_id)
            t = time.perf_counter()
            subprocess.run(["scancel", array_id], check=True)
            cancel_s += time.perf_counter() - t

        try:
            with state.locked(prepared.lock_root):
                current, decision = execute.claim(prepared, execute.Options())
                ids = current.claim(decision.submit, force=False)
                execute.queue_arrays(
                    prepared, current, ids, hold=True, test_only=test_only, after_each=cancel
                )
        finally:
            if arrays:
                subprocess.run(["scancel", *arrays], check=False)
        out["submit_s"] = time.perf_counter() - planned - cancel_s
        out["arrays"] = -(-len(decision.submit) // array.max_array_size(prepared.spec))
        out["total_s"] = time.perf_counter() - start - cancel_s
        return out
    with state.locked(prepared.lock_root):
        current, _ = execute.claim(prepared, execute.Options())
        current.save()
    out["submit_s"] = time.perf_counter() - planned
    out["total_s"] = time.perf_counter() - start
    return out


def finished_local_sweep(folder: Path, points: int) -> Path:
    """A 1,000-point local sweep as it looks when done: records, metrics, sweep.json."""
    cfg = write_config(folder, points, "local")
    prepared = plan.prepare(str(cfg), [])
    current = prepared.open_state()
    for entry, point in zip(current.points, prepared.points, strict=True):
        run_dir = Path(entry["run_dir"])
        record = runs.new_record(
            run_id=point.run_id, name="bench", backend="local", world_size=1, config_file=None
        )
        record.update(state="COMPLETED", ended_at=runs.now())
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / runs.RECORD).write_text(json.dumps(record))
        (run_dir / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)}) + "\n" for s in range(100))
        )
    current.mark_submitted(current.ids)
    current.save()
    return prepared.directory


def timed_status(directory: Path, runs_dir: Path) -> tuple[float, float]:
    start = time.perf_counter()
    report.print_status(directory, io.StringIO())
    in_process = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "launcher", "sweep", "status", str(directory)],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return in_process, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--points", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--status-points", type=int, default=1000)
    parser.add_argument("--no-slurm", action="store_true")
    args = parser.parse_args()
    backends = ["local"] + (["slurm"] if slurm_up() and not args.no_slurm else [])
    if "slurm" not in backends:
        print("(Slurm not reachable or --no-slurm: local backend only)")
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        folder = Path(tmp)
        (folder / "point.py").write_text("print('hi')\n")
        for backend in backends:
            print(f"\n{backend}: plan + submit")
            print(
                f"{'points':>8} {'expand':>8} {'plan':>8} {'submit':>8} {'total':>8}  arrays  "
                "(expand: load + expand + check every point)"
            )
            totals = {}
            for n in args.points:
                t = plan_and_submit(folder, n, backend)
                totals[n] = t["total_s"]
                print(
                    f"{n:>8} {t['expand_s']:>7.2f}s {t['plan_s']:>7.2f}s {t['submit_s']:>7.2f}s "
                    f"{t['total_s']:>7.2f}s  {t.get('arrays', '-')}  {t.get('mode', '')}"
                )
            ns = sorted(totals)
            if len(ns) >= 2:
                lo, hi = ns[0], ns[-1]
                print(
                    f"  {hi}/{lo} points: time x{totals[hi] / totals[lo]:.1f} "
                    f"for x{hi / lo:.0f} points (linear: x{hi / lo:.0f})"
                )
        n = args.status_points
        directory = finished_local_sweep(folder, n)
        inside, cli = timed_status(directory, folder / "runs")
        print(
            f"\nsweep status, {n} finished local points: {inside:.2f}s in process, {cli:.2f}s CLI"
        )
        if "slurm" in backends:
            cfg = write_config(folder, n, "slurm")
            prepared = plan.prepare(str(cfg), ["name=bench-status"])
            try:
                execute.run(prepared, execute.Options(hold=True, err=io.StringIO()))
                inside, cli = timed_status(prepared.directory, folder / "runs")
            finally:
                saved = state.SweepState.load(prepared.directory)
                arrays = saved.data.get("array_job_ids", []) if saved else []
                if arrays:
                    subprocess.run(["scancel", *arrays], check=False)
            print(
                f"sweep status, {n} queued Slurm array tasks: {inside:.2f}s in process, "
                f"{cli:.2f}s CLI"
            )


if __name__ == "__main__":
    main()
